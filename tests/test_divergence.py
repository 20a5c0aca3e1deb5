"""Divergences against dense-matrix references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_metric, randomize
from helpers import well_conditioned

import metamd_jax
from metamd_jax import divergence as divergence_lib

SHAPES = {
    'dense': (5, 3),
    'conv': (2, 2, 3, 4),
    'bias': (4,),
    'scalar': (),
}


def _params(seed=0, dtype=None):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _dense_block_metric(divergence):
  metrics = jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)
  blocks = [dense_metric(m) for m in metrics]
  size = sum(b.shape[0] for b in blocks)
  full = np.zeros((size, size))
  offset = 0
  for b in blocks:
    full[offset:offset + b.shape[0], offset:offset + b.shape[0]] = b
    offset += b.shape[0]
  return full


STRUCTURE_CASES = [
    dict(structure='kronecker'),
    dict(structure='kronecker', max_factor_size=3),  # some factors diagonal
    dict(structure='kronecker',
         dimension_numbers=lambda path, leaf: (metamd_jax.KroneckerAxes(rows=(3, 0), cols=(2, 1))
                                               if len(leaf.shape) == 4 else None)),
    dict(structure='diagonal'),
    dict(structure='scalar'),
]


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_mirror_step_is_the_dense_argmin(x64, options):
  params, grads = _params(0), _params(1)
  # Random meta-parameters, conditioned so that float64 solves agree to 1e-10.
  divergence = well_conditioned(
      metamd_jax.init_divergence(params, 0.1, dtype=jnp.float64, **options), seed=2, noise=0.5)
  new = metamd_jax.mirror_step(divergence, params, grads)
  metric = _dense_block_metric(divergence)
  # argmin_x <g, x> + 1/2 (x - theta)^T M (x - theta)  <=>  M (x - theta) = -g
  expected = _flat(params) + np.linalg.solve(metric, -_flat(grads))
  np.testing.assert_allclose(_flat(new), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_transform_direction_is_the_dense_preconditioner(x64, options):
  params, grads = _params(0), _params(1)
  divergence = well_conditioned(
      metamd_jax.init_divergence(params, 0.1, dtype=jnp.float64, **options), seed=3, noise=0.5)
  tx = metamd_jax.scale_by_mirror_descent(divergence)
  direction, _ = tx.update(grads, tx.init(params))
  expected = np.linalg.solve(_dense_block_metric(divergence), _flat(grads))
  np.testing.assert_allclose(_flat(direction), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_bregman_matches_dense_quadratic_form(x64, options):
  x, y = _params(4), _params(5)
  divergence = randomize(metamd_jax.init_divergence(x, 0.1, dtype=jnp.float64, **options),
                         seed=6)
  diff = _flat(x) - _flat(y)
  expected = 0.5 * diff @ _dense_block_metric(divergence) @ diff
  value = metamd_jax.bregman_divergence(divergence, x, y)
  np.testing.assert_allclose(float(value), expected, rtol=1e-10)
  assert float(value) > 0
  assert float(metamd_jax.bregman_divergence(divergence, x, x)) == 0.0


def test_bregman_is_positive_for_random_pairs(x64):
  divergence = randomize(metamd_jax.init_divergence(_params(), 0.1, dtype=jnp.float64), seed=7)
  for seed in range(10):
    value = metamd_jax.bregman_divergence(divergence, _params(seed), _params(seed + 100))
    assert float(value) > 0


@pytest.mark.parametrize('case', ['random', 'huge', 'tiny', 'zero', 'rank_one', 'negative'])
def test_eigenvalue_floor_holds(x64, case):
  params = _params()
  eps = 1e-2
  divergence = metamd_jax.init_divergence(params, 0.1, eps=eps, dtype=jnp.float64)
  if case == 'random':
    divergence = randomize(divergence, seed=8)
  elif case == 'huge':
    divergence = randomize(divergence, seed=8, scale=1e6)
  elif case == 'tiny':
    divergence = randomize(divergence, seed=8, scale=1e-9)
  elif case == 'zero':
    divergence = jax.tree.map(jnp.zeros_like, divergence)
  elif case == 'rank_one':
    divergence = jax.tree.map(
        lambda a: jnp.outer(jnp.arange(a.shape[0]), jnp.ones(a.shape[1])) if a.ndim == 2 else a,
        divergence)
  elif case == 'negative':
    divergence = jax.tree.map(lambda a: -jnp.abs(a) * 5, divergence)
  for metric in jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric):
    eigenvalues = np.linalg.eigvalsh(dense_metric(metric))
    assert eigenvalues.min() >= metric.floor() * (1 - 1e-6)
  sigma, floor = metamd_jax.strong_convexity(divergence)
  assert floor == eps ** 2
  assert float(sigma) >= floor * (1 - 1e-6)


def test_init_reproduces_sgd_learning_rate():
  params = _params(dtype=np.float32)
  grads = _params(1, dtype=np.float32)
  for structure in ('kronecker', 'diagonal', 'scalar'):
    divergence = metamd_jax.init_divergence(params, 0.03, structure=structure)
    new = metamd_jax.mirror_step(divergence, params, grads)
    expected = jax.tree.map(lambda p, g: p - 0.03 * g, params, grads)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_large_factors_become_diagonal():
  params = {'embedding': jnp.zeros((5000, 8)), 'dense': jnp.zeros((16, 8))}
  divergence = metamd_jax.init_divergence(params, 0.1, max_factor_size=1024)
  assert divergence['embedding'].left.shape == (5000,)
  assert divergence['embedding'].right.shape == (8, 8)
  assert divergence['dense'].left.shape == (16, 16)


@pytest.mark.parametrize('learning_rate', [0.0, -1.0, float('nan'), float('inf')])
def test_init_rejects_bad_learning_rate(learning_rate):
  with pytest.raises(ValueError, match='learning_rate'):
    metamd_jax.init_divergence(_params(), learning_rate)


def test_init_rejects_learning_rate_beyond_the_floor():
  with pytest.raises(ValueError, match='eps'):
    metamd_jax.init_divergence(_params(), 1e8, eps=1e-3)


def test_init_rejects_bad_options():
  with pytest.raises(ValueError, match='structure'):
    metamd_jax.init_divergence(_params(), 0.1, structure='full')
  with pytest.raises(ValueError, match='every axis'):
    metamd_jax.init_divergence(
        {'w': jnp.zeros((2, 3, 4))}, 0.1,
        dimension_numbers=metamd_jax.KroneckerAxes(rows=(0,), cols=(1,)))
  with pytest.raises(ValueError, match='eps'):
    metamd_jax.init_divergence(_params(), 0.1, eps=0.0)


def test_mismatched_shapes_name_the_leaf_and_both_shapes():
  divergence = metamd_jax.init_divergence(_params(), 0.1)
  other = dict(_params(), dense=jnp.zeros((6, 3)))
  with pytest.raises(ValueError, match=r"\['dense'\].*\(6, 3\).*\(5, 3\)"):
    metamd_jax.mirror_step(divergence, other, other)
  with pytest.raises(ValueError, match=r"\['dense'\].*\(6, 3\).*\(5, 3\)"):
    metamd_jax.metamd(divergence).init(other)


def test_mismatched_structure_names_the_leaf():
  divergence = metamd_jax.init_divergence(_params(), 0.1)
  other = dict(_params(), extra=jnp.zeros(3))
  with pytest.raises(ValueError, match=r"only in params: \['extra'\]"):
    metamd_jax.mirror_step(divergence, other, other)
  missing = {k: v for k, v in _params().items() if k != 'bias'}
  with pytest.raises(ValueError, match=r"only in the divergence: \['bias'\]"):
    metamd_jax.scale_by_mirror_descent(divergence).init(missing)


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_meta_parameters_are_rejected(bad):
  params = _params(dtype=np.float32)
  divergence = metamd_jax.init_divergence(params, 0.1)
  broken = dict(divergence)
  broken['conv'] = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(bad), divergence['conv'])
  with pytest.raises(ValueError, match=r"\['conv'\].*non-finite"):
    metamd_jax.mirror_step(broken, params, params)
  with pytest.raises(ValueError, match='non-finite'):
    metamd_jax.metamd(broken)
  with pytest.raises(ValueError, match='non-finite'):
    metamd_jax.bregman_divergence(broken, params, params)


def test_convergence_bound_matches_the_closed_form(x64):
  """Scalar metric c: sigma = lambda_max = c, bound = c D^2 / (2T) + G^2 / (2c)."""
  params = {'w': jnp.zeros((3, 2))}
  divergence = metamd_jax.init_divergence(params, 0.25, structure='scalar', eps=1e-3,
                                          dtype=jnp.float64)
  c = 4.0  # 1 / learning_rate
  bound = metamd_jax.convergence_bound(divergence, distance=2.0, gradient_bound=3.0,
                                       num_steps=10)
  np.testing.assert_allclose(float(bound), c * 4.0 / 20 + 9.0 / (2 * c), rtol=1e-12)
  # Kronecker: lambda_max(M) = lambda_max(L) lambda_max(R), sigma likewise with minima.
  kron = well_conditioned(metamd_jax.init_divergence(params, 0.25, dtype=jnp.float64),
                          seed=1, noise=0.3)
  eig = np.linalg.eigvalsh(dense_metric(kron['w']))
  bound = metamd_jax.convergence_bound(kron, distance=2.0, gradient_bound=3.0, num_steps=10)
  np.testing.assert_allclose(float(bound), eig.max() * 4.0 / 20 + 9.0 / (2 * eig.min()),
                             rtol=1e-10)
