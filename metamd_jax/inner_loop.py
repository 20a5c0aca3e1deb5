"""The inner loop: T mirror steps on one task in a ``lax.scan``, streaming the bound.

The convergence-rate bound (METHOD.md section 2, step size folded into the divergence)

.. math::

  R(\\phi) = \\frac1T \\Big[ B_\\phi(\\theta^*, \\theta_1)
             + \\sum_{t=1}^T B_\\phi(\\theta_t, \\theta_{t+1}) \\Big]

needs only ``theta_1``, the final iterate ``theta* = theta_{T+1}`` and a running sum of
the per-step terms, so the rollout keeps memory constant in ``T``. With
``meta_gradient=True`` the carry also accumulates each step term's gradient with respect
to the divergence, through the implicit VJP of :func:`metamd_jax.mirror_step` (the
iterates and gradients are data: the regret view), so the meta-gradient needs no stored
trajectory either.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metamd_jax import divergence as divergence_lib
from metamd_jax import mirror
from metamd_jax.tasks.base import Task

PyTree = Any


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
  losses: jax.Array
  step_terms: jax.Array
  distance_term: jax.Array
  bound: jax.Array
  meta_grad: PyTree | None = None
  trajectory: tuple | None = None


def step_term(operators: PyTree, params: PyTree, grads: PyTree, *, solver='exact',
              **solver_options) -> tuple[jax.Array, PyTree]:
  """``(B(theta, theta+), theta+)`` with ``theta+`` the mirror step from ``theta``.

  ``operators`` are the materialised metrics (:func:`divergence.operators`); ``params``
  and ``grads`` are data (stop-gradient).
  """
  params = jax.lax.stop_gradient(params)
  grads = jax.lax.stop_gradient(grads)
  new_params = mirror.operator_step(operators, params, grads, solver=solver, **solver_options)
  return divergence_lib.bregman_divergence(operators, params, new_params), new_params


ADJOINTS = ('implicit', 'statistics')


def _statistics_term(operators: PyTree, grads: PyTree) -> tuple[jax.Array, PyTree]:
  """``(1/2 <g, M^{-1} g>, M^{-1} g)`` with ``M^{-1}`` from the cached inverse factors."""
  grads = jax.lax.stop_gradient(grads)
  direction = divergence_lib.solve_metric(operators, grads)
  term = 0.5 * sum(jnp.vdot(g.astype(d.dtype), d) for g, d in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  return term, direction


def distance_term(operators: PyTree, final_params: PyTree,
                  init_params: PyTree) -> jax.Array:
  """``B(stop_gradient(theta*), theta_1)``: the comparator is held constant.

  ``operators`` may also be a divergence (see :func:`divergence.bregman_divergence`).
  """
  return divergence_lib.bregman_divergence(
      operators, jax.lax.stop_gradient(final_params), jax.lax.stop_gradient(init_params))


def rollout(
    divergence: PyTree,
    task: Task,
    num_steps: int,
    *,
    params: PyTree | None = None,
    meta_gradient: bool = False,
    return_trajectory: bool = False,
    adjoint: str = 'implicit',
    solver='exact',
    **solver_options,
) -> Rollout:
  """Run ``num_steps`` mirror steps on ``task`` and return the bound (and its gradient).

  Args:
    divergence: the current divergence.
    task: the task (its ``init``, ``loss`` and ``batch``).
    num_steps: the horizon ``T`` (a Python int).
    params: initial parameters; ``task.init()`` if ``None``.
    meta_gradient: also accumulate the bound's gradient w.r.t. the divergence.
    return_trajectory: also return the stacked iterates and gradients.
    adjoint: how each step term is differentiated: ``'implicit'`` (the mirror step's
      ``custom_vjp``, any divergence and adjoint solver) or ``'statistics'`` (the same
      gradient collapsed into running statistics: with the cached inverses ``P``, ``Q``
      the term is ``1/2 tr(G^T P G Q)``, whose gradients ``1/2 G Q G^T`` and
      ``1/2 G^T P G`` are accumulated and pulled back to the meta-parameters once).
    solver: adjoint solver of the mirror step (see :func:`metamd_jax.mirror_step`).
    **solver_options: options of a matrix-free solver.

  Returns:
    A :class:`Rollout`.
  """
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps}.')
  if adjoint not in ADJOINTS:
    raise ValueError(f'unknown adjoint {adjoint!r}; expected one of {ADJOINTS}.')
  init_params = task.init() if params is None else params
  divergence_lib.check_divergence(divergence)
  divergence_lib.apply_metric(divergence, init_params)  # structure and shape check
  loss_and_grad = jax.value_and_grad(task.loss)
  # Factors and their inverses once per run: every step is matrix products only.
  if meta_gradient:
    operators, pullback = jax.vjp(divergence_lib.operators, divergence)
    zeros = jax.tree.map(jnp.zeros_like, operators)
  else:
    operators, zeros = divergence_lib.operators(divergence), None

  def body(carry, step):
    params, term_sum, grad_sum = carry
    loss, grads = loss_and_grad(params, task.batch(step))
    if meta_gradient and adjoint == 'implicit':
      # The step term's gradient w.r.t. the factors, through the implicit VJP.
      (term, new_params), term_grad = jax.value_and_grad(step_term, has_aux=True)(
          operators, params, grads, solver=solver, **solver_options)
      grad_sum = jax.tree.map(jnp.add, grad_sum, term_grad)
    elif meta_gradient:
      # B(theta, theta+) = 1/2 <g, M^{-1} g>: gradients w.r.t. the cached inverses only.
      (term, direction), term_grad = jax.value_and_grad(_statistics_term, has_aux=True)(
          operators, grads)
      new_params = jax.tree.map(lambda p, d: (p - d).astype(p.dtype), params, direction)
      grad_sum = jax.tree.map(jnp.add, grad_sum, term_grad)
    else:
      direction = divergence_lib.solve_metric(operators, grads)
      new_params = jax.tree.map(lambda p, d: (p - d).astype(p.dtype), params, direction)
      term = 0.5 * sum(jnp.vdot(g.astype(d.dtype), d) for g, d in
                       zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    outputs = (loss, (params, grads) if return_trajectory else None)
    return (new_params, term_sum + term.astype(term_sum.dtype), grad_sum), outputs

  term_dtype = jnp.result_type(*jax.tree.leaves(divergence))
  carry = (init_params, jnp.zeros((), term_dtype), zeros)
  (final_params, term_sum, grad_sum), (losses, trajectory) = jax.lax.scan(
      body, carry, jnp.arange(num_steps, dtype=jnp.int32))

  if meta_gradient:
    # The distance term through the same operators: one pull-back to the meta-parameters.
    dist, dist_grad = jax.value_and_grad(distance_term)(operators, final_params, init_params)
    (meta_grad,) = pullback(jax.tree.map(lambda a, b: (a + b) / num_steps, dist_grad,
                                         grad_sum))
  else:
    dist = distance_term(operators, final_params, init_params)
    meta_grad = None
  if return_trajectory:
    params_seq, grads_seq = trajectory
    params_seq = jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), params_seq,
                              final_params)
    trajectory = (params_seq, grads_seq)
  return Rollout(final_params=final_params, losses=losses, step_terms=term_sum,
                 distance_term=dist, bound=(dist + term_sum) / num_steps,
                 meta_grad=meta_grad, trajectory=trajectory)
