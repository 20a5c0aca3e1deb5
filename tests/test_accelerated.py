"""Accelerated MetaMD: Nesterov's method in the learned geometry, against a float64 numpy
loop of the (y, x) form and against Nesterov's rate on a strongly convex quadratic."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_block_metric, flat
from helpers import quadratic_task, well_conditioned

import metamd_jax


def test_updates_equal_nesterov_in_the_learned_geometry(x64):
  """``y_{t+1} = x_t - h M^{-1} g(x_t)``, ``x_{t+1} = y_{t+1} + beta (y_{t+1} - y_t)``,
  ``y_1 = x_1``, with ``h = step_factor * learning_rate`` and a dense Kronecker ``M``."""
  task = quadratic_task(dims=(4, 3), seed=1, dtype=jnp.float64)
  params = task.init()
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.2, dtype=jnp.float64),
                                seed=1, noise=0.3)
  inverse = np.linalg.inv(dense_block_metric(divergence))
  momentum, learning_rate, step_factor = 0.8, 0.7, 0.5
  optimizer = metamd_jax.accelerated_metamd(divergence, momentum, learning_rate)
  state = optimizer.init(params)
  gradient = jax.jit(jax.grad(task.loss))
  x = flat(params)
  y = x.copy()
  h = step_factor * learning_rate
  for t in range(12):
    grads = gradient(params, task.batch(jnp.asarray(t)))
    np.testing.assert_allclose(flat(params), x, rtol=1e-12, atol=1e-14)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    y_next = x - h * inverse @ flat(grads)
    x, y = y_next + momentum * (y_next - y), y_next
  np.testing.assert_allclose(flat(params), x, rtol=1e-12, atol=1e-14)
  assert np.abs(x - flat(task.init())).max() > 0.1  # it moved


def _quadratic_in_the_metric(metric, eigenvalues, seed):
  """``H = M^{1/2} Q diag(eigenvalues) Q^T M^{1/2}``: its eigenvalues relative to ``M``."""
  rng = np.random.default_rng(seed)
  values, vectors = np.linalg.eigh(metric)
  root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
  q, _ = np.linalg.qr(rng.standard_normal(metric.shape))
  return root @ q @ np.diag(eigenvalues) @ q.T @ root


def test_default_step_factor_accelerates_wherever_metamd_is_stable(x64):
  """A quadratic whose curvature relative to ``M / learning_rate`` lies in
  ``[2 mu, 1.98]`` (MetaMD's own step is stable: every value below 2). With the default
  ``step_factor = 1/2`` and ``beta = (1 - sqrt(mu)) / (1 + sqrt(mu))``, every ``y_t`` meets
  Nesterov's bound ``(1 + mu)/2 ||x_1 - x*||^2_{M/h} exp(-(t - 1) sqrt(mu))``, while MetaMD's
  plain step at the same ``h`` ends a hundred times higher."""
  shape = (4, 3)
  params = {'w': jnp.zeros(shape, jnp.float64)}
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.5, dtype=jnp.float64),
                                seed=2, noise=0.3)
  metric = dense_block_metric(divergence)
  learning_rate, mu, num_steps = 0.5, 0.01, 60
  size = metric.shape[0]
  relative = np.geomspace(2 * mu, 1.98, size)  # both ends included
  hessian = _quadratic_in_the_metric(metric / learning_rate, relative, seed=2)
  target = np.random.default_rng(3).standard_normal(size)

  def loss(w):
    diff = jnp.ravel(w) - target
    return 0.5 * diff @ jnp.asarray(hessian) @ diff

  beta = (1 - math.sqrt(mu)) / (1 + math.sqrt(mu))
  h = 0.5 * learning_rate  # the default step factor
  norm_metric = metric / h  # mu M/h <= H <= M/h
  eigenvalues = np.linalg.eigvals(np.linalg.solve(norm_metric, hessian)).real
  assert mu - 1e-9 <= eigenvalues.min() and eigenvalues.max() <= 1 + 1e-9

  def run(optimizer, recover_y):
    w = params['w']
    state = optimizer.init({'w': w})
    step = jax.jit(lambda w, state: optimizer.update({'w': jax.grad(loss)(w)}, state, {'w': w}))
    values = []
    for _ in range(num_steps):
      updates, state = step(w, state)
      w = w + updates['w']
      values.append(float(loss(recover_y(w, state))))
    return np.array(values)

  # y_{t+1} = x_{t+1} - step_factor * beta * m_t, m_t the trace (optax.trace's state).
  accelerated = run(metamd_jax.accelerated_metamd(divergence, beta, learning_rate),
                    lambda w, state: w - 0.5 * beta * state[1][0].trace['w'])
  plain = run(metamd_jax.metamd(divergence, h), lambda w, state: w)
  start = np.zeros(size) - target
  t = np.arange(2, num_steps + 2)  # values[i] is f(y_{i + 2})
  bound = (1 + mu) / 2 * (start @ norm_metric @ start) * np.exp(-(t - 1) * math.sqrt(mu))
  assert np.all(accelerated <= bound)
  assert accelerated[-1] < plain[-1] / 100  # the plain step is not accelerated


@pytest.mark.parametrize('momentum', [0.5, 0.9, 0.99])
def test_default_step_factor_is_stable_where_metamd_is_and_a_unit_factor_is_not(x64,
                                                                                momentum):
  """Curvature relative to ``M / learning_rate`` in ``[0.5, 1.9]``: MetaMD's step is
  stable there; with the default factor 1/2 Nesterov's iteration converges for any
  momentum, with factor 1 it diverges (stable only below ``2 (1 + beta) / (1 + 2 beta)``)."""
  params = {'w': jnp.zeros((3, 2), jnp.float64)}
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.5, dtype=jnp.float64),
                                seed=7, noise=0.3)
  metric = dense_block_metric(divergence)
  hessian = _quadratic_in_the_metric(metric, np.linspace(0.5, 1.9, 6), seed=7)
  target = np.random.default_rng(8).standard_normal(6)

  def loss(w):
    diff = jnp.ravel(w) - target
    return 0.5 * diff @ jnp.asarray(hessian) @ diff

  def final_loss(optimizer):
    w, state = params['w'], optimizer.init(params)
    for _ in range(200):
      updates, state = optimizer.update({'w': jax.grad(loss)(w)}, state, {'w': w})
      w = w + updates['w']
    return float(loss(w))

  start = float(loss(params['w']))
  assert final_loss(metamd_jax.metamd(divergence)) < 1e-6 * start
  assert final_loss(metamd_jax.accelerated_metamd(divergence, momentum)) < 1e-6 * start
  unit = metamd_jax.accelerated_metamd(divergence, momentum, step_factor=1.0)
  assert not final_loss(unit) < start  # grows without bound (or overflows)


def test_zero_momentum_and_unit_factor_is_metamd():
  task = quadratic_task(dims=(4, 3), seed=5)
  params = task.init()
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.2), seed=5)
  grads = jax.grad(task.loss)(params, task.batch(jnp.asarray(0)))
  plain = metamd_jax.metamd(divergence, 0.3)
  accelerated = metamd_jax.accelerated_metamd(divergence, 0.0, 0.3, step_factor=1.0)
  expected, _ = plain.update(grads, plain.init(params), params)
  updates, _ = accelerated.update(grads, accelerated.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_momentum_follows_blended_metamd_under_vmap():
  """Chained after blended MetaMD, a vmapped run over tasks equals the runs one by one."""
  task = quadratic_task(dims=(4, 3), seed=6)
  params = task.init()
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.2), seed=6)
  optimizer = optax.chain(metamd_jax.blended_metamd(divergence, 0.5, 0.1, per_leaf=True),
                          metamd_jax.nesterov_momentum(0.9))
  grads = jax.tree.map(lambda x: jnp.stack([x, -2 * x, 0.5 * x]),
                       jax.grad(task.loss)(params, task.batch(jnp.asarray(0))))

  def two_steps(g):
    state = optimizer.init(params)
    first, state = optimizer.update(g, state, params)
    second, _ = optimizer.update(g, state, optax.apply_updates(params, first))
    return second

  batched = jax.vmap(two_steps)(grads)
  for i in range(3):
    one = two_steps(jax.tree.map(lambda x, i=i: x[i], grads))
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('momentum', [-0.1, 1.0, float('nan')])
def test_momentum_outside_the_unit_interval_is_named(momentum):
  with pytest.raises(ValueError, match=r'momentum must be a float in \[0, 1\)'):
    metamd_jax.nesterov_momentum(momentum)


@pytest.mark.parametrize('momentum', ['high', None, True])
def test_momentum_that_is_not_a_number_is_named(momentum):
  with pytest.raises(TypeError, match=r'momentum must be a float in \[0, 1\)'):
    metamd_jax.nesterov_momentum(momentum)


@pytest.mark.parametrize('factor', [0.0, -1.0, math.inf, math.nan])
def test_bad_step_factor_is_named(factor):
  with pytest.raises(ValueError, match='step_factor must be a positive finite float'):
    metamd_jax.nesterov_momentum(0.9, factor)


@pytest.mark.parametrize('factor', ['half', None, True])
def test_step_factor_that_is_not_a_number_is_named(factor):
  with pytest.raises(TypeError, match='step_factor must be a positive finite float'):
    metamd_jax.nesterov_momentum(0.9, factor)


def test_traced_momentum_and_step_factor_match_the_concrete_ones():
  # Settings that change from one epoch to the next (doubling_restarts) arrive traced.
  grads = {'w': jnp.array([1.0, -2.0])}
  params = {'w': jnp.zeros(2)}

  def two_updates(momentum, step_factor):
    optimizer = metamd_jax.nesterov_momentum(momentum, step_factor)
    state = optimizer.init(params)
    first, state = optimizer.update(grads, state)
    second, _ = optimizer.update(grads, state)
    return first['w'], second['w']

  traced = jax.jit(two_updates)(jnp.float32(0.9), jnp.float32(0.2))
  concrete = two_updates(0.9, 0.2)
  # By hand: m_1 = g, update = 0.2 (g + 0.9 m_1); m_2 = g + 0.9 g.
  g = grads['w']
  np.testing.assert_allclose(concrete[0], 0.2 * 1.9 * g, rtol=1e-6)
  np.testing.assert_allclose(concrete[1], 0.2 * (g + 0.9 * 1.9 * g), rtol=1e-6)
  for a, b in zip(traced, concrete):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bad_learning_rate_is_named():
  params = {'w': jnp.zeros((2, 2))}
  with pytest.raises(ValueError, match='learning_rate must be positive'):
    metamd_jax.accelerated_metamd(metamd_jax.init_divergence(params, 0.1), 0.9, -1.0)
