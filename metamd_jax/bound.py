"""The meta-objective: the convergence-rate (regret) bound of mirror descent.

For iterates ``theta_1 .. theta_{T+1}`` of mirror descent with gradients ``g_t`` and the
step size folded into the divergence (METHOD.md section 2), the bound is

.. math::

  R(\\phi) = \\frac1T \\Big[ B_\\phi(\\mathrm{sg}(\\theta_{T+1}), \\theta_1)
             + \\sum_{t=1}^T B_\\phi(\\theta_t, \\theta_{t+1}) \\Big],
  \\qquad \\theta_{t+1} = \\theta_t - M^{-1} g_t,

with the comparator, the final iterate, held constant (``sg``: stop-gradient). The
iterates and gradients are data (the regret view: the losses are given, the learner
chooses the divergence), so the bound's gradient w.r.t. the divergence goes through the
metric only. For the quadratic potential a step term is
``B(theta_t, theta_{t+1}) = 1/2 <g_t, M^{-1} g_t>``.

This module holds the terms (:func:`step_term`, :func:`statistics_term`,
:func:`distance_term`), their combination (:func:`from_terms`), the bound of a stored
trajectory (:func:`regret_bound`) and the streaming sums that let
:func:`metamd_jax.inner_loop.rollout` compute the bound and its gradient in a
``lax.scan`` with memory constant in ``T`` (:func:`init_sums`, :func:`add_step`,
:func:`finish`). The terms take the divergence's materialised metrics
(:func:`metamd_jax.divergence.operators`); a divergence works too where noted.

It also holds the bound of adaptive MetaMD (:mod:`metamd_jax.adaptive`, the metric
``M_t = s_t M`` with a non-decreasing online scale ``s_t >= 1``; METHOD.md section 7):

.. math::

  R = \\frac1T \\Big[ \\tfrac12 \\sum_{t=1}^T (s_t - s_{t-1}) \\|u - \\theta_t\\|^2_M
      + \\tfrac12 \\sum_{t=1}^T \\frac{\\|g_t\\|^2_{M^{-1}}}{s_t} \\Big],
  \\qquad s_0 = 0, \\quad u = \\mathrm{sg}(\\theta_{T+1}),

with iterates, gradients and scales as data: its step term
(:func:`adaptive_step_term`), the bound of a stored trajectory
(:func:`adaptive_regret_bound`) and its streaming sums (:func:`init_adaptive_sums`,
:func:`add_adaptive_step`, :func:`finish_adaptive`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metamd_jax import divergence as divergence_lib
from metamd_jax import mirror
from metamd_jax.types import Array, PyTree

ADJOINTS = ('auto', 'implicit', 'statistics')
"""How a step term is differentiated: see :func:`add_step` and :func:`resolve_adjoint`."""


def check_adjoint(adjoint: str) -> None:
  """Raise ``ValueError`` unless ``adjoint`` is one of :data:`ADJOINTS`."""
  if not isinstance(adjoint, str) or adjoint not in ADJOINTS:
    raise ValueError(f'unknown adjoint {adjoint!r}; expected one of {ADJOINTS}.')


def resolve_adjoint(adjoint: str = 'auto', solver='exact', **solver_options) -> str:
  """The adjoint a step term is differentiated with: ``'implicit'`` or ``'statistics'``.

  ``'auto'`` (the default everywhere) is ``'statistics'`` with ``solver='exact'``, where
  both adjoints are exact and the statistics are about 2x cheaper per step, and
  ``'implicit'`` with any other solver (``'cg'``, ``'neumann'``, ``'dense'`` or a
  callable), the only adjoint that uses the solver. An explicit ``'implicit'`` or
  ``'statistics'`` is returned as it is, after the checks below.

  Args:
    adjoint: ``'auto'``, ``'implicit'`` or ``'statistics'`` (:data:`ADJOINTS`).
    solver: adjoint solver of the mirror step (a name or a callable).
    **solver_options: options of a matrix-free solver; ``'statistics'`` takes none.

  Returns:
    ``'implicit'`` or ``'statistics'``.

  Raises:
    ValueError: for an unknown ``adjoint``; for ``'statistics'`` (explicit, or resolved
      from ``'auto'``) with a solver other than ``'exact'`` (it would ignore the solver)
      or with solver options (the exact solver takes none).
  """
  check_adjoint(adjoint)
  exact = isinstance(solver, str) and solver == 'exact'
  if adjoint == 'auto':
    return _check_exact_options('statistics', solver_options) if exact else 'implicit'
  if adjoint == 'statistics':
    if not exact:
      raise ValueError(f"adjoint='statistics' differentiates with the exact inverses and "
                       f"would ignore solver={solver!r}; use solver='exact', or "
                       f"adjoint='implicit' (or 'auto') with solver={solver!r}.")
    return _check_exact_options(adjoint, solver_options)
  return adjoint


def _check_exact_options(adjoint: str, solver_options: dict) -> str:
  if solver_options:
    raise ValueError(f'the exact solver takes no options, got {sorted(solver_options)}.')
  return adjoint


# ---------------------------------------------------------------------------
# The terms.
# ---------------------------------------------------------------------------


def step_term(operators: PyTree, params: PyTree, grads: PyTree, *, solver='exact',
              **solver_options) -> tuple[Array, PyTree]:
  """``(B(theta, theta+), theta+)`` with ``theta+`` the mirror step from ``theta``.

  Differentiated w.r.t. ``operators`` through the mirror step's implicit VJP
  (:func:`metamd_jax.mirror.operator_step`), which works for any divergence and adjoint
  solver. A term of a run: the shapes are checked once by the run (or
  :func:`regret_bound`), not at every step.

  Args:
    operators: the materialised metrics (:func:`metamd_jax.divergence.operators`).
    params: ``theta`` (data: stop-gradient).
    grads: ``g`` at ``theta`` (data: stop-gradient).
    solver: adjoint solver of the mirror step (see :func:`metamd_jax.mirror_step`).
    **solver_options: options of a matrix-free solver.

  Returns:
    The scalar term and the new parameters.
  """
  params = jax.lax.stop_gradient(params)
  grads = jax.lax.stop_gradient(grads)
  new_params = mirror.operator_step(operators, params, grads, solver=solver, **solver_options)
  return (divergence_lib.bregman_divergence(operators, params, new_params, check_shapes=False),
          new_params)


def _half_dual_norm(operators: PyTree, grads: PyTree) -> tuple[Array, PyTree]:
  direction = divergence_lib.solve_metric(operators, grads)
  term = 0.5 * sum(jnp.vdot(g.astype(d.dtype), d) for g, d in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  return term, direction


def statistics_term(operators: PyTree, grads: PyTree) -> tuple[Array, PyTree]:
  """``(1/2 <g, M^{-1} g>, M^{-1} g)``: the step term, from the cached inverses.

  Equal to :func:`step_term` (``theta+ - theta = -M^{-1} g``) but written with the
  inverse factors: for a Kronecker leaf the term is ``1/2 tr(G^T P G Q)``, whose
  gradients w.r.t. ``P`` and ``Q`` are the statistics ``1/2 G Q G^T`` and
  ``1/2 G^T P G``, so summing gradients over steps sums these statistics. The gradient
  w.r.t. the divergence is the same as :func:`step_term`'s.

  Args:
    operators: the materialised metrics (the inverses are enough:
      :func:`metamd_jax.divergence.preconditioner`).
    grads: ``g`` (data: stop-gradient).

  Returns:
    The scalar term and the mirror direction ``M^{-1} g``.
  """
  return _half_dual_norm(operators, jax.lax.stop_gradient(grads))


def distance_term(operators: PyTree, final_params: PyTree, init_params: PyTree) -> Array:
  """``B(stop_gradient(theta*), theta_1)``: the comparator is held constant.

  ``operators`` may also be a divergence (see
  :func:`metamd_jax.divergence.bregman_divergence`). A term of a run: the shapes are
  checked once by the run (or :func:`regret_bound`).
  """
  return divergence_lib.bregman_divergence(
      operators, jax.lax.stop_gradient(final_params), jax.lax.stop_gradient(init_params),
      check_shapes=False)


def from_terms(distance: Array, step_terms: Array, num_steps: int) -> Array:
  """The bound ``(B(theta*, theta_1) + sum_t B(theta_t, theta_{t+1})) / T``."""
  return (distance + step_terms) / num_steps


def _trajectory_length(divergence: PyTree, params_sequence: PyTree,
                       grads_sequence: PyTree) -> int:
  """``T`` of a stored trajectory: ``T`` gradients and ``T + 1`` iterates, each of the
  divergence's structure and shapes, else an error."""
  for name, sequence in (('params_sequence', params_sequence),
                         ('grads_sequence', grads_sequence)):
    divergence_lib.check_structure(
        divergence, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                 sequence), name=f'{name} (per step)')
  num_steps = jax.tree.leaves(grads_sequence)[0].shape[0]
  if num_steps < 1:
    raise ValueError('grads_sequence holds no gradient (T = 0): the bound averages over '
                     'T >= 1 steps.')
  lengths = {x.shape[0] for x in jax.tree.leaves(params_sequence)}
  if lengths != {num_steps + 1}:
    raise ValueError(f'params_sequence must hold T + 1 = {num_steps + 1} iterates for '
                     f'T = {num_steps} gradients, got leading sizes {sorted(lengths)}.')
  return num_steps


def regret_bound(divergence: PyTree, params_sequence: PyTree, grads_sequence: PyTree, *,
                 solver='exact', **solver_options) -> Array:
  """The mirror-descent convergence-rate bound of a stored trajectory.

  .. math::

    R(\\phi) = \\frac1T \\Big[ B_\\phi(\\mathrm{sg}(\\theta_{T+1}), \\theta_1)
      + \\sum_{t=1}^T B_\\phi(\\theta_t, \\mathrm{MD}_\\phi(\\theta_t, g_t)) \\Big]

  The comparator is the final iterate under stop-gradient; iterates and gradients are
  data; each step term is differentiated through the mirror step's implicit VJP. No
  validation data is involved. Memory is linear in ``T`` (the trajectory is stored);
  :func:`metamd_jax.inner_loop.rollout` streams the same bound instead.

  Args:
    divergence: the divergence.
    params_sequence: iterates ``theta_1 .. theta_{T+1}`` stacked on a leading axis.
    grads_sequence: gradients ``g_1 .. g_T`` stacked on a leading axis.
    solver: adjoint solver of the mirror step.
    **solver_options: options of a matrix-free solver.

  Returns:
    The scalar bound.
  """
  num_steps = _trajectory_length(divergence, params_sequence, grads_sequence)
  operators = divergence_lib.operators(divergence)
  first = jax.tree.map(lambda x: x[0], params_sequence)
  final = jax.tree.map(lambda x: x[-1], params_sequence)
  iterates = jax.tree.map(lambda x: x[:-1], params_sequence)
  terms = jax.vmap(lambda p, g: step_term(operators, p, g, solver=solver,
                                          **solver_options)[0])(iterates, grads_sequence)
  return from_terms(distance_term(operators, final, first), jnp.sum(terms), num_steps)


# ---------------------------------------------------------------------------
# Streaming: the bound and its gradient without storing the trajectory.
# ---------------------------------------------------------------------------


class StreamingSums(NamedTuple):
  """The running sums of a streamed bound (the carry of a ``lax.scan``).

  Attributes:
    step_terms: ``sum_t B(theta_t, theta_{t+1})``, a scalar in the metrics' dtype.
    grads: ``sum_t dB(theta_t, theta_{t+1}) / d operators``, with the structure of the
      operators (``None`` when no meta-gradient is accumulated).
  """

  step_terms: Array
  grads: PyTree | None


def init_sums(operators: PyTree, *, meta_gradient: bool = False) -> StreamingSums:
  """Zero sums for :func:`add_step` (the gradient sum only if ``meta_gradient``)."""
  dtype = jnp.result_type(*jax.tree.leaves(operators))
  grads = jax.tree.map(jnp.zeros_like, operators) if meta_gradient else None
  return StreamingSums(jnp.zeros((), dtype), grads)


def add_step(sums: StreamingSums, operators: PyTree, params: PyTree, grads: PyTree, *,
             adjoint: str = 'auto', solver='exact',
             **solver_options) -> tuple[PyTree, StreamingSums]:
  """Take one mirror step and add its term (and the term's gradient) to the sums.

  Args:
    sums: the running sums (:func:`init_sums`); their ``grads`` say whether the term's
      gradient w.r.t. ``operators`` is accumulated.
    operators: the materialised metrics.
    params: ``theta_t``.
    grads: ``g_t`` at ``theta_t`` (data: the gradient never flows through it).
    adjoint: how the term is differentiated: ``'implicit'`` (:func:`step_term`, the
      mirror step's ``custom_vjp``, any divergence and adjoint solver),
      ``'statistics'`` (:func:`statistics_term`: the same gradient as running statistics
      w.r.t. the cached inverses; ``solver='exact'`` only) or ``'auto'`` (the default:
      ``'statistics'`` with the exact solver, else ``'implicit'``; :func:`resolve_adjoint`).
    solver: adjoint solver of the mirror step (``'implicit'`` only).
    **solver_options: options of a matrix-free solver.

  Returns:
    ``(theta_{t+1}, sums)``.
  """
  adjoint = resolve_adjoint(adjoint, solver, **solver_options)
  if sums.grads is not None and adjoint == 'implicit':
    (term, new_params), term_grad = jax.value_and_grad(step_term, has_aux=True)(
        operators, params, grads, solver=solver, **solver_options)
  else:
    if sums.grads is not None:
      (term, direction), term_grad = jax.value_and_grad(statistics_term, has_aux=True)(
          operators, grads)
    else:
      # No gradient wanted: the same value, and the step stays plain autodiff-able.
      (term, direction), term_grad = _half_dual_norm(operators, grads), None
    new_params = jax.tree.map(lambda p, d: (p - d).astype(p.dtype), params, direction)
  step_terms = sums.step_terms + term.astype(sums.step_terms.dtype)
  if term_grad is not None:
    term_grad = jax.tree.map(jnp.add, sums.grads, term_grad)
  return new_params, StreamingSums(step_terms, term_grad)


def finish(sums: StreamingSums, operators: PyTree, final_params: PyTree, init_params: PyTree,
           num_steps: int) -> tuple[Array, Array, PyTree | None]:
  """The bound from the streamed sums and the two end points.

  Args:
    sums: the sums after ``num_steps`` calls of :func:`add_step`.
    operators: the materialised metrics.
    final_params: ``theta_{T+1}``, the comparator (held constant).
    init_params: ``theta_1``.
    num_steps: ``T``.

  Returns:
    ``(bound, distance_term, grad)`` with ``grad`` the bound's gradient w.r.t.
    ``operators`` (``None`` unless the sums accumulate gradients); pull it back to the
    meta-parameters with the VJP of :func:`metamd_jax.divergence.operators`.
  """
  if sums.grads is None:
    distance = distance_term(operators, final_params, init_params)
    grad = None
  else:
    distance, distance_grad = jax.value_and_grad(distance_term)(operators, final_params,
                                                                init_params)
    grad = jax.tree.map(lambda a, b: (a + b) / num_steps, distance_grad, sums.grads)
  return from_terms(distance, sums.step_terms, num_steps), distance, grad


# ---------------------------------------------------------------------------
# Adaptive mirror descent: the metric M_t = s_t M with a non-decreasing scale.
# ---------------------------------------------------------------------------
#
# With M_t = s_t M, s_t >= 1 non-decreasing (see metamd_jax.adaptive), the adaptive-MD
# regret bound divided by T is
#
#   R = 1/T [ 1/2 sum_t w_t ||u - theta_t||^2_M + 1/2 sum_t ||g_t||^2_{M^{-1}} / s_t ],
#   w_1 = s_1, w_t = s_t - s_{t-1} (s_0 = 0), u = sg(theta_{T+1}).
#
# Iterates, gradients and scales are data (stop-gradient), so R is a function of the
# learned metric only. It streams: with d_t = theta_t - theta_1 and D = u - theta_1,
#
#   sum_t w_t ||u - theta_t||^2_M = s_T ||D||^2_M - 2 <M D, sum_t w_t d_t>
#                                   + sum_t w_t ||d_t||^2_M,
#
# (sum_t w_t = s_T), so a rollout carries s_{t-1}, the tree sum_t w_t d_t, the scalar
# sum_t w_t ||d_t||^2_M / 2 and, since M is frozen within a run, that scalar's gradient
# and the step terms' gradients w.r.t. the operators. Centring at theta_1 keeps the
# expansion's cancellation relative to the distance travelled, not to ||theta||.


def adaptive_step_term(operators: PyTree, params: PyTree, grads: PyTree, scale: Array, *,
                       adjoint: str = 'auto', solver='exact',
                       **solver_options) -> Array:
  """``||g||^2_{M^{-1}} / (2 s)``: the step term of the metric ``s M`` (``s`` is data).

  It is ``B_{s phi}(theta, theta+)`` with ``theta+ = theta - M^{-1} g / s``. With
  ``adjoint='implicit'`` it is written ``s B_phi(theta, MD_phi(theta, g / s))`` and
  differentiated through the mirror step's implicit VJP (:func:`step_term`); with
  ``'statistics'`` as ``statistics_term / s`` (gradients w.r.t. the cached inverses;
  ``solver='exact'`` only). Both give the same value and gradient; ``'auto'`` (the
  default) picks ``'statistics'`` with the exact solver, else ``'implicit'``
  (:func:`resolve_adjoint`).

  Args:
    operators: the materialised metrics.
    params: ``theta`` (data).
    grads: ``g`` (data).
    scale: ``s >= 1`` (data).
    adjoint: ``'auto'``, ``'implicit'`` or ``'statistics'``.
    solver: adjoint solver of the mirror step (``'implicit'`` only).
    **solver_options: options of a matrix-free solver.

  Returns:
    The scalar term.
  """
  adjoint = resolve_adjoint(adjoint, solver, **solver_options)
  scale = jax.lax.stop_gradient(scale)
  if adjoint == 'implicit':
    scaled = jax.tree.map(lambda g: g / scale.astype(g.dtype), jax.lax.stop_gradient(grads))
    term, _ = step_term(operators, params, scaled, solver=solver, **solver_options)
    return scale.astype(term.dtype) * term
  term, _ = statistics_term(operators, grads)
  return term / scale.astype(term.dtype)


def _scale_weights(scales: Array) -> Array:
  """``w_1 = s_1``, ``w_t = s_t - s_{t-1}``."""
  return jnp.diff(scales, prepend=jnp.zeros((1,), scales.dtype))


def adaptive_regret_bound(divergence: PyTree, params_sequence: PyTree, grads_sequence: PyTree,
                          scales: Array, *, adjoint: str = 'auto', solver='exact',
                          **solver_options) -> Array:
  """The adaptive-mirror-descent regret bound of a stored trajectory, divided by ``T``.

  .. math::

    R = \\frac1T \\Big[ \\tfrac12 s_1 \\|u - \\theta_1\\|^2_M
      + \\tfrac12 \\sum_{t \\ge 2} (s_t - s_{t-1}) \\|u - \\theta_t\\|^2_M
      + \\tfrac12 \\sum_{t=1}^T \\frac{\\|g_t\\|^2_{M^{-1}}}{s_t} \\Big],
    \\qquad u = \\mathrm{sg}(\\theta_{T+1}),

  the bound of the metrics ``M_t = s_t M`` (:mod:`metamd_jax.adaptive`), with iterates,
  gradients and scales as data. With ``s_t = 1`` for all ``t`` it is
  :func:`regret_bound`. Memory is linear in ``T``;
  :func:`metamd_jax.inner_loop.adaptive_rollout` streams the same bound.

  Args:
    divergence: the divergence.
    params_sequence: iterates ``theta_1 .. theta_{T+1}`` stacked on a leading axis.
    grads_sequence: gradients ``g_1 .. g_T`` stacked on a leading axis.
    scales: ``(T,)`` scales ``s_1 .. s_T`` (non-decreasing, ``>= 1`` for the bound to
      hold; not checked).
    adjoint: how the step terms are differentiated (see :func:`adaptive_step_term`).
    solver: adjoint solver of the mirror step.
    **solver_options: options of a matrix-free solver.

  Returns:
    The scalar bound.
  """
  adjoint = resolve_adjoint(adjoint, solver, **solver_options)
  num_steps = _trajectory_length(divergence, params_sequence, grads_sequence)
  if jnp.shape(scales) != (num_steps,):
    raise ValueError(f'scales must have shape (T,) = ({num_steps},), got {jnp.shape(scales)}.')
  scales = jax.lax.stop_gradient(jnp.asarray(scales))
  operators = divergence_lib.operators(divergence)
  final = jax.tree.map(lambda x: x[-1], params_sequence)
  iterates = jax.tree.map(lambda x: x[:-1], params_sequence)
  distances = jax.vmap(lambda p: distance_term(operators, final, p))(iterates)
  steps = jax.vmap(lambda p, g, s: adaptive_step_term(
      operators, p, g, s, adjoint=adjoint, solver=solver, **solver_options))(
          iterates, grads_sequence, scales)
  weights = _scale_weights(scales).astype(distances.dtype)
  return from_terms(jnp.sum(weights * distances), jnp.sum(steps), num_steps)


class AdaptiveSums(NamedTuple):
  """The running sums of a streamed adaptive bound (the carry of a ``lax.scan``).

  Attributes:
    step_terms: ``sum_t ||g_t||^2_{M^{-1}} / (2 s_t)``, a scalar in the metrics' dtype.
    scale: ``s_t`` of the last step added (0 before the first), the metrics' dtype;
      ``sum_t w_t = s_T``.
    weighted_shift: ``sum_t w_t (theta_t - theta_1)``, a tree with the params'
      structure (leaves in the params' dtype promoted with the metrics').
    shift_terms: ``sum_t w_t ||theta_t - theta_1||^2_M / 2``, a scalar.
    grads: gradient w.r.t. the operators of ``step_terms + shift_terms``, with the
      structure of the operators (``None`` when no meta-gradient is accumulated).
  """

  step_terms: Array
  scale: Array
  weighted_shift: PyTree
  shift_terms: Array
  grads: PyTree | None


def init_adaptive_sums(operators: PyTree, params: PyTree, *,
                       meta_gradient: bool = False) -> AdaptiveSums:
  """Zero sums for :func:`add_adaptive_step` (``params``: ``theta_1``, for the shapes)."""
  dtype = jnp.result_type(*jax.tree.leaves(operators))
  zero = jnp.zeros((), dtype)
  shift = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p, dtype)), params)
  grads = jax.tree.map(jnp.zeros_like, operators) if meta_gradient else None
  return AdaptiveSums(zero, zero, shift, zero, grads)


def add_adaptive_step(sums: AdaptiveSums, operators: PyTree, params: PyTree, grads: PyTree,
                      scale: Array, init_params: PyTree, *, adjoint: str = 'auto',
                      solver='exact', **solver_options) -> AdaptiveSums:
  """Add step ``t`` (``theta_t``, ``g_t``, ``s_t``) to the streamed adaptive bound.

  The step itself (``theta_{t+1} = theta_t - M^{-1} g_t / s_t``) is taken by the caller,
  which computes ``s_t`` from ``M^{-1} g_t`` first (:func:`metamd_jax.adaptive.update_scale`).

  Args:
    sums: the running sums (:func:`init_adaptive_sums`).
    operators: the materialised metrics.
    params: ``theta_t`` (data).
    grads: ``g_t`` (data).
    scale: ``s_t`` (data).
    init_params: ``theta_1``.
    adjoint: how the step term is differentiated (see :func:`adaptive_step_term`).
    solver: adjoint solver of the mirror step.
    **solver_options: options of a matrix-free solver.

  Returns:
    The updated sums.
  """
  adjoint = resolve_adjoint(adjoint, solver, **solver_options)
  dtype = sums.step_terms.dtype
  scale = jax.lax.stop_gradient(jnp.asarray(scale, dtype))
  weight = scale - sums.scale
  shift = jax.tree.map(lambda p, p1: jax.lax.stop_gradient(p - p1), params, init_params)

  def terms(operators):
    step = adaptive_step_term(operators, params, grads, scale, adjoint=adjoint,
                              solver=solver, **solver_options)
    shift_term = distance_term(operators, params, init_params)
    return step.astype(dtype), (weight * shift_term).astype(dtype)

  if sums.grads is None:
    step, shift_term = terms(operators)
    term_grad = None
  else:
    (step, shift_term), vjp = jax.vjp(terms, operators)
    one = jnp.ones((), dtype)
    term_grad = jax.tree.map(jnp.add, sums.grads, vjp((one, one))[0])
  weighted_shift = jax.tree.map(lambda a, d: a + (weight * d).astype(a.dtype),
                                sums.weighted_shift, shift)
  return AdaptiveSums(sums.step_terms + step, scale, weighted_shift,
                      sums.shift_terms + shift_term, term_grad)


def finish_adaptive(sums: AdaptiveSums, operators: PyTree, final_params: PyTree,
                    init_params: PyTree, num_steps: int) -> tuple[Array, Array, PyTree | None]:
  """The adaptive bound from the streamed sums and the two end points.

  Args:
    sums: the sums after ``num_steps`` calls of :func:`add_adaptive_step`.
    operators: the materialised metrics.
    final_params: ``theta_{T+1}``, the comparator (held constant).
    init_params: ``theta_1``.
    num_steps: ``T``.

  Returns:
    ``(bound, distance, grad)``: ``distance`` is
    ``1/2 sum_t w_t ||u - theta_t||^2_M`` and ``grad`` the bound's gradient w.r.t.
    ``operators`` (``None`` unless the sums accumulate gradients).
  """
  dtype = sums.step_terms.dtype
  offset = jax.tree.map(lambda u, p1: jax.lax.stop_gradient(u - p1), final_params, init_params)
  weighted_shift = jax.lax.stop_gradient(sums.weighted_shift)

  def end_terms(operators):
    # 1/2 s_T ||D||^2_M - <M D, sum_t w_t d_t>, with D = u - theta_1.
    moved = divergence_lib.apply_metric(operators, offset)
    cross = sum(jnp.vdot(m, s.astype(m.dtype)) for m, s in
                zip(jax.tree.leaves(moved), jax.tree.leaves(weighted_shift)))
    full = distance_term(operators, final_params, init_params)
    return (sums.scale * full - cross).astype(dtype)

  if sums.grads is None:
    distance = end_terms(operators) + sums.shift_terms
    grad = None
  else:
    end, end_grad = jax.value_and_grad(end_terms)(operators)
    distance = end + sums.shift_terms
    grad = jax.tree.map(lambda a, b: (a + b) / num_steps, end_grad, sums.grads)
  return from_terms(distance, sums.step_terms, num_steps), distance, grad
