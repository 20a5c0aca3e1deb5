"""Meta-objectives: the convergence-rate bound (implicit) and the unrolled training loss.

The bound itself (its terms, the bound of a stored trajectory and the streaming sums) is
:mod:`metamd_jax.bound`; ``objective='bound'`` streams it with
:func:`metamd_jax.inner_loop.rollout`, and ``objective='adaptive_bound'`` streams the
adaptive-mirror-descent bound of :mod:`metamd_jax.adaptive` (the metric ``s_t M`` with a
non-decreasing online scale) with :func:`metamd_jax.inner_loop.adaptive_rollout`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metamd_jax import bound, inner_loop, mirror
from metamd_jax.tasks.base import Task, batches_of, check_num_steps
from metamd_jax.types import Array, PyTree

OBJECTIVES = ('bound', 'unrolled', 'adaptive_bound')


def unrolled_loss(divergence: PyTree, task: Task, num_steps: int, *,
                  params: PyTree | None = None) -> tuple[Array, Array]:
  """Training loss after ``num_steps`` mirror steps, differentiable through the unroll.

  The usual learned-optimiser objective: back-propagation goes through every step
  (including through the gradients' dependence on earlier steps), so memory grows
  linearly with ``num_steps``. The loss is measured on the next training batch.

  Returns:
    ``(final_loss, losses)`` with ``losses`` the ``(T,)`` training losses on the way.

  Raises:
    ValueError: if ``num_steps`` is not a positive integer.
  """
  num_steps = check_num_steps(num_steps)
  init_params = task.init() if params is None else params

  batch = batches_of(task, num_steps)  # steps 0 .. T - 1; the final loss takes batch T

  def body(params, step):
    loss, grads = jax.value_and_grad(task.loss)(params, batch(step))
    return mirror.mirror_step(divergence, params, grads), loss

  final_params, losses = jax.lax.scan(body, init_params,
                                      jnp.arange(num_steps, dtype=jnp.int32))
  return task.loss(final_params, task.batch(jnp.asarray(num_steps, jnp.int32))), losses


class MetaGradient(NamedTuple):
  """A meta-objective's value and gradient on one task, and the inner losses."""

  loss: Array
  grad: PyTree
  losses: Array
  final_loss: Array


def meta_gradient(divergence: PyTree, task: Task, num_steps: int, *,
                  objective: str = 'bound', params: PyTree | None = None,
                  adjoint: str = 'auto', solver='exact', reference_norm: float | None = None,
                  decay: float = 0.9, **solver_options) -> MetaGradient:
  """The meta-objective and its gradient w.r.t. the divergence on one task.

  Args:
    divergence: the current divergence.
    task: the task.
    num_steps: the inner horizon ``T``.
    objective: ``'bound'`` (the convergence-rate bound, implicit meta-gradient, memory
      constant in ``T``), ``'unrolled'`` (training loss after ``T`` steps,
      back-propagated through the unroll, memory linear in ``T``) or
      ``'adaptive_bound'`` (the adaptive-mirror-descent bound of adaptive MetaMD, the
      metric ``s_t M``, with iterates, gradients and scales as data; memory constant in
      ``T``; equal to ``'bound'`` when ``reference_norm`` is ``None``).
    params: initial parameters (``task.init()`` if ``None``).
    adjoint: ``'auto'`` (the default: ``'statistics'`` with ``solver='exact'``, else
      ``'implicit'``), ``'implicit'`` or ``'statistics'`` (``solver='exact'`` only); bound
      objectives, see :func:`metamd_jax.rollout` and
      :func:`metamd_jax.bound.resolve_adjoint`. Checked for every objective.
    solver: adjoint solver of the mirror step (bound objectives).
    reference_norm: ``'adaptive_bound'`` only: the in-distribution level of
      ``||g||_{M^{-1}}`` (see :func:`metamd_jax.adaptive.reference_gradient_norm`);
      ``None`` or ``inf``: the scale stays 1. Through
      :func:`metamd_jax.meta_train.make_meta_step` it is passed in ``solver_options``.
    decay: ``'adaptive_bound'`` only: the decay of the scale's moving average.
    **solver_options: options of a matrix-free solver.

  Returns:
    A :class:`MetaGradient`.
  """
  adjoint = bound.resolve_adjoint(adjoint, solver)
  num_steps = check_num_steps(num_steps)
  if objective != 'adaptive_bound' and reference_norm is not None:
    raise ValueError(f"reference_norm is an option of objective='adaptive_bound', not of "
                     f'{objective!r}.')
  if objective == 'adaptive_bound':
    result = inner_loop.adaptive_rollout(divergence, task, num_steps, reference_norm,
                                         decay=decay, params=params, meta_gradient=True,
                                         adjoint=adjoint, solver=solver, **solver_options)
    final_loss = task.loss(result.final_params,
                           task.batch(jnp.asarray(num_steps, jnp.int32)))
    return MetaGradient(result.bound, result.meta_grad, result.losses, final_loss)
  if objective == 'bound':
    result = inner_loop.rollout(divergence, task, num_steps, params=params,
                                meta_gradient=True, adjoint=adjoint, solver=solver,
                                **solver_options)
    final_loss = task.loss(result.final_params,
                           task.batch(jnp.asarray(num_steps, jnp.int32)))
    return MetaGradient(result.bound, result.meta_grad, result.losses, final_loss)
  if objective == 'unrolled':
    (loss, losses), grad = jax.value_and_grad(
        lambda d: unrolled_loss(d, task, num_steps, params=params), has_aux=True)(divergence)
    return MetaGradient(loss, grad, losses, loss)
  raise ValueError(f'unknown objective {objective!r}; expected one of {OBJECTIVES}.')



