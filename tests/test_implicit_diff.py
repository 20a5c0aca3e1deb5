"""Implicit differentiation of the mirror step against autodiff and finite differences."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from helpers import well_conditioned

import metamd_jax
from metamd_jax import divergence as divergence_lib
from metamd_jax import implicit_diff, linear_solve

PARAMS = {'dense': (4, 3), 'conv': (2, 2, 2, 3), 'bias': (3,)}
STRUCTURES = [dict(structure='kronecker'), dict(structure='kronecker', max_factor_size=3),
              dict(structure='diagonal'), dict(structure='scalar')]


def _problem(options, seed=0):
  params = {k: jnp.asarray(np.random.default_rng(seed).standard_normal(s))
            for k, s in PARAMS.items()}
  divergence = well_conditioned(
      metamd_jax.init_divergence(params, 0.1, dtype=jnp.float64, **options), seed=seed + 1,
      noise=0.2)
  grads = randomize(params, seed + 2)
  cotangent = randomize(params, seed + 3)
  return divergence, params, grads, cotangent


def _closed_form(divergence, params, grads):
  """Plain autodiff reference: the closed form written without the custom VJP."""
  direction = divergence_lib.solve_metric(divergence, grads)
  return jax.tree.map(jnp.subtract, params, direction)


def _ravel(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


@pytest.mark.parametrize('options', STRUCTURES)
@pytest.mark.parametrize('solver,options_solver,rtol', [
    ('exact', {}, 1e-9),
    ('dense', {}, 1e-9),
    ('cg', dict(tol=1e-12), 1e-8),
    ('neumann', dict(tol=1e-12, maxiter=5000), 1e-7),
])
def test_implicit_vjp_equals_autodiff(x64, options, solver, options_solver, rtol):
  divergence, params, grads, cotangent = _problem(options)
  args = (divergence, params, grads)
  _, implicit_vjp = jax.vjp(
      lambda *a: metamd_jax.mirror_step(*a, solver=solver, **options_solver), *args)
  _, plain_vjp = jax.vjp(_closed_form, *args)
  for got, expected in zip(implicit_vjp(cotangent), plain_vjp(cotangent)):
    np.testing.assert_allclose(_ravel(got), _ravel(expected), rtol=rtol,
                               atol=rtol * np.abs(_ravel(expected)).max())


def test_backward_pass_is_one_program_per_solver_and_shapes(x64):
  """Outside ``jax.jit`` the backward pass is one compiled program per solver and shapes
  (two problems of the same shapes share it); an unhashable solver runs it operation by
  operation instead, with the same cotangents, as plain autodiff gives."""

  class Unhashable:
    __hash__ = None

    def __eq__(self, other):
      return isinstance(other, Unhashable)

    def __call__(self, matvec, b, *args):
      return linear_solve.exact_solver(matvec, b, *args)

  before = implicit_diff._compiled_root_vjp._cache_size()
  for seed in (0, 1):
    # Shapes no other test uses, so that this test compiles the program itself.
    params = {k: jnp.asarray(np.random.default_rng(seed).standard_normal(s))
              for k, s in {'w': (5, 7), 'b': (7,)}.items()}
    divergence = well_conditioned(metamd_jax.init_divergence(params, 0.1, dtype=jnp.float64),
                                  seed=seed + 1, noise=0.2)
    grads, cotangent = randomize(params, seed + 2), randomize(params, seed + 3)
    args = (divergence, params, grads)
    _, plain_vjp = jax.vjp(_closed_form, *args)
    expected = plain_vjp(cotangent)
    for solver in ('exact', Unhashable()):
      _, implicit_vjp = jax.vjp(lambda *a, s=solver: metamd_jax.mirror_step(*a, solver=s), *args)
      for got, want in zip(implicit_vjp(cotangent), expected):
        np.testing.assert_allclose(_ravel(got), _ravel(want), rtol=1e-9,
                                   atol=1e-9 * np.abs(_ravel(want)).max())
  assert implicit_diff._compiled_root_vjp._cache_size() - before == 1


@pytest.mark.parametrize('options', STRUCTURES)
def test_implicit_gradient_equals_finite_differences(x64, options):
  divergence, params, grads, cotangent = _problem(options, seed=5)
  flat, unravel = jax.flatten_util.ravel_pytree(divergence)

  def objective(flat_divergence):
    new = metamd_jax.mirror_step(unravel(flat_divergence), params, grads)
    return sum(jnp.vdot(c, n) for c, n in zip(jax.tree.leaves(cotangent), jax.tree.leaves(new)))

  gradient = jax.grad(objective)(flat)
  rng = np.random.default_rng(0)
  for _ in range(3):
    direction = rng.standard_normal(flat.shape)
    direction /= np.linalg.norm(direction)
    h = 1e-5
    fd = (objective(flat + h * direction) - objective(flat - h * direction)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(gradient, direction)), float(fd), rtol=1e-6,
                               atol=1e-9)


def test_generic_custom_root_on_a_linear_system(x64):
  """custom_root is not tied to the divergence: x* = A(theta)^{-1} b."""
  def optimality(x, theta, b):
    return (jnp.diag(theta) + 0.5) @ x - b

  @implicit_diff.custom_root(optimality, linear_solve.conjugate_gradient(tol=1e-12))
  def solve(theta, b):
    return jnp.linalg.solve(jnp.diag(theta) + 0.5, b)

  theta = jnp.array([1.0, 2.0, 3.0])
  b = jnp.array([1.0, -1.0, 2.0])
  fn = lambda t, bb: jnp.sum(jnp.sin(solve(t, bb)))
  ref = lambda t, bb: jnp.sum(jnp.sin(jnp.linalg.solve(jnp.diag(t) + 0.5, bb)))
  for got, expected in zip(jax.grad(fn, (0, 1))(theta, b), jax.grad(ref, (0, 1))(theta, b)):
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_unknown_solver_is_rejected(x64):
  divergence, params, grads, _ = _problem(STRUCTURES[0])
  with pytest.raises(ValueError, match='unknown solver'):
    metamd_jax.mirror_step(divergence, params, grads, solver='lu')
