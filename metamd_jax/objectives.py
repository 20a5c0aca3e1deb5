"""Meta-objectives: the convergence-rate bound (implicit) and the unrolled training loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metamd_jax import divergence as divergence_lib
from metamd_jax import inner_loop, mirror
from metamd_jax.tasks.base import Task

PyTree = Any

OBJECTIVES = ('bound', 'unrolled')


def regret_bound(divergence: PyTree, params_sequence: PyTree, grads_sequence: PyTree, *,
                 solver='exact', **solver_options) -> jax.Array:
  """The mirror-descent convergence-rate bound of a stored trajectory.

  .. math::

    R(\\phi) = \\frac1T \\Big[ B_\\phi(\\mathrm{sg}(\\theta_{T+1}), \\theta_1)
      + \\sum_{t=1}^T B_\\phi(\\theta_t, \\mathrm{MD}_\\phi(\\theta_t, g_t)) \\Big]

  The comparator is the final iterate under stop-gradient; iterates and gradients are
  data; each step term is differentiated through the mirror step's implicit VJP. No
  validation data is involved.

  Args:
    divergence: the divergence.
    params_sequence: iterates ``theta_1 .. theta_{T+1}`` stacked on a leading axis.
    grads_sequence: gradients ``g_1 .. g_T`` stacked on a leading axis.
    solver: adjoint solver of the mirror step.
    **solver_options: options of a matrix-free solver.

  Returns:
    The scalar bound.
  """
  num_steps = jax.tree.leaves(grads_sequence)[0].shape[0]
  lengths = {x.shape[0] for x in jax.tree.leaves(params_sequence)}
  if lengths != {num_steps + 1}:
    raise ValueError(f'params_sequence must hold T + 1 = {num_steps + 1} iterates for '
                     f'T = {num_steps} gradients, got leading sizes {sorted(lengths)}.')
  operators = divergence_lib.operators(divergence)
  first = jax.tree.map(lambda x: x[0], params_sequence)
  final = jax.tree.map(lambda x: x[-1], params_sequence)
  iterates = jax.tree.map(lambda x: x[:-1], params_sequence)
  terms = jax.vmap(lambda p, g: inner_loop.step_term(operators, p, g, solver=solver,
                                                     **solver_options)[0])(
      iterates, grads_sequence)
  dist = inner_loop.distance_term(operators, final, first)
  return (dist + jnp.sum(terms)) / num_steps


def unrolled_loss(divergence: PyTree, task: Task, num_steps: int, *,
                  params: PyTree | None = None) -> tuple[jax.Array, jax.Array]:
  """Training loss after ``num_steps`` mirror steps, differentiable through the unroll.

  The usual learned-optimiser objective: back-propagation goes through every step
  (including through the gradients' dependence on earlier steps), so memory grows
  linearly with ``num_steps``. The loss is measured on the next training batch.

  Returns:
    ``(final_loss, losses)`` with ``losses`` the ``(T,)`` training losses on the way.
  """
  init_params = task.init() if params is None else params

  def body(params, step):
    loss, grads = jax.value_and_grad(task.loss)(params, task.batch(step))
    return mirror.mirror_step(divergence, params, grads), loss

  final_params, losses = jax.lax.scan(body, init_params,
                                      jnp.arange(num_steps, dtype=jnp.int32))
  return task.loss(final_params, task.batch(jnp.asarray(num_steps, jnp.int32))), losses


class MetaGradient(NamedTuple):
  """A meta-objective's value and gradient on one task, and the inner losses."""

  loss: jax.Array
  grad: PyTree
  losses: jax.Array
  final_loss: jax.Array


def meta_gradient(divergence: PyTree, task: Task, num_steps: int, *,
                  objective: str = 'bound', params: PyTree | None = None,
                  adjoint: str = 'implicit', solver='exact', **solver_options) -> MetaGradient:
  """The meta-objective and its gradient w.r.t. the divergence on one task.

  Args:
    divergence: the current divergence.
    task: the task.
    num_steps: the inner horizon ``T``.
    objective: ``'bound'`` (the convergence-rate bound, implicit meta-gradient, memory
      constant in ``T``) or ``'unrolled'`` (training loss after ``T`` steps,
      back-propagated through the unroll, memory linear in ``T``).
    params: initial parameters (``task.init()`` if ``None``).
    adjoint: ``'implicit'`` or ``'statistics'`` (bound objective; see
      :func:`metamd_jax.rollout`).
    solver: adjoint solver of the mirror step (bound objective).
    **solver_options: options of a matrix-free solver.

  Returns:
    A :class:`MetaGradient`.
  """
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



