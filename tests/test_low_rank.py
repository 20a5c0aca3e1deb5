"""Frozen MetaMD at low rank against a float64 numpy reference built from the definition."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_factor, randomize

import metamd_jax
from metamd_jax import low_rank

EPS = 0.05


def _params(dtype=None):
  """A wide input layer (12 rows), its bias, a convolution kernel viewed as (24, 6) and a
  diagonal-factored leaf (``dtype=None``: float64 under ``x64``, float32 otherwise)."""
  return {'dense': jnp.zeros((12, 5), dtype), 'bias': jnp.zeros((5,), dtype),
          'conv': jnp.zeros((3, 2, 4, 6), dtype), 'diag': jnp.zeros((9, 7), dtype)}


def _divergence(seed=0):
  params = _params()
  divergence = metamd_jax.init_divergence({k: v for k, v in params.items() if k != 'diag'},
                                          0.1, eps=EPS)
  # The (9, 7) leaf's 9 rows over max_factor_size: a diagonal left factor, a dense right.
  divergence.update(metamd_jax.init_divergence({'diag': params['diag']}, 0.1, eps=EPS,
                                               max_factor_size=8))
  return randomize(divergence, seed, scale=0.7)


def _grads(seed, like):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), like)


def _numpy_truncated(inverse, rank, fill):
  """``P'`` in numpy: the ``rank`` largest eigenvalues of ``P`` kept, the others at the
  level ``fill`` picks."""
  if inverse.shape[0] <= rank:
    return inverse
  values, vectors = np.linalg.eigh(inverse)
  dropped = values[:-rank]
  level = {'min': values.min(), 'mean': dropped.mean(), 'max': dropped.max()}[fill]
  values = np.concatenate([np.full(len(dropped), level), values[-rank:]])
  return (vectors * values) @ vectors.T


def _numpy_update(divergence, grads, rank, fill, learning_rate):
  """``-lr P' G Q'`` per leaf on its matrix view (rows: every axis but the last)."""
  out = {}
  for name, metric in divergence.items():
    g = np.asarray(grads[name], np.float64)
    gm = g.reshape(-1, g.shape[-1]) if g.ndim > 1 else g.reshape(-1, 1)
    left = np.linalg.inv(dense_factor(metric.left, metric.eps))
    right = np.linalg.inv(dense_factor(metric.right, metric.eps))
    if metric.left.ndim == 2:
      left = _numpy_truncated(left, rank, fill)
    if metric.right.ndim == 2:
      right = _numpy_truncated(right, rank, fill)
    out[name] = (-learning_rate * left @ gm @ right).reshape(g.shape)
  return out


@pytest.mark.parametrize('fill', low_rank.FILLS)
@pytest.mark.parametrize('rank', [2, 5])
def test_updates_are_the_truncated_inverse_factors(x64, rank, fill):
  """Every update of a jitted three-step run is ``-lr P' G Q'`` with ``P'`` built in numpy
  from the learned factor's eigendecomposition: the ``rank`` longest steps kept, every
  other direction at the ``fill`` level; a diagonal factor and a factor of at most ``rank``
  rows (the bias's right side, and at rank 5 the dense layer's 5 columns) are kept."""
  divergence = _divergence()
  params = _params()
  optimizer = metamd_jax.low_rank_metamd(divergence, rank, learning_rate=0.3, fill=fill)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for t in range(3):
    grads = _grads(10 + t, params)
    updates, state = update(grads, state, params)
    expected = _numpy_update(divergence, grads, rank, fill, 0.3)
    for name in params:
      np.testing.assert_allclose(updates[name], expected[name], rtol=1e-9, atol=1e-12,
                                 err_msg=name)


def test_the_state_keeps_no_long_dense_factor():
  """A factor longer than ``rank`` is kept as an ``(m, rank)`` basis, so no step forms an
  ``(m, m)`` product; shorter and diagonal factors are kept as they are."""
  state = low_rank.scale_by_low_rank_mirror_descent(_divergence(), 4).init(_params(jnp.float32))
  operators = state.preconditioner
  for name, rows in (('dense', 12), ('conv', 24)):
    left = operators[name].left_inverse
    assert isinstance(left, low_rank.LowRankInverse), name
    assert left.basis.shape == (rows, 4) and left.gains.shape == (4,), name
  assert isinstance(operators['dense'].right_inverse, low_rank.LowRankInverse)  # 5 > 4
  assert operators['bias'].right_inverse.shape == (1, 1)
  assert operators['diag'].left_inverse.shape == (9,)  # diagonal: kept


@pytest.mark.parametrize('fill', low_rank.FILLS)
def test_each_fill_compares_with_the_learned_inverse_as_documented(x64, fill):
  """``'min'``: ``P' <= P`` (no step longer than the learned one's); ``'max'``: ``P' >= P``;
  ``'mean'``: the trace kept. In every case ``P'`` is symmetric positive definite, so the
  optimiser is mirror descent with the frozen divergence whose factor is ``P'^{-1}``."""
  metric = _divergence(seed=3)['conv']
  inverse = np.linalg.inv(dense_factor(metric.left, metric.eps))
  truncated = np.asarray(low_rank.truncate_inverse(jnp.asarray(inverse), 5, fill).dense())
  np.testing.assert_allclose(truncated, truncated.T, atol=1e-12)
  assert np.linalg.eigvalsh(truncated).min() > 0
  gap = np.linalg.eigvalsh(inverse - truncated)
  tol = 1e-10 * np.abs(gap).max()
  if fill == 'min':
    assert gap.min() >= -tol and gap.max() > tol
  elif fill == 'max':
    assert gap.max() <= tol and gap.min() < -tol
  else:
    assert np.trace(truncated) == pytest.approx(np.trace(inverse), rel=1e-10)
    assert gap.min() < -tol and gap.max() > tol
  # The rank longest steps are exactly the learned ones.
  values, vectors = np.linalg.eigh(inverse)
  np.testing.assert_allclose(truncated @ vectors[:, -5:], vectors[:, -5:] * values[-5:],
                             rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('model', ['float32', 'masked'])
def test_a_rank_above_every_factor_is_metamd(model):
  """With ``rank`` at least every factor's size the optimiser is :func:`metamd` (float32,
  in a chain with a masked leaf too)."""
  divergence = _divergence()
  params = _params(jnp.float32)
  divergence = jax.tree.map(lambda x: x.astype(jnp.float32), divergence)
  ours, theirs = metamd_jax.low_rank_metamd(divergence, 24), metamd_jax.metamd(divergence)
  if model == 'masked':
    mask = {'dense': True, 'bias': False, 'conv': True, 'diag': True}
    ours = optax.masked(ours, mask)
    theirs = optax.masked(theirs, mask)
  grads = _grads(5, params)
  got, _ = ours.update(grads, ours.init(params), params)
  want, _ = theirs.update(grads, theirs.init(params), params)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_named():
  divergence = _divergence()
  for rank in (0, -1, 2.5, True, None):
    with pytest.raises(ValueError, match='rank must be an int >= 1'):
      metamd_jax.low_rank_metamd(divergence, rank)
  with pytest.raises(ValueError, match="fill must be one of \\('min', 'mean', 'max'\\)"):
    metamd_jax.low_rank_metamd(divergence, 2, fill='median')
  with pytest.raises(ValueError, match='learning_rate must be positive'):
    metamd_jax.low_rank_metamd(divergence, 2, learning_rate=0.0)
  optimizer = metamd_jax.low_rank_metamd(divergence, 2)
  state = optimizer.init(_params())
  wrong = {**_grads(0, _params()), 'dense': jnp.zeros((5, 12))}
  with pytest.raises(ValueError, match=r"\['dense'\]"):
    optimizer.update(wrong, state)
  with pytest.raises(ValueError, match=r"\['dense'\]"):
    optimizer.init({**_params(), 'dense': jnp.zeros((5, 12))})


def test_eigen_decomposition_once_at_init_under_jit():
  """For a concrete divergence the truncated factors are computed once, when ``init`` is
  traced: neither a jitted update nor a jitted ``init`` contains an eigendecomposition."""
  divergence = _divergence()
  params = _params(jnp.float32)
  optimizer = metamd_jax.low_rank_metamd(
      jax.tree.map(lambda x: x.astype(jnp.float32), divergence), 3)
  state = optimizer.init(params)
  text = jax.jit(optimizer.update).lower(_grads(1, params), state, params).as_text()
  assert 'eigh' not in text.lower() and 'syevd' not in text.lower()
  # Nor a jitted init: the eigendecomposition runs once, when init is traced.
  text = jax.jit(optimizer.init).lower(params).as_text()
  assert 'eigh' not in text.lower() and 'syevd' not in text.lower()


@pytest.mark.parametrize('structure', ['diagonal', 'scalar'])
def test_elementwise_divergences_are_kept_as_they_are(structure):
  """A diagonal or scalar divergence has no factor to truncate: the optimiser is
  :func:`metamd` at any rank."""
  params = _params(jnp.float32)
  divergence = randomize(metamd_jax.init_divergence(params, 0.1, structure=structure), 4,
                         scale=0.5)
  grads = _grads(6, params)
  ours, theirs = metamd_jax.low_rank_metamd(divergence, 1), metamd_jax.metamd(divergence)
  got, _ = ours.update(grads, ours.init(params), params)
  want, _ = theirs.update(grads, theirs.init(params), params)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
