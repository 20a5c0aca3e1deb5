"""Linear solvers against numpy's dense solve, and the solver registry."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_block_metric, flat, randomize

import metamd_jax
from metamd_jax import divergence as divergence_lib
from metamd_jax import linear_solve


def _spd(dim, condition, seed):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  return (q * np.geomspace(1.0, condition, dim)) @ q.T


@pytest.mark.parametrize('solver,tol', [
    (linear_solve.conjugate_gradient(tol=1e-12), 1e-9),
    (linear_solve.neumann_series(tol=1e-12, maxiter=20000), 1e-9),
    (linear_solve.dense(), 1e-12),
])
def test_solvers_match_numpy(x64, solver, tol):
  matrix = _spd(6, 20.0, 0)
  b = {'a': jnp.asarray(np.arange(4.0)), 'b': jnp.asarray([1.0, -2.0])}

  def matvec(x):
    y = jnp.asarray(matrix) @ jnp.concatenate([x['a'], x['b']])
    return {'a': y[:4], 'b': y[4:]}

  x = solver(matvec, b)
  expected = np.linalg.solve(matrix, np.concatenate([b['a'], b['b']]))
  np.testing.assert_allclose(np.concatenate([x['a'], x['b']]), expected, rtol=tol, atol=tol)


def test_neumann_respects_iteration_budget(x64):
  matrix = jnp.asarray(_spd(5, 1000.0, 1))
  b = jnp.ones(5)
  rough = linear_solve.neumann_series(tol=1e-14, maxiter=3)(lambda x: matrix @ x, b)
  exact = np.linalg.solve(matrix, b)
  assert np.linalg.norm(rough - exact) > 1e-3 * np.linalg.norm(exact)


def test_power_iteration_finds_top_eigenvalue(x64):
  matrix = _spd(8, 50.0, 2)
  estimate = linear_solve.power_iteration(lambda x: jnp.asarray(matrix) @ x, jnp.ones(8),
                                          num_iters=200)
  np.testing.assert_allclose(float(estimate), 50.0, rtol=1e-6)


@pytest.mark.parametrize('factory,kwargs', [
    (linear_solve.conjugate_gradient, dict(tol=0.0)),
    (linear_solve.neumann_series, dict(maxiter=0)),
])
def test_bad_options_are_rejected(factory, kwargs):
  with pytest.raises(ValueError):
    factory(**kwargs)


def test_make_solver_names_the_solvers():
  assert linear_solve.SOLVERS == ('exact', 'cg', 'neumann', 'dense')
  assert linear_solve.make_solver() is linear_solve.exact_solver
  assert linear_solve.make_solver('exact') is linear_solve.exact_solver
  custom = lambda matvec, b, *args: b
  assert linear_solve.make_solver(custom) is custom
  for name in ('cg', 'neumann', 'dense'):
    assert callable(linear_solve.make_solver(name))
  with pytest.raises(ValueError, match=re.escape(
      "unknown solver 'lu'; expected one of ('exact', 'cg', 'neumann', 'dense') or a callable.")):
    linear_solve.make_solver('lu')
  with pytest.raises(ValueError, match=re.escape("the exact solver takes no options, got ['tol']")):
    linear_solve.make_solver('exact', tol=1e-3)
  with pytest.raises(ValueError, match='tol must be positive'):
    linear_solve.make_solver('cg', tol=0.0)


def test_make_solver_gives_one_solver_per_name_and_options(x64):
  """The same name and options give the same solver object (a static argument of the
  compiled implicit backward pass); other options, or equal values of another type, give
  another; unhashable options still give a working solver."""
  cg = linear_solve.make_solver('cg', tol=1e-8, maxiter=50)
  assert linear_solve.make_solver('cg', maxiter=50, tol=1e-8) is cg
  assert linear_solve.make_solver('cg', tol=1e-6, maxiter=50) is not cg
  assert linear_solve.make_solver('cg', tol=1e-8, maxiter=50.0) is not cg
  assert linear_solve.make_solver('neumann', tol=1e-8, maxiter=50) is not cg
  assert linear_solve.make_solver('dense') is linear_solve.make_solver('dense')
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 5))
  a = a @ a.T + 5 * np.eye(5)
  b = rng.standard_normal(5)
  solver = linear_solve.make_solver('cg', tol=np.asarray(1e-12))  # an array: unhashable
  got = solver(lambda x: jnp.asarray(a) @ x, jnp.asarray(b))
  np.testing.assert_allclose(got, np.linalg.solve(a, b), rtol=1e-9)


@pytest.mark.parametrize('structure', ['kronecker', 'diagonal', 'scalar'])
def test_exact_solver_is_the_dense_inverse_metric(x64, structure):
  params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
  divergence = randomize(metamd_jax.init_divergence(params, 0.1, structure=structure), seed=0)
  b = randomize(params, seed=1)
  expected = np.linalg.solve(dense_block_metric(divergence), flat(b))
  for metrics in (divergence, divergence_lib.operators(divergence)):
    x = linear_solve.exact_solver(None, b, metrics)  # the matvec is not used
    np.testing.assert_allclose(flat(x), expected, rtol=1e-9, atol=1e-12)
  # The matrix-free solvers agree on the same system M u = b.
  matvec = lambda u: divergence_lib.apply_metric(divergence, u)
  for name, options in (('cg', dict(tol=1e-13)), ('dense', {})):
    x = linear_solve.make_solver(name, **options)(matvec, b, divergence)
    np.testing.assert_allclose(flat(x), expected, rtol=1e-8, atol=1e-10)
