"""Adaptive MetaMD: a learned divergence with an online, non-decreasing scale.

A frozen learned divergence has fixed step sizes: where the curvature at meta-test time
is higher than in meta-training (another input scale, standardised inputs, smaller
batches) its steps are too long and training diverges. Adaptive mirror descent
(METHOD.md section 7) lets the divergence change during a run and keeps a regret bound
as long as it only grows. Here the time-varying metric is the learned one times a
scalar,

.. math::

  M_t = s_t M, \\qquad
  n_t = \\|g_t\\|^2_{M^{-1}} = \\langle g_t, M^{-1} g_t \\rangle, \\qquad
  v_t = \\beta v_{t-1} + (1 - \\beta) n_t, \\qquad
  \\hat v_t = \\frac{v_t}{1 - \\beta^t},

.. math::

  s_t = \\max\\Big(s_{t-1}, \\frac{\\sqrt{\\hat v_t}}{c}\\Big), \\quad s_0 = 1,
  \\qquad \\theta_{t+1} = \\theta_t - M_t^{-1} g_t = \\theta_t - \\frac{M^{-1} g_t}{s_t},

with ``M`` the learned (frozen) Kronecker metric, ``beta`` the ``decay`` and ``c`` the
``reference_norm``: the gradient level, measured in the learned geometry, that counts
as in distribution (calibrate it on meta-training tasks with
:func:`reference_gradient_norm`). While the gradients stay at or below that level
``s_t = 1`` and the optimiser is exactly frozen MetaMD; under larger gradients (higher
curvature, another input scale, or the growing oscillation that precedes divergence)
the step shrinks. Since ``s_t`` never decreases, ``M_t`` only grows.

By default one scale for the whole model (the literal ``M_t = s_t M``): the relative
step sizes of the layers are part of what was meta-learned. With ``per_leaf=True`` each
leaf (layer kernel, bias) ``l`` has its own scale ``s^l_t`` and its own level ``c^l``
(calibrated per leaf by ``reference_gradient_norm(..., per_leaf=True)``), so in
distribution every ``s^l_t = 1`` and the learned balance is kept, while a change that
raises the gradients of one layer only (rescaled or offset inputs reach the first layer's
gradient ``x delta^T``) shortens that layer's steps and leaves the others at their
learned length. The metric is then block diagonal, ``M_t = diag_l(s^l_t M^l)``, still
non-decreasing, and the bound below holds block by block:
``Regret_T <= 1/2 sum_l s^l_T D_l^2 + 1/2 sum_t ||g_t||^2_{M^{-1}}`` with ``D_l`` the
comparator distance of leaf ``l`` in ``M^l``.

The guarantee. For convex losses ``f_t``, any comparator ``u``, and any scales with
``s_t >= 1`` non-decreasing (which the rule above ensures), adaptive mirror descent with
the quadratic potentials ``phi_t = s_t phi`` satisfies (Duchi, Hazan & Singer 2011;
McMahan 2017)

.. math::

  \\sum_{t=1}^T f_t(\\theta_t) - f_t(u) \\le \\sum_t \\langle g_t, \\theta_t - u \\rangle
  \\le \\tfrac12 s_1 \\|u - \\theta_1\\|^2_M
      + \\tfrac12 \\sum_{t \\ge 2} (s_t - s_{t-1}) \\|u - \\theta_t\\|^2_M
      + \\tfrac12 \\sum_t \\frac{\\|g_t\\|^2_{M^{-1}}}{s_t},

and with ``||u - theta_t||_M <= D_M`` for all ``t`` the middle sum telescopes, so

.. math::

  \\mathrm{Regret}_T \\le \\tfrac12 s_T D_M^2 + \\tfrac12 \\sum_t \\|g_t\\|^2_{M^{-1}},

at most the bound of frozen MetaMD with the metric ``s_T M`` (whose gradient term is
``1/(2 s_T) sum_t ||g_t||^2_{M^{-1}}`` and smaller: the adaptive run pays at most the
frozen gradient term ``1/2 sum_t ||g_t||^2_{M^{-1}}``). If ``||g_t||_{M^{-1}} <= G_M``
then ``hat v_t <= G_M^2`` and ``s_T <= max(1, G_M / c)``. The potential ``s_t phi`` is
``s_t sigma``-strongly convex with ``s_t sigma >= sigma >= eps**2``: the floor of the
learned family still holds. :func:`metamd_jax.bound.adaptive_regret_bound` is the right
hand side divided by ``T``, and is a meta-objective of the same kind as the frozen bound
(``objective='adaptive_bound'`` in :func:`metamd_jax.meta_gradient`).

Cost per step, against :func:`metamd_jax.metamd`: one inner product per leaf
(``<G, P G Q>``, two flops per parameter, on the direction ``P G Q`` computed anyway),
one scalar reduction over the leaves, a few scalar operations (moving average, bias
correction, square root, maximum) and one multiplication per parameter by ``1 / s_t``;
the state grows by three scalars. Adam, for comparison, does about ten elementwise
operations per parameter and keeps two parameter-sized buffers; MetaMD's two matrix
products per Kronecker leaf and its cached ``P``, ``Q`` are unchanged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from metamd_jax import divergence as divergence_lib
from metamd_jax import transform, tree_utils
from metamd_jax.tasks.base import Task, TaskFamily, batches_of, check_num_steps
from metamd_jax.types import Array, PyTree

__all__ = [
    'ScaleByAdaptiveMirrorDescentState',
    'adaptive_metamd',
    'check_decay',
    'check_reference_norm',
    'check_reference_norms',
    'direction_and_squared_norm',
    'divide_leaves',
    'gradient_levels',
    'real_number',
    'reference_gradient_norm',
    'scale_by_adaptive_mirror_descent',
    'update_scale',
]


# ---------------------------------------------------------------------------
# The online scale.
# ---------------------------------------------------------------------------


def real_number(value: Any, name: str, expected: str) -> float | None:
  """``float(value)``, or ``None`` for a traced value (checked by its caller).

  Raises:
    TypeError: naming ``name`` and ``expected`` if ``value`` is not a real number (a
      bool, a string and ``None`` are not).
  """
  if isinstance(value, (bool, np.bool_, str)) or value is None:
    raise TypeError(f'{name} must be {expected}, got {value!r}.')
  try:
    return float(value)
  except jax.errors.ConcretizationTypeError:
    return None
  except (TypeError, ValueError) as error:
    raise TypeError(f'{name} must be {expected}, got {value!r}.') from error


def check_reference_norm(reference_norm: Any) -> float | Array | None:
  """Validate ``reference_norm``: positive and finite, or ``None`` / ``inf`` (never adapt).

  Traced values (e.g. under ``optax.inject_hyperparams`` in a jitted update) cannot be
  inspected and are returned as they are.

  Returns:
    ``None`` for ``None`` or ``+inf`` (the scale stays 1), else ``reference_norm``.

  Raises:
    TypeError: if ``reference_norm`` is not a real number (a bool is not one).
    ValueError: if it is zero, negative or NaN.
  """
  if reference_norm is None:
    return None
  value = real_number(reference_norm, 'reference_norm', 'a positive float or None')
  if value is None:
    return reference_norm  # Traced: checked by the caller.
  if value == math.inf:
    return None
  if not (math.isfinite(value) and value > 0):
    raise ValueError(
        f'reference_norm must be positive and finite (or None / inf: never adapt), got '
        f'{reference_norm!r}; calibrate it with reference_gradient_norm.')
  return reference_norm


def check_reference_norms(reference_norm: Any) -> float | np.ndarray | Array | None:
  """Validate the levels of a per-leaf scale: one number (every leaf) or one per leaf.

  A sequence or 1-D array holds one level per leaf, in ``jax.tree.leaves`` order of the
  parameters (what ``reference_gradient_norm(..., per_leaf=True)`` returns); ``inf``
  entries never adapt their leaf. A single number is checked by
  :func:`check_reference_norm` and applies to every leaf. Traced arrays are returned as
  they are.

  Raises:
    TypeError: if an entry is not a real number.
    ValueError: if the array is not 1-D and non-empty, or an entry is zero, negative or
      NaN.
  """
  if reference_norm is None or np.ndim(reference_norm) == 0:
    return check_reference_norm(reference_norm)
  if isinstance(reference_norm, jax.core.Tracer):
    return reference_norm
  try:
    values = np.asarray(reference_norm, np.float64)
  except (TypeError, ValueError) as error:
    raise TypeError('reference_norm must hold one positive float per leaf, got '
                    f'{reference_norm!r}.') from error
  if values.ndim != 1 or values.size == 0:
    raise ValueError('reference_norm must be a number or a non-empty 1-D sequence (one '
                     f'level per leaf), got shape {values.shape}.')
  bad = [i for i, v in enumerate(values) if not v > 0]  # NaN, zero and negatives
  if bad:
    raise ValueError(f'reference_norm entries {bad} are not positive (NaN, zero or '
                     'negative); calibrate with reference_gradient_norm(..., per_leaf=True).')
  return values


def check_decay(decay: Any) -> float | Array:
  """Validate the moving-average ``decay``: a float in ``[0, 1)``.

  Traced values (e.g. under ``optax.inject_hyperparams`` in a jitted update) are
  returned as they are.

  Raises:
    TypeError: if ``decay`` is not a real number (a bool is not one).
    ValueError: if it is outside ``[0, 1)``.
  """
  value = real_number(decay, 'decay', 'a float in [0, 1)')
  if value is None:
    return decay
  if not 0 <= value < 1:
    raise ValueError(f'decay must be in [0, 1), got {decay!r}.')
  return value


def update_scale(count: Array, norm_average: Array, scale: Array, squared_norm: Array, *,
                 reference_norm: float | Array | None, decay: float
                 ) -> tuple[Array, Array, Array]:
  """One step of the online scale: moving average, bias correction, running maximum.

  .. math::

    v_t = \\beta v_{t-1} + (1 - \\beta) n_t, \\qquad
    s_t = \\max\\Big(s_{t-1}, \\sqrt{v_t / (1 - \\beta^t)} / c\\Big).

  Shared by :func:`scale_by_adaptive_mirror_descent` and
  :func:`metamd_jax.inner_loop.adaptive_rollout`, so that both take the same steps.

  Args:
    count: ``t - 1``, int32 ``()``.
    norm_average: ``v_{t-1}`` (not bias-corrected), a float scalar.
    scale: ``s_{t-1}``, a float scalar (1 before the first step).
    squared_norm: ``n_t = <g_t, M^{-1} g_t>``.
    reference_norm: ``c`` (validated by :func:`check_reference_norm`); ``None``: the
      scale stays ``s_{t-1}``.
    decay: ``beta`` in ``[0, 1)``.

  Returns:
    ``(t, v_t, s_t)`` with the dtypes of the inputs.
  """
  count = optax.safe_increment(count)
  squared_norm = squared_norm.astype(norm_average.dtype)
  norm_average = decay * norm_average + (1 - decay) * squared_norm
  if reference_norm is None:
    return count, norm_average, scale
  correction = 1 - decay ** count.astype(norm_average.dtype)
  level = jnp.sqrt(norm_average / correction)
  scale = jnp.maximum(scale, (level / reference_norm).astype(scale.dtype))
  return count, norm_average, scale


def direction_and_squared_norm(inverse: PyTree, grads: PyTree, *, per_leaf: bool = False
                               ) -> tuple[PyTree, Array]:
  """``(M^{-1} g, <g, M^{-1} g>)`` in the metrics' dtype.

  Args:
    inverse: the cached inverse metrics (:func:`metamd_jax.divergence.preconditioner`)
      or the full operators.
    grads: ``g``; ``optax.MaskedNode`` leaves pass through and add nothing to the norm.
    per_leaf: return the squared norm of every leaf, ``(L,)`` in ``jax.tree.leaves``
      order, instead of their sum.

  Returns:
    The direction (a tree like ``grads``, leaves in the metrics' dtype) and the scalar
    squared dual norm ``||g||^2_{M^{-1}}`` (one inner product per leaf), or the ``(L,)``
    per-leaf terms.
  """
  direction = tree_utils.map_metrics(lambda p, g: p.solve(g), inverse, grads,
                                     is_leaf=divergence_lib.is_metric_or_operator,
                                     name='updates')
  # MaskedNode leaves are empty subtrees: both flattenings skip them alike.
  terms = [jnp.vdot(g.astype(d.dtype), d) for g, d in
           zip(jax.tree.leaves(grads), jax.tree.leaves(direction))]
  if per_leaf:
    return direction, jnp.stack(terms) if terms else jnp.zeros((0,))
  return direction, sum(terms[1:], terms[0]) if terms else jnp.zeros(())


def divide_leaves(grads: PyTree, direction: PyTree, scale: Array) -> PyTree:
  """``direction / scale`` in the dtype of ``grads``: one scale, or one per leaf."""
  if scale.ndim == 0:
    return jax.tree.map(lambda g, d: (d / scale).astype(g.dtype), grads, direction)
  leaves, treedef = jax.tree.flatten(grads)
  return treedef.unflatten([(d / scale[i]).astype(g.dtype) for i, (g, d) in
                            enumerate(zip(leaves, jax.tree.leaves(direction)))])


# ---------------------------------------------------------------------------
# The optax transformation.
# ---------------------------------------------------------------------------


class ScaleByAdaptiveMirrorDescentState(NamedTuple):
  """State of :func:`scale_by_adaptive_mirror_descent`.

  Attributes:
    preconditioner: the cached inverse metric of every leaf, as in
      :class:`metamd_jax.ScaleByMirrorDescentState` (``P``, ``Q`` per Kronecker leaf,
      the inverse values per diagonal or scalar leaf), computed once at ``init``.
    count: number of updates taken, int32 ``()`` (``optax.safe_increment``).
    norm_average: ``v_t``, the moving average of ``<g, M^{-1} g>`` before bias
      correction, ``()`` in the metric's dtype (0 at ``init``); ``(L,)``, one per leaf in
      ``jax.tree.leaves`` order, with ``per_leaf=True``.
    scale: ``s_t >= 1``, the online scale of the metric, ``()`` in the metric's dtype
      (1 at ``init``; ``(L,)`` with ``per_leaf=True``); never decreases.
  """

  preconditioner: PyTree
  count: Array
  norm_average: Array
  scale: Array


def scale_by_adaptive_mirror_descent(
    divergence: PyTree,
    reference_norm: Any,
    *,
    decay: float = 0.9,
    per_leaf: bool = False,
) -> optax.GradientTransformation:
  """Map gradients to the adaptive mirror-descent direction ``M^{-1} g / s_t``.

  .. math::

    n_t = \\langle g_t, M^{-1} g_t \\rangle, \\quad
    v_t = \\beta v_{t-1} + (1 - \\beta) n_t, \\quad
    s_t = \\max\\Big(s_{t-1}, \\frac{\\sqrt{v_t / (1 - \\beta^t)}}{c}\\Big), \\quad
    u_t = \\frac{M^{-1} g_t}{s_t},

  with ``s_0 = 1``: the direction of the metric ``M_t = s_t M`` (see the module
  docstring for the regret bound it keeps). The direction has the sign of the gradient;
  follow with ``optax.scale_by_learning_rate`` or use :func:`adaptive_metamd`. The
  inverse factors are computed once in ``init``; each ``update`` is the two matrix
  products per Kronecker leaf of :func:`metamd_jax.scale_by_mirror_descent` plus one
  inner product per leaf and a few scalar operations. Use ``optax.apply_if_finite`` to
  keep a non-finite gradient out of the state (a NaN in ``v_t`` stays there).

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence` (learned or not).
    reference_norm: ``c > 0``, the in-distribution level of ``||g||_{M^{-1}}`` (see
      :func:`reference_gradient_norm`). ``None`` or ``inf``: never adapt (exactly
      :func:`metamd_jax.scale_by_mirror_descent`).
    decay: ``beta`` in ``[0, 1)``, the decay of the moving average of
      ``||g||^2_{M^{-1}}`` (0: ``s_t`` is the running maximum of ``||g_t||_{M^{-1}} / c``).
    per_leaf: one scale per leaf, ``s^l_t`` from ``||g^l_t||_{(M^l)^{-1}}`` and the
      leaf's level ``c^l`` (see the module docstring); ``reference_norm`` is then one
      level per leaf in ``jax.tree.leaves`` order (from
      ``reference_gradient_norm(..., per_leaf=True)``) or one for all.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    TypeError: if ``reference_norm`` or ``decay`` is not a number.
    ValueError: if ``reference_norm`` is zero, negative or NaN, or ``decay`` is outside
      ``[0, 1)``; with ``per_leaf``, at ``init`` if the number of levels is not the
      number of leaves.
  """
  divergence_lib.check_divergence(divergence)
  if not isinstance(per_leaf, bool):
    raise TypeError(f'per_leaf must be True or False, got {per_leaf!r}.')
  reference_norm = (check_reference_norms(reference_norm) if per_leaf
                    else check_reference_norm(reference_norm))
  decay = check_decay(decay)

  def init_fn(params):
    divergence_lib.check_structure(divergence, params)
    # Once, when init is traced, for a concrete divergence (as metamd_jax.metamd does).
    with jax.ensure_compile_time_eval():
      inverse = divergence_lib.preconditioner(divergence)
    dtype = jnp.result_type(*jax.tree.leaves(inverse))
    shape = ()
    if per_leaf:
      shape = (len(jax.tree.leaves(params)),)
      if np.ndim(reference_norm) == 1 and np.shape(reference_norm) != shape:
        raise ValueError(f'reference_norm has {np.shape(reference_norm)[0]} levels for '
                         f'{shape[0]} parameter leaves (per_leaf=True: one per leaf, in '
                         'jax.tree.leaves order).')
    return ScaleByAdaptiveMirrorDescentState(
        preconditioner=inverse, count=jnp.zeros((), jnp.int32),
        norm_average=jnp.zeros(shape, dtype), scale=jnp.ones(shape, dtype))

  def update_fn(updates, state, params=None):
    del params
    direction, squared_norm = direction_and_squared_norm(state.preconditioner, updates,
                                                         per_leaf=per_leaf)
    count, norm_average, scale = update_scale(
        state.count, state.norm_average, state.scale, squared_norm,
        reference_norm=reference_norm, decay=decay)
    updates = divide_leaves(updates, direction, scale)
    return updates, ScaleByAdaptiveMirrorDescentState(state.preconditioner, count,
                                                      norm_average, scale)

  return optax.GradientTransformation(init_fn, update_fn)


def adaptive_metamd(
    divergence: PyTree,
    reference_norm: Any,
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    decay: float = 0.9,
    per_leaf: bool = False,
) -> optax.GradientTransformation:
  """Adaptive MetaMD: ``-learning_rate * M^{-1} g / s_t`` with a non-decreasing ``s_t``.

  :func:`metamd_jax.metamd` with the metric ``M_t = s_t M`` (see
  :func:`scale_by_adaptive_mirror_descent` and the module docstring): exactly MetaMD
  while ``||g||_{M^{-1}}`` stays at or below ``reference_norm``, shorter steps when the
  gradients, measured in the learned geometry, grow beyond it. It keeps the
  adaptive-mirror-descent regret bound; ``s_T <= max(1, G_M / reference_norm)`` when
  ``||g||_{M^{-1}} <= G_M``.

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence`.
    reference_norm: the in-distribution level of ``||g||_{M^{-1}}``, from
      :func:`reference_gradient_norm` on meta-training tasks; ``None`` or ``inf``: never
      adapt (exactly :func:`metamd_jax.metamd`).
    learning_rate: a positive float or an optax schedule; multiplies the step (a
      constant ``lr`` makes the metric ``s_t M / lr``: the bound holds with ``M / lr``
      in place of ``M``; a schedule that grows breaks the monotonicity of ``M_t``).
    decay: decay of the moving average of ``||g||^2_{M^{-1}}``, in ``[0, 1)``.
    per_leaf: one scale and one level per leaf (see
      :func:`scale_by_adaptive_mirror_descent`); ``reference_norm`` then comes from
      ``reference_gradient_norm(..., per_leaf=True)``.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax, metamd_jax
    >>> params = {'w': jnp.ones((4, 3))}
    >>> divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
    >>> optimizer = metamd_jax.adaptive_metamd(divergence, reference_norm=0.5)
    >>> state = optimizer.init(params)
    >>> updates, state = optimizer.update({'w': jnp.full((4, 3), 10.0)}, state, params)
    >>> round(float(state[0].scale), 3)  # ||g||_{M^{-1}} / 0.5 = sqrt(0.1 * 12 * 100) / 0.5
    21.909

  References:
    Duchi, Hazan & Singer (2011), `Adaptive subgradient methods for online learning and
    stochastic optimization`; McMahan (2017), `A survey of algorithms and analysis for
    adaptive online learning`; Reddi, Kale & Kumar (2018), `On the convergence of Adam
    and beyond` (the running maximum).
  """
  transform.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_adaptive_mirror_descent(divergence, reference_norm, decay=decay,
                                       per_leaf=per_leaf),
      optax.scale_by_learning_rate(learning_rate),
  )


# ---------------------------------------------------------------------------
# Calibration on meta-training tasks.
# ---------------------------------------------------------------------------


def gradient_levels(divergence: PyTree, task: Task, num_steps: int, *, decay: float = 0.9,
                    params: PyTree | None = None, per_leaf: bool = False) -> Array:
  """``sqrt(hat v_t)``, ``t = 1..T``, along a run of the frozen divergence on ``task``.

  The level that ``s_t = level_t / c`` compares with the reference ``c``: the
  bias-corrected moving average of ``||g_t||^2_{M^{-1}}`` along frozen MetaMD
  (``theta_{t+1} = theta_t - M^{-1} g_t``), square-rooted.

  Args:
    divergence: the divergence (frozen).
    task: a :class:`metamd_jax.Task`.
    num_steps: the horizon ``T``.
    decay: the moving average's decay (that of the adaptive optimiser).
    params: initial parameters (``task.init()`` if ``None``).
    per_leaf: the level of every leaf (``||g^l_t||_{(M^l)^{-1}}`` averaged alike).

  Returns:
    ``(T,)`` levels in the metric's dtype; ``(T, L)`` with ``per_leaf``.
  """
  return _frozen_run(divergence, task, num_steps, decay=decay, params=params,
                     per_leaf=per_leaf)[1]


def _frozen_run(divergence: PyTree, task: Task, num_steps: int, *, decay: float,
                params: PyTree | None, per_leaf: bool) -> tuple[PyTree, Array]:
  """:func:`gradient_levels`'s run: ``(final parameters, levels)``."""
  decay = check_decay(decay)
  init_params = task.init() if params is None else params
  divergence_lib.check_structure(divergence, init_params)
  inverse = divergence_lib.preconditioner(divergence)
  dtype = jnp.result_type(*jax.tree.leaves(inverse))

  shape = (len(jax.tree.leaves(init_params)),) if per_leaf else ()

  batch = batches_of(task, num_steps)

  def body(carry, step):
    params, count, norm_average = carry
    grads = jax.grad(task.loss)(params, batch(step))
    direction, squared_norm = direction_and_squared_norm(inverse, grads, per_leaf=per_leaf)
    count, norm_average, _ = update_scale(count, norm_average, jnp.ones(shape, dtype),
                                          squared_norm, reference_norm=None, decay=decay)
    level = jnp.sqrt(norm_average / (1 - decay ** count.astype(dtype)))
    params = jax.tree.map(lambda p, d: (p - d).astype(p.dtype), params, direction)
    return (params, count, norm_average), level

  carry = (init_params, jnp.zeros((), jnp.int32), jnp.zeros(shape, dtype))
  (final_params, _, _), levels = jax.lax.scan(body, carry,
                                              jnp.arange(num_steps, dtype=jnp.int32))
  return final_params, levels


def check_runs_train(start: ArrayLike, end: ArrayLike, num_steps: int) -> None:
  """Each calibration run's loss on its task's first batch ends below where it started.

  Raises:
    ValueError: naming how many of the runs end at or above their initial loss (NaN
      included): the levels of a run that does not train are no reference.
  """
  start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
  above = int(np.sum(~(end < start)))
  if above:
    raise ValueError(
        f'frozen MetaMD ends at or above its initial loss (on the task\'s first batch) on '
        f'{above} of {start.size} calibration tasks after {num_steps} steps: the levels of a '
        'run that does not train are no reference (calibrate a divergence that trains these '
        'tasks).')


def reference_gradient_norm(divergence: PyTree, family: TaskFamily, task_params: PyTree,
                            num_steps: int, *, quantile: float = 1.0,
                            decay: float = 0.9, per_leaf: bool = False,
                            require_training: bool = True
                            ) -> float | tuple[float, ...]:
  """The in-distribution gradient level ``c`` of a divergence, from meta-training tasks.

  Runs the frozen divergence for ``num_steps`` on each task of ``task_params`` (stacked
  samples of ``family``: meta-*training* tasks, never held-out ones), takes each task's
  peak level ``max_t sqrt(hat v_t)`` (:func:`gradient_levels`, the quantity the
  adaptive optimiser divides by ``c``), and returns the ``quantile`` of the peaks over
  the tasks. With the default ``quantile=1`` (the largest peak) the adaptive optimiser
  with the same ``decay`` takes exactly the steps of frozen MetaMD on every calibration
  task (``s_t = 1`` throughout), and adapts only where gradients exceed anything seen
  there; a lower quantile adapts earlier, on the calibration tasks' largest gradients
  too.

  Args:
    divergence: the (learned, frozen) divergence.
    family: the meta-training task family.
    task_params: stacked task parameters of the calibration tasks
      (``family.sample_batch``).
    num_steps: the horizon of the calibration runs (the meta-training horizon, or the
      horizon of meta-testing).
    quantile: in ``[0, 1]``; which quantile of the per-task peaks to return.
    decay: the moving average's decay (use that of the adaptive optimiser).
    per_leaf: calibrate every leaf's level ``c^l`` alike (the quantile over tasks of each
      leaf's peak), for ``adaptive_metamd(..., per_leaf=True)``. A leaf whose gradient is
      zero on every calibration task gets ``inf`` (it never adapts).
    require_training: require every calibration run to train its task: the loss on the
      task's first batch ends below where it started (in the same compiled runs). The
      peaks of a run that does not train only grow with its divergence: no reference.
      ``False``: the levels of any finite runs.

  Returns:
    ``c``, a positive Python float; with ``per_leaf``, a tuple of one per leaf in
    ``jax.tree.leaves`` order of the parameters.

  Raises:
    ValueError: on a bad ``quantile`` or ``num_steps``, if a calibration run is not
      finite (the frozen divergence diverges on its own meta-training tasks), or, with
      ``require_training`` (the default), ends at or above its initial loss.
  """
  num_steps = check_num_steps(num_steps)
  if not 0 <= quantile <= 1:
    raise ValueError(f'quantile must be in [0, 1], got {quantile}.')
  decay = check_decay(decay)

  if not isinstance(per_leaf, bool):
    raise TypeError(f'per_leaf must be True or False, got {per_leaf!r}.')

  if not isinstance(require_training, bool):
    raise TypeError(f'require_training must be True or False, got {require_training!r}.')
  divergence_lib.check_divergence(divergence)  # a non-finite factor named, not a "diverged" run
  family.count_tasks(task_params)  # stacked tasks, else a clear error

  @jax.jit
  def peaks(divergence, task_params):
    def one(tp):
      task = family.task(tp)
      init = task.init()
      final, levels = _frozen_run(divergence, task, int(num_steps), decay=decay,
                                  params=init, per_leaf=per_leaf)
      first = task.batch(0)
      return jnp.max(levels, axis=0), task.loss(init, first), task.loss(final, first)

    return jax.vmap(one)(task_params)

  values, start, end = (np.asarray(x, np.float64) for x in peaks(divergence, task_params))
  bad = int(np.sum(~np.all(np.isfinite(values.reshape(len(values), -1)), axis=1)))
  if bad:
    raise ValueError(
        f'the frozen divergence diverges on {bad} of {len(values)} calibration tasks; '
        'the in-distribution gradient level is undefined (calibrate on tasks it trains).')
  if require_training:
    check_runs_train(start, end, num_steps)
  if per_leaf:
    levels = np.quantile(values, quantile, axis=0)
    if not np.any(levels > 0):
      raise ValueError('every calibration gradient is zero; reference_norm must be positive.')
    return tuple(float(c) if c > 0 else math.inf for c in levels)
  reference = float(np.quantile(values, quantile))
  if not reference > 0:
    raise ValueError('every calibration gradient is zero; reference_norm must be positive.')
  return reference
