"""The inner loop: T mirror steps on one task in a ``lax.scan``, streaming the bound.

The convergence-rate bound (METHOD.md section 2, step size folded into the divergence)

.. math::

  R(\\phi) = \\frac1T \\Big[ B_\\phi(\\theta^*, \\theta_1)
             + \\sum_{t=1}^T B_\\phi(\\theta_t, \\theta_{t+1}) \\Big]

needs only ``theta_1``, the final iterate ``theta* = theta_{T+1}`` and a running sum of
the per-step terms, so the rollout keeps memory constant in ``T``. With
``meta_gradient=True`` the carry also accumulates each step term's gradient with respect
to the divergence (the iterates and gradients are data: the regret view), so the
meta-gradient needs no stored trajectory either: through the implicit VJP of
:func:`metamd_jax.mirror_step` with a matrix-free adjoint solver, or, with the default
exact solver, as the same gradient from running statistics of the cached inverses
(``adjoint='auto'``, :func:`metamd_jax.bound.resolve_adjoint`). The terms and the running
sums are :mod:`metamd_jax.bound`'s; this module runs the task (its batches, gradients and
losses) around them.

:func:`adaptive_rollout` runs adaptive MetaMD instead (:mod:`metamd_jax.adaptive`: the
metric ``M_t = s_t M`` with a non-decreasing online scale) and streams the
adaptive-mirror-descent bound (:func:`metamd_jax.bound.adaptive_regret_bound`) the same
way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metamd_jax import adaptive
from metamd_jax import bound as bound_lib
from metamd_jax import divergence as divergence_lib
from metamd_jax.bound import ADJOINTS
from metamd_jax.tasks.base import Task, batches_of, check_num_steps
from metamd_jax.types import Array, PyTree

__all__ = ['ADJOINTS', 'AdaptiveRollout', 'Rollout', 'adaptive_rollout', 'rollout']


class Rollout(NamedTuple):
  """What a rollout returns.

  Attributes:
    final_params: ``theta_{T+1}``.
    losses: ``(T,)`` training loss at ``theta_t`` on batch ``t``.
    step_terms: ``sum_t B(theta_t, theta_{t+1})``.
    distance_term: ``B(theta_{T+1}, theta_1)``.
    bound: ``(distance_term + step_terms) / T``.
    meta_grad: gradient of ``bound`` w.r.t. the divergence (``None`` unless requested).
    trajectory: ``(params (T+1, ...), grads (T, ...))`` stacked (``None`` unless
      requested; memory linear in ``T``, for checks and plots only).
  """

  final_params: PyTree
  losses: Array
  step_terms: Array
  distance_term: Array
  bound: Array
  meta_grad: PyTree | None = None
  trajectory: tuple | None = None


def rollout(
    divergence: PyTree,
    task: Task,
    num_steps: int,
    *,
    params: PyTree | None = None,
    meta_gradient: bool = False,
    return_trajectory: bool = False,
    adjoint: str = 'auto',
    solver='exact',
    **solver_options,
) -> Rollout:
  """Run ``num_steps`` mirror steps on ``task`` and return the bound (and its gradient).

  The bound's terms and running sums are those of :mod:`metamd_jax.bound`.

  Args:
    divergence: the current divergence.
    task: the task (its ``init``, ``loss`` and ``batch``).
    num_steps: the horizon ``T`` (a Python int).
    params: initial parameters; ``task.init()`` if ``None``.
    meta_gradient: also accumulate the bound's gradient w.r.t. the divergence.
    return_trajectory: also return the stacked iterates and gradients.
    adjoint: how each step term is differentiated: ``'implicit'`` (the mirror step's
      ``custom_vjp``, any divergence and adjoint solver), ``'statistics'`` (the same
      gradient collapsed into running statistics: with the cached inverses ``P``, ``Q``
      the term is ``1/2 tr(G^T P G Q)``, whose gradients ``1/2 G Q G^T`` and
      ``1/2 G^T P G`` are accumulated and pulled back to the meta-parameters once;
      ``solver='exact'`` only, about 2x cheaper per step) or ``'auto'`` (the default:
      ``'statistics'`` with ``solver='exact'``, where both are exact, and ``'implicit'``
      with any other solver; see :func:`metamd_jax.bound.resolve_adjoint`).
    solver: adjoint solver of the mirror step (see :func:`metamd_jax.mirror_step`).
      ``'statistics'`` with another solver is a ``ValueError``.
    **solver_options: options of a matrix-free solver.

  Returns:
    A :class:`Rollout`.
  """
  num_steps = check_num_steps(num_steps)
  adjoint = bound_lib.resolve_adjoint(adjoint, solver, **solver_options)
  init_params = task.init() if params is None else params
  divergence_lib.check_divergence(divergence)
  divergence_lib.check_structure(divergence, init_params)
  loss_and_grad = jax.value_and_grad(task.loss)
  # Factors and their inverses once per run: every step is matrix products only.
  if meta_gradient:
    operators, pullback = jax.vjp(divergence_lib.operators, divergence)
  else:
    operators = divergence_lib.operators(divergence)

  batch = batches_of(task, num_steps)  # sampled once for the run where the task can

  def body(carry, step):
    params, sums = carry
    loss, grads = loss_and_grad(params, batch(step))
    new_params, sums = bound_lib.add_step(sums, operators, params, grads, adjoint=adjoint,
                                          solver=solver, **solver_options)
    return (new_params, sums), (loss, (params, grads) if return_trajectory else None)

  carry = (init_params, bound_lib.init_sums(operators, meta_gradient=meta_gradient))
  (final_params, sums), (losses, trajectory) = jax.lax.scan(
      body, carry, jnp.arange(num_steps, dtype=jnp.int32))

  bound, distance, grad = bound_lib.finish(sums, operators, final_params, init_params,
                                           num_steps)
  # One pull-back from the operators to the meta-parameters.
  meta_grad = pullback(grad)[0] if meta_gradient else None
  if return_trajectory:
    params_seq, grads_seq = trajectory
    params_seq = jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), params_seq,
                              final_params)
    trajectory = (params_seq, grads_seq)
  return Rollout(final_params=final_params, losses=losses, step_terms=sums.step_terms,
                 distance_term=distance, bound=bound, meta_grad=meta_grad,
                 trajectory=trajectory)


class AdaptiveRollout(NamedTuple):
  """What an adaptive rollout returns.

  Attributes:
    final_params: ``theta_{T+1}``.
    losses: ``(T,)`` training loss at ``theta_t`` on batch ``t``.
    scales: ``(T,)`` the online scales ``s_1 .. s_T`` (non-decreasing, ``>= 1``).
    step_terms: ``sum_t ||g_t||^2_{M^{-1}} / (2 s_t)``.
    distance_term: ``1/2 sum_t (s_t - s_{t-1}) ||theta_{T+1} - theta_t||^2_M``
      (``s_0 = 0``).
    bound: ``(distance_term + step_terms) / T``, the adaptive-MD regret bound over ``T``.
    meta_grad: gradient of ``bound`` w.r.t. the divergence (``None`` unless requested).
    trajectory: ``(params (T+1, ...), grads (T, ...))`` stacked (``None`` unless
      requested; memory linear in ``T``, for checks and plots only).
  """

  final_params: PyTree
  losses: Array
  scales: Array
  step_terms: Array
  distance_term: Array
  bound: Array
  meta_grad: PyTree | None = None
  trajectory: tuple | None = None


def adaptive_rollout(
    divergence: PyTree,
    task: Task,
    num_steps: int,
    reference_norm: float | None,
    *,
    decay: float = 0.9,
    params: PyTree | None = None,
    meta_gradient: bool = False,
    return_trajectory: bool = False,
    adjoint: str = 'auto',
    solver='exact',
    **solver_options,
) -> AdaptiveRollout:
  """Run ``num_steps`` adaptive MetaMD steps on ``task``; stream the adaptive bound.

  The steps are those of :func:`metamd_jax.adaptive.scale_by_adaptive_mirror_descent`
  with the same ``reference_norm`` and ``decay``:
  ``theta_{t+1} = theta_t - M^{-1} g_t / s_t``. The bound is
  :func:`metamd_jax.bound.adaptive_regret_bound` (iterates, gradients and scales are
  data), streamed with memory constant in ``T``; with ``meta_gradient=True`` its
  gradient w.r.t. the divergence is accumulated step by step. With
  ``reference_norm=None`` (``s_t = 1``) the steps and the bound are those of
  :func:`rollout`.

  Args:
    divergence: the current divergence.
    task: the task.
    num_steps: the horizon ``T`` (a Python int).
    reference_norm: ``c > 0``, the in-distribution level of ``||g||_{M^{-1}}``;
      ``None`` or ``inf``: never adapt.
    decay: decay of the moving average of ``||g||^2_{M^{-1}}``, in ``[0, 1)``.
    params: initial parameters; ``task.init()`` if ``None``.
    meta_gradient: also accumulate the bound's gradient w.r.t. the divergence.
    return_trajectory: also return the stacked iterates and gradients.
    adjoint: how each step term is differentiated: ``'auto'`` (the default),
      ``'implicit'`` or ``'statistics'`` (see :func:`rollout`).
    solver: adjoint solver of the mirror step.
    **solver_options: options of a matrix-free solver.

  Returns:
    An :class:`AdaptiveRollout`.
  """
  num_steps = check_num_steps(num_steps)
  adjoint = bound_lib.resolve_adjoint(adjoint, solver, **solver_options)
  reference_norm = adaptive.check_reference_norm(reference_norm)
  decay = adaptive.check_decay(decay)
  init_params = task.init() if params is None else params
  divergence_lib.check_divergence(divergence)
  divergence_lib.check_structure(divergence, init_params)
  loss_and_grad = jax.value_and_grad(task.loss)
  if meta_gradient:
    operators, pullback = jax.vjp(divergence_lib.operators, divergence)
  else:
    operators = divergence_lib.operators(divergence)
  dtype = jnp.result_type(*jax.tree.leaves(operators))

  batch = batches_of(task, num_steps)  # sampled once for the run where the task can

  def body(carry, step):
    params, count, norm_average, scale, sums = carry
    loss, grads = loss_and_grad(params, batch(step))
    # The transform's update: direction, squared dual norm, scale, step.
    direction, squared_norm = adaptive.direction_and_squared_norm(operators, grads)
    count, norm_average, scale = adaptive.update_scale(
        count, norm_average, scale, squared_norm, reference_norm=reference_norm, decay=decay)
    new_params = jax.tree.map(
        lambda p, g, d: (p - (d / scale).astype(g.dtype)).astype(p.dtype), params, grads,
        direction)
    sums = bound_lib.add_adaptive_step(sums, operators, params, grads, scale, init_params,
                                       adjoint=adjoint, solver=solver, **solver_options)
    outputs = (loss, scale, (params, grads) if return_trajectory else None)
    return (new_params, count, norm_average, scale, sums), outputs

  carry = (init_params, jnp.zeros((), jnp.int32), jnp.zeros((), dtype), jnp.ones((), dtype),
           bound_lib.init_adaptive_sums(operators, init_params, meta_gradient=meta_gradient))
  (final_params, *_, sums), (losses, scales, trajectory) = jax.lax.scan(
      body, carry, jnp.arange(num_steps, dtype=jnp.int32))

  bound, distance, grad = bound_lib.finish_adaptive(sums, operators, final_params,
                                                    init_params, num_steps)
  meta_grad = pullback(grad)[0] if meta_gradient else None
  if return_trajectory:
    params_seq, grads_seq = trajectory
    params_seq = jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), params_seq,
                              final_params)
    trajectory = (params_seq, grads_seq)
  return AdaptiveRollout(final_params=final_params, losses=losses, scales=scales,
                         step_terms=sums.step_terms, distance_term=distance, bound=bound,
                         meta_grad=meta_grad, trajectory=trajectory)
