"""Convex families: shared Kronecker curvature, closed-form optimum, numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metamd_jax
from metamd_jax.tasks import LeastSquaresFamily, LogisticRegressionFamily


def _least_squares(**kwargs):
  options = dict(input_dim=4, output_dim=3, num_samples=50, batch_size=16, condition=100.0,
                 noise=0.1, seed=0)
  options.update(kwargs)
  return LeastSquaresFamily(**options)


def _logistic(**kwargs):
  options = dict(input_dim=5, num_classes=3, num_samples=400, batch_size=32, seed=0)
  options.update(kwargs)
  return LogisticRegressionFamily(**options)


@pytest.mark.parametrize('make', [_least_squares, _logistic])
def test_sample_is_deterministic_and_differs_across_keys(make):
  family = make()
  a, b = family.sample(jax.random.key(5)), family.sample(jax.random.key(5))
  c = family.sample(jax.random.key(6))
  raw = family.sample(jax.random.PRNGKey(5))
  assert set(a) == {'data_key', 'init_key', 'order_key'}
  for name in a:
    assert a[name].dtype == jnp.uint32
    np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(a[name], raw[name])
    assert not np.array_equal(a[name], c[name])
  xa, ya, _ = family.data(a)
  xb, yb, _ = family.data(b)
  xc, _, _ = family.data(c)
  np.testing.assert_array_equal(xa, xb)
  np.testing.assert_array_equal(ya, yb)
  assert not np.allclose(xa, xc)
  assert xa.shape == (family.num_samples, family.input_dim)


def test_jit_vmap_least_squares_loss():
  family = _least_squares(init_scale=0.1)
  task_params = jax.vmap(family.sample)(jax.random.split(jax.random.key(0), 3))

  def first_loss(tp):
    task = family.task(tp)
    params, batch = task.init(), task.batch(0)
    return task.loss(params, batch), params, batch

  losses, params, batch = jax.jit(jax.vmap(first_loss))(task_params)
  assert losses.shape == (3,) and len(np.unique(np.asarray(losses))) == 3
  one = jax.tree.map(lambda a: a[1], (params, batch))
  np.testing.assert_allclose(losses[1], family.loss(*one), rtol=1e-5)


@pytest.mark.parametrize('make', [_least_squares, _logistic])
def test_batches_cover_data_once_per_epoch(make):
  family = make()
  task_params = family.sample(jax.random.key(2))
  n, b = family.num_samples, family.batch_size
  assert n % b != 0  # batches straddle epochs
  num_steps = 2 * n // b + 1
  task = family.task(task_params)

  @jax.jit
  def run(steps):
    return jax.vmap(lambda s: family.batch_indices(task_params, s))(steps), jax.vmap(
        task.batch)(steps), family.data(task_params)

  idx, (bx, by), (x, y, _) = run(jnp.arange(num_steps))
  idx = np.asarray(idx)
  flat = idx.ravel()
  for epoch in range(2):
    np.testing.assert_array_equal(np.sort(flat[epoch * n:(epoch + 1) * n]), np.arange(n))
  assert not np.array_equal(flat[:n], flat[n:2 * n])
  # The same float32 data computed in two programs: XLA may fuse it differently (values of
  # order 1 agree to a few float32 ulps; near-zero ones to an absolute 1e-6).
  np.testing.assert_allclose(bx, np.asarray(x)[idx], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(by, np.asarray(y)[idx], rtol=1e-6, atol=1e-6)
  # The run's batches, sampled once (one permutation per epoch), are the same rows.
  rx, ry = jax.jit(lambda: jax.vmap(task.run_batches(num_steps))(jnp.arange(num_steps)))()
  np.testing.assert_allclose(rx, np.asarray(x)[idx], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ry, np.asarray(y)[idx], rtol=1e-6, atol=1e-6)
  # Past the limit a run keeps the per-step batches (the same rows).
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr('metamd_jax.tasks.classification.RUN_INDICES_LIMIT', b * (num_steps - 1))
    assert task.run_batches(num_steps).__name__ == 'batch'  # the per-step function
    assert task.run_batches(num_steps - 1).__name__ == 'batch_of_run'
    lx, _ = jax.jit(lambda: jax.vmap(task.run_batches(num_steps))(jnp.arange(num_steps)))()
  np.testing.assert_allclose(lx, bx, rtol=1e-6, atol=1e-6)


def test_least_squares_loss_matches_numpy():
  family = _least_squares(init_scale=0.5)
  task = family.task(family.sample(jax.random.key(1)))
  params = task.init()
  assert params['w'].shape == (4, 3) and float(jnp.abs(params['w']).sum()) > 0
  x, y = (np.asarray(a, np.float64) for a in task.batch(jnp.int32(1)))
  _, c = (np.asarray(a, np.float64) for a in family.hessian_factors())
  r = x @ np.asarray(params['w'], np.float64) - y
  expected = 0.5 * np.mean([ri @ c @ ri for ri in r])
  np.testing.assert_allclose(task.loss(params, (x, y)), expected, rtol=1e-5)
  zero_init = _least_squares().task(family.sample(jax.random.key(1))).init()
  np.testing.assert_array_equal(zero_init['w'], np.zeros((4, 3)))


def test_least_squares_factors_have_the_requested_spectrum():
  family = _least_squares(input_dim=5, output_dim=3, condition=64.0)
  s, c = (np.asarray(a, np.float64) for a in family.hessian_factors())
  np.testing.assert_allclose(s, s.T, atol=1e-12)
  np.testing.assert_allclose(np.linalg.eigvalsh(s), np.geomspace(1, 8, 5), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.eigvalsh(c), np.geomspace(1, 8, 3), rtol=1e-5)
  assert np.linalg.cond(np.kron(s, c)) == pytest.approx(64.0, rel=1e-4)
  s_other, _ = _least_squares(input_dim=5, output_dim=3, seed=1).hessian_factors()
  assert not np.allclose(s, s_other)
  s_same, _ = _least_squares(input_dim=5, output_dim=3, condition=64.0).hessian_factors()
  np.testing.assert_array_equal(s, s_same)


def test_least_squares_hessian_is_kronecker(x64):
  family = _least_squares()
  task_params = family.sample(jax.random.key(3))
  task = family.task(task_params)
  x, y, _ = family.data(task_params)
  assert x.dtype == jnp.float64
  _, c = family.hessian_factors()
  d, o = family.input_dim, family.output_dim

  def flat_loss(w_flat, batch):  # row-major vec(W)
    return task.loss({'w': w_flat.reshape(d, o)}, batch)

  w0 = jnp.asarray(np.random.default_rng(0).standard_normal(d * o))
  for batch in [(x, y), task.batch(jnp.int32(2))]:
    bx = np.asarray(batch[0])
    hessian = jax.jit(jax.hessian(flat_loss))(w0, batch)
    expected = np.kron(bx.T @ bx / len(bx), np.asarray(c))
    np.testing.assert_allclose(hessian, expected, rtol=1e-10, atol=1e-12)


def test_least_squares_empirical_covariance_approaches_s(x64):
  family = _least_squares(num_samples=40000, batch_size=40000)
  s, _ = family.hessian_factors()
  x, _, _ = family.data(family.sample(jax.random.key(4)))
  empirical = np.asarray(x.T @ x / x.shape[0])
  error = np.linalg.norm(empirical - np.asarray(s)) / np.linalg.norm(np.asarray(s))
  assert error < 0.03


def test_least_squares_closed_form_optimum(x64):
  family = _least_squares()
  task_params = family.sample(jax.random.key(5))
  task = family.task(task_params)
  x, y, w_star = family.data(task_params)
  optimum, optimal_loss = family.optimum(task_params)
  gradient = jax.grad(task.loss)(optimum, (x, y))['w']
  assert float(jnp.max(jnp.abs(gradient))) < 1e-10
  np.testing.assert_allclose(optimum['w'], np.linalg.lstsq(np.asarray(x), np.asarray(y),
                                                           rcond=None)[0], rtol=1e-8)
  # Noise 0.1: the optimum is near W*, and the residual is the noise.
  np.testing.assert_allclose(optimum['w'], w_star, atol=0.2)
  assert float(optimal_loss) <= float(task.loss({'w': w_star}, (x, y)))
  metrics = task.evaluate(optimum)
  np.testing.assert_allclose(metrics['optimal_loss'], optimal_loss, rtol=1e-10)
  assert abs(float(metrics['suboptimality'])) < 1e-10
  assert float(task.evaluate(task.init())['suboptimality']) > 1.0
  noiseless = _least_squares(noise=0.0)
  w_opt, loss_opt = noiseless.optimum(task_params)
  np.testing.assert_allclose(w_opt['w'], noiseless.data(task_params)[2], atol=1e-8)
  assert float(loss_opt) < 1e-15


def test_least_squares_rollout_approaches_optimum():
  family = _least_squares(condition=10.0)
  task = family.task(family.sample(jax.random.key(6)))
  divergence = metamd_jax.init_divergence(task.init(), 0.05)
  result = jax.jit(lambda d: metamd_jax.rollout(d, task, 300))(divergence)
  before = task.evaluate(task.init())['suboptimality']
  after = task.evaluate(result.final_params)['suboptimality']
  assert float(after) < 0.05 * float(before)


def test_jit_vmap_logistic_loss_and_evaluate_match_numpy():
  family = _logistic(init_scale=0.3)
  task_params = jax.vmap(family.sample)(jax.random.split(jax.random.key(7), 3))

  @jax.jit
  @jax.vmap
  def run(tp):
    task = family.task(tp)
    params, batch = task.init(), task.batch(jnp.int32(4))
    return params, batch, task.loss(params, batch), task.evaluate(params), family.data(tp)

  params, batch, losses, metrics, data = run(task_params)
  assert losses.shape == (3,) and len(np.unique(np.asarray(losses))) == 3
  params, (bx, by), batch_loss, metrics, data = jax.tree.map(
      lambda a: a[1], (params, batch, losses, metrics, data))
  x, y, w_star = (np.asarray(a) for a in data)
  assert y.dtype == np.int32 and set(np.unique(y)) <= {0, 1, 2}

  def reference(px, py):
    logits = px.astype(np.float64) @ np.asarray(params['w'], np.float64) + np.asarray(
        params['b'], np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.mean(log_z - logits[np.arange(len(py)), py]), np.mean(logits.argmax(-1) == py)

  np.testing.assert_allclose(batch_loss, reference(np.asarray(bx), np.asarray(by))[0], rtol=1e-5)
  loss, accuracy = reference(x, y)
  np.testing.assert_allclose(metrics['train_loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['train_accuracy'], accuracy, rtol=1e-6)
  # Labels follow softmax(x W*): W* predicts them well above chance.
  assert np.mean((x @ w_star).argmax(-1) == y) > 0.55
  # Shared input covariance.
  s = np.asarray(family.input_covariance())
  np.testing.assert_allclose(np.linalg.eigvalsh(s), np.geomspace(1, 100, 5), rtol=1e-4)


def test_logistic_rollout_decreases_loss():
  family = _logistic()
  task = family.task(family.sample(jax.random.key(8)))
  divergence = metamd_jax.init_divergence(task.init(), 0.01)
  result = jax.jit(lambda d: metamd_jax.rollout(d, task, 200))(divergence)
  before = task.evaluate(task.init())
  after = task.evaluate(result.final_params)
  assert float(after['train_loss']) < float(before['train_loss']) - 0.2
  assert float(after['train_accuracy']) > 0.55


@pytest.mark.parametrize('kwargs, name', [
    (dict(input_dim=0), 'input_dim'),
    (dict(output_dim=2.5), 'output_dim'),
    (dict(num_samples=-1), 'num_samples'),
    (dict(batch_size=51), 'batch_size'),
    (dict(condition=0.5), 'condition'),
    (dict(noise=-0.1), 'noise'),
    (dict(seed='a'), 'seed'),
])
def test_least_squares_rejects_bad_values(kwargs, name):
  with pytest.raises(ValueError, match=name):
    _least_squares(**kwargs)


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_classes=1), 'num_classes'),
    (dict(batch_size=0), 'batch_size'),
    (dict(condition=float('inf')), 'condition'),
    (dict(input_dim=True), 'input_dim'),
])
def test_logistic_rejects_bad_values(kwargs, name):
  with pytest.raises(ValueError, match=name):
    _logistic(**kwargs)
