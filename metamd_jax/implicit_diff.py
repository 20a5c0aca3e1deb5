"""Implicit differentiation of roots of optimality conditions with ``jax.custom_vjp``.

If ``x*(args)`` solves ``F(x*, *args) = 0`` and ``dF/dx`` is invertible, the implicit
function theorem gives, for a cotangent ``v`` on ``x*``,

    solve  (dF/dx)^T u = v,   then   args_bar = -(dF/dargs)^T u,

where both products are vector-Jacobian products of ``F``: nothing is materialised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from metamd_jax import linear_solve
from metamd_jax.types import PyTree


def root_vjp(
    optimality_fn: Callable[..., PyTree],
    solution: PyTree,
    args: tuple,
    cotangent: PyTree,
    solve: linear_solve.Solver,
) -> tuple:
  """VJP of a root ``solution`` of ``optimality_fn(solution, *args) = 0`` w.r.t. ``args``.

  Args:
    optimality_fn: ``F(x, *args)``, returning a pytree with the structure of ``x``.
    solution: a root ``x*``.
    args: the arguments ``F`` was solved for.
    cotangent: ``v``, the cotangent on ``x*``.
    solve: a solver ``solve(matvec, b, *args)`` (see :mod:`metamd_jax.linear_solve`).

  Returns:
    The cotangents of ``args``, a tuple with one entry per argument.
  """
  _, vjp_solution = jax.vjp(lambda x: optimality_fn(x, *args), solution)

  def transposed_jacobian(u):
    return vjp_solution(u)[0]

  # Solve (dF/dx)^T u = v.
  u = solve(transposed_jacobian, cotangent, *args)
  # args_bar = -(dF/dargs)^T u.
  _, vjp_args = jax.vjp(lambda *a: optimality_fn(solution, *a), *args)
  return tuple(jax.tree.map(jnp.negative, vjp_args(u)))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _compiled_root_vjp(optimality_fn, solution, args, cotangent, solve):
  # root_vjp as one program per (optimality_fn, solve) and shapes: a gradient taken
  # outside jax.jit would otherwise run the backward pass operation by operation, each
  # compiled on its own. Inside a traced function it is traced as part of it.
  return root_vjp(optimality_fn, solution, args, cotangent, solve)


def _hashable(*objects) -> bool:
  try:
    hash(objects)
  except TypeError:
    return False
  return True


def custom_root(optimality_fn: Callable[..., PyTree], solve: linear_solve.Solver):
  """Decorator: make ``solver_fn(*args) -> x*`` differentiable by implicit differentiation.

  The forward pass runs ``solver_fn`` as it is (e.g. a closed form); the backward pass
  never differentiates through it, but solves the adjoint system of ``optimality_fn``.

  Args:
    optimality_fn: ``F(x, *args)`` whose root ``solver_fn`` returns.
    solve: linear solver for the adjoint system.

  Returns:
    A decorator for ``solver_fn``.
  """

  def wrapper(solver_fn: Callable[..., PyTree]) -> Callable[..., PyTree]:

    @jax.custom_vjp
    def solved(*args):
      return solver_fn(*args)

    def fwd(*args):
      solution = solver_fn(*args)
      return solution, (solution, args)

    def bwd(residuals, cotangent):
      solution, args = residuals
      vjp = _compiled_root_vjp if _hashable(optimality_fn, solve) else root_vjp
      grads = vjp(optimality_fn, solution, args, cotangent, solve)
      # Cotangents must have the dtypes of the primal inputs.
      return tuple(jax.tree.map(lambda g, a: g.astype(jnp.result_type(a)), g, a)
                   for g, a in zip(grads, args))

    solved.defvjp(fwd, bwd)
    return solved

  return wrapper
