"""Linear solvers for the adjoint systems of implicit differentiation, and their registry.

A solver is a callable ``solve(matvec, b, *args) -> x`` with ``matvec(x) = A x`` for a
linear operator ``A`` on pytrees. ``args`` are the arguments of the optimality function
whose Jacobian ``A`` is; matrix-free solvers (:func:`conjugate_gradient`,
:func:`neumann_series`, :func:`dense`) ignore them, the structured :func:`exact_solver`
of the mirror step uses them. :func:`make_solver` turns a name into a solver.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from metamd_jax import divergence as divergence_lib
from metamd_jax.types import PyTree

MatVec = Callable[[PyTree], PyTree]
Solver = Callable[..., PyTree]


def _vdot(x: PyTree, y: PyTree) -> jax.Array:
  return optax.tree.vdot(x, y)


def _norm(x: PyTree) -> jax.Array:
  return jnp.sqrt(_vdot(x, x))


def conjugate_gradient(tol: float = 1e-10, maxiter: int | None = None) -> Solver:
  """Conjugate gradient for symmetric positive-definite ``A`` (relative tolerance ``tol``)."""
  if not tol > 0:
    raise ValueError(f'conjugate_gradient tol must be positive, got {tol}.')

  def solve(matvec: MatVec, b: PyTree, *unused_args) -> PyTree:
    x, _ = jax.scipy.sparse.linalg.cg(matvec, b, tol=tol, atol=0.0, maxiter=maxiter)
    return x

  return solve


def power_iteration(matvec: MatVec, like: PyTree, num_iters: int = 30) -> jax.Array:
  """Estimate of the largest eigenvalue of a symmetric positive-definite operator."""
  leaves, treedef = jax.tree_util.tree_flatten(like)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  x = jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                for k, x in zip(keys, leaves)])

  def body(_, x):
    y = matvec(x)
    return jax.tree.map(lambda a: a / _norm(y), y)

  x = jax.lax.fori_loop(0, num_iters, body, x)
  return _vdot(x, matvec(x)) / _vdot(x, x)


def neumann_series(tol: float = 1e-10, maxiter: int = 1000, step: float | None = None,
                   safety: float = 1.2) -> Solver:
  """Neumann series ``x = alpha sum_k (I - alpha A)^k b`` (Richardson iteration).

  Converges for symmetric positive-definite ``A`` when ``0 < alpha < 2 / lambda_max``;
  with ``step=None``, ``alpha = 1 / (safety * lambda_max)`` from a power iteration.
  Stops when the residual ``||b - A x|| <= tol ||b||`` or after ``maxiter`` terms.
  """
  if not tol > 0 or maxiter < 1:
    raise ValueError(f'neumann_series needs tol > 0 and maxiter >= 1, got {tol}, {maxiter}.')

  def solve(matvec: MatVec, b: PyTree, *unused_args) -> PyTree:
    alpha = step if step is not None else 1.0 / (safety * power_iteration(matvec, b))
    b_norm = _norm(b)

    def residual(x):
      return jax.tree.map(jnp.subtract, b, matvec(x))

    def cond(carry):
      i, _, r = carry
      return (i < maxiter) & (_norm(r) > tol * b_norm)

    def body(carry):
      i, x, r = carry
      x = jax.tree.map(lambda xi, ri: xi + alpha * ri, x, r)
      return i + 1, x, residual(x)

    x0 = jax.tree.map(jnp.zeros_like, b)
    _, x, _ = jax.lax.while_loop(cond, body, (0, x0, b))
    return x

  return solve


def dense() -> Solver:
  """Materialise ``A`` column by column and solve with ``jnp.linalg.solve`` (small problems)."""

  def solve(matvec: MatVec, b: PyTree, *unused_args) -> PyTree:
    flat_b, unravel = jax.flatten_util.ravel_pytree(b)
    matrix = jax.vmap(lambda e: jax.flatten_util.ravel_pytree(matvec(unravel(e)))[0],
                      out_axes=1)(jnp.eye(flat_b.size, dtype=flat_b.dtype))
    return unravel(jnp.linalg.solve(matrix, flat_b))

  return solve


def exact_solver(matvec: MatVec, b: PyTree, divergence: PyTree, *unused_args) -> PyTree:
  """The mirror step's adjoint system ``M u = v``, solved with the metric's exact inverse.

  For the step's optimality condition ``F(x+, divergence, x, g) = M (x+ - x) + g`` the
  Jacobian ``dF/dx+`` is the metric ``M`` itself (symmetric), so ``u = M^{-1} v``: for a
  Kronecker leaf ``L^{-1} V R^{-1}`` (products with the cached inverses when
  ``divergence`` is its :func:`metamd_jax.divergence.operators`). ``matvec`` is not used.
  """
  del matvec
  return divergence_lib.solve_metric(divergence, b)


_MATRIX_FREE = {'cg': conjugate_gradient, 'neumann': neumann_series, 'dense': dense}
SOLVERS = ('exact', *_MATRIX_FREE)


def make_solver(solver: str | Solver = 'exact', **options) -> Solver:
  """A solver for the mirror step's adjoint system, by name.

  Args:
    solver: ``'exact'`` (:func:`exact_solver`, the default), ``'cg'``
      (:func:`conjugate_gradient`), ``'neumann'`` (:func:`neumann_series`), ``'dense'``
      (:func:`dense`), or a callable ``solve(matvec, b, *args)``, returned as it is.
    **options: options of the matrix-free solvers (e.g. ``tol``, ``maxiter``).

  Returns:
    The solver: the same object for the same name and (hashable) options.

  Raises:
    ValueError: for an unknown name, or options given to the exact solver.
  """
  if callable(solver):
    return solver
  if solver == 'exact':
    if options:
      raise ValueError(f'the exact solver takes no options, got {sorted(options)}.')
    return exact_solver
  if solver not in _MATRIX_FREE:
    raise ValueError(f'unknown solver {solver!r}; expected one of {SOLVERS} or a callable.')
  # The same name and options give the same solver: a function compiled with the solver
  # as a static argument (the implicit backward pass) is then compiled once. Options of
  # another type are another key; unhashable options (e.g. an array) are not cached.
  key = tuple((name, type(value), value) for name, value in sorted(options.items()))
  try:
    hash(key)
  except TypeError:
    return _MATRIX_FREE[solver](**options)
  return _matrix_free_solver(solver, key)


@functools.lru_cache(maxsize=64)
def _matrix_free_solver(name: str, options: tuple) -> Solver:
  return _MATRIX_FREE[name](**{k: v for k, _, v in options})
