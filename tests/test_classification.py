"""ClassificationFamily: task parameters, batch order, loss and training on sklearn digits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metamd_jax
from metamd_jax import datasets, evaluation, models
from metamd_jax.tasks import ClassificationFamily
from metamd_jax.tasks.base import batches_of
from metamd_jax.tasks.classification import epoch_batch_indices, epoch_run_indices


@pytest.fixture(scope='module')
def digits():
  return datasets.train_test_split(datasets.load_digits(), 0.2, seed=0)


def _family(digits, subset_size=200, batch_size=32, l2=0.0, **kwargs):
  train, test = digits
  return ClassificationFamily(train, test, models.MLP((16,), num_classes=10), batch_size,
                              subset_size, l2=l2, **kwargs)


def _np_mlp_loss(params, x, y, l2=0.0):
  """Independent float64 numpy forward pass of MLP((16,)) and its cross-entropy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.maximum(x.reshape(len(x), -1) @ p['Dense_0']['kernel'] + p['Dense_0']['bias'], 0)
  logits = h @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  ce = -log_probs[np.arange(len(y)), y]
  reg = 0.5 * l2 * sum(np.sum(a * a) for a in jax.tree.leaves(p))
  return ce.mean() + reg, ce.mean(), (logits.argmax(-1) == y).mean()


def test_sample_is_deterministic_and_differs_across_keys(digits):
  family = _family(digits)
  a = family.sample(jax.random.key(3))
  b = family.sample(jax.random.key(3))
  c = family.sample(jax.random.key(4))
  raw = family.sample(jax.random.PRNGKey(3))  # raw uint32 key data, same seed
  assert set(a) == {'init_key', 'order_key', 'subset'}
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(a[name], raw[name])
    assert not np.array_equal(a[name], c[name]), name
  assert a['init_key'].dtype == jnp.uint32 and a['subset'].dtype == jnp.int32
  assert not np.array_equal(a['init_key'], a['order_key'])


def test_count_tasks_takes_stacked_task_parameters_only(digits):
  """``count_tasks``: the leading axis of ``sample_batch``'s layout; one task's parameters
  (not stacked), a ragged stack or another tree are named."""
  family = _family(digits)
  stacked = family.sample_batch(jax.random.key(0), 3)
  assert family.count_tasks(stacked) == 3
  assert family.count_tasks(evaluation.tuning_tasks(family, 0, 2)) == 2
  with pytest.raises(ValueError, match=r"task_params\['init_key'\] has the shape \(2,\)"):
    family.count_tasks(family.sample(jax.random.key(0)))
  ragged = {**stacked, 'subset': stacked['subset'][:2]}
  with pytest.raises(ValueError, match=r'different numbers of tasks: \[2, 3\]'):
    family.count_tasks(ragged)
  with pytest.raises(ValueError, match='tree'):
    family.count_tasks({'subset': stacked['subset']})
  with pytest.raises(ValueError, match='no task'):
    family.count_tasks(family.sample_batch(jax.random.key(0), 0))
  for bad in (-1, 2.0, True):  # before, -1 failed in XLA's shape checks
    with pytest.raises(ValueError, match=f'num_tasks must be an int >= 0, got {bad!r}'):
      family.sample_batch(jax.random.key(0), bad)


def test_subset_is_unique_and_within_pool(digits):
  family = _family(digits, subset_size=300)
  pool = len(digits[0])
  subsets = np.asarray(family.sample_batch(jax.random.key(0), 5)['subset'])
  assert subsets.shape == (5, 300)
  for subset in subsets:
    assert len(np.unique(subset)) == 300
    assert subset.min() >= 0 and subset.max() < pool
  assert not np.array_equal(subsets[0], subsets[1])
  whole = _family(digits, subset_size=None).sample(jax.random.key(0))['subset']
  np.testing.assert_array_equal(whole, np.arange(pool))


@pytest.mark.parametrize('subset_size', [192, 200])  # 32 divides 192, not 200
def test_batches_cover_subset_once_per_epoch(digits, subset_size):
  family = _family(digits, subset_size=subset_size, batch_size=32)
  task_params = family.sample(jax.random.key(1))
  subset = np.asarray(task_params['subset'])
  num_steps = 3 * subset_size // 32 + 2
  task = family.task(task_params)
  indices, (x, y) = jax.jit(jax.vmap(lambda s: (family.batch_indices(task_params, s),
                                                task.batch(s))))(jnp.arange(num_steps))
  stream = np.asarray(indices).ravel()
  for epoch in range(3):
    chunk = stream[epoch * subset_size:(epoch + 1) * subset_size]
    np.testing.assert_array_equal(np.sort(chunk), np.sort(subset))
  epochs = stream[:3 * subset_size].reshape(3, subset_size)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
  assert not np.array_equal(epochs[0], np.sort(epochs[0]))  # shuffled at all
  # The batches really gather these rows.
  np.testing.assert_array_equal(x, digits[0].x[np.asarray(indices)])
  np.testing.assert_array_equal(y, digits[0].y[np.asarray(indices)])


def test_epoch_batch_indices_large_step_does_not_overflow():
  key = jax.random.key(0)
  step = jnp.int32(2**31 - 1)
  positions = np.asarray(epoch_batch_indices(key, step, 7, 3))
  assert positions.min() >= 0 and positions.max() < 7
  # Same answer as the exact int64 position arithmetic: positions 3*step .. 3*step+2.
  start = 3 * (2**31 - 1)
  for j, p in enumerate(range(start, start + 3)):
    perm = jax.random.permutation(jax.random.fold_in(key, p // 7), 7)
    assert positions[j] == int(perm[p % 7])


@pytest.mark.parametrize('num_examples,batch_size,num_steps',
                         [(200, 32, 20), (192, 32, 13), (7, 3, 11), (5, 5, 4), (9, 2, 0)])
def test_run_indices_are_the_per_step_indices(num_examples, batch_size, num_steps):
  """One permutation per epoch gives every step's positions of the per-step stream: with
  batches straddling two epochs, filling epochs exactly, and no steps."""
  key = jax.random.key(7)
  run = np.asarray(epoch_run_indices(key, num_steps, num_examples, batch_size))
  assert run.shape == (num_steps, batch_size) and run.dtype == np.int32
  for step in range(num_steps):
    np.testing.assert_array_equal(
        run[step], epoch_batch_indices(key, jnp.int32(step), num_examples, batch_size))


@pytest.mark.parametrize('num_steps', [-1, 2.0, True])
def test_run_indices_reject_a_bad_number_of_steps(num_steps):
  with pytest.raises(ValueError, match='num_steps'):
    epoch_run_indices(jax.random.key(0), num_steps, 7, 3)


@pytest.mark.parametrize('subset_size', [192, 200])
def test_run_batches_are_the_tasks_batches_and_train_alike(digits, subset_size):
  """``task.run_batches`` (sampled once per run) gives ``task.batch``'s rows at every step,
  and a training run takes the same steps with it as without it."""
  family = _family(digits, subset_size=subset_size, batch_size=32)
  task = family.task(family.sample(jax.random.key(4)))
  num_steps = 2 * subset_size // 32 + 3
  run = jax.jit(lambda: jax.vmap(batches_of(task, num_steps))(jnp.arange(num_steps)))()
  each = jax.jit(jax.vmap(task.batch))(jnp.arange(num_steps))
  for a, b in zip(run, each):
    np.testing.assert_array_equal(a, b)
  plain = dataclasses.replace(task, run_batches=None)
  assert batches_of(plain, num_steps) is plain.batch
  optimizer = optax.adam(0.01)
  with_run = jax.jit(lambda: evaluation.train(optimizer, task, num_steps))()
  without = jax.jit(lambda: evaluation.train(optimizer, plain, num_steps))()
  np.testing.assert_allclose(with_run[1], without[1], rtol=1e-6)


def test_run_batches_of_a_very_long_run_are_the_per_step_batches(digits, monkeypatch):
  """Past ``RUN_INDICES_LIMIT`` rows a run keeps ``batch(step)`` (no precomputed positions)."""
  from metamd_jax.tasks import classification

  family = _family(digits, subset_size=200, batch_size=32)
  task = family.task(family.sample(jax.random.key(4)))
  monkeypatch.setattr(classification, 'RUN_INDICES_LIMIT', 32 * 10)
  assert task.run_batches(11) is task.batch
  assert task.run_batches(10) is not task.batch


def test_jit_vmap_loss_and_evaluate_match_numpy_reference(digits):
  train, test = digits
  l2 = 0.3
  family = _family(digits, l2=l2, eval_batch_size=64)  # 200 = 3 full chunks + a partial
  task_params = jax.vmap(family.sample)(jax.random.split(jax.random.key(0), 3))
  assert task_params['subset'].shape == (3, 200)

  @jax.jit
  @jax.vmap
  def run(tp):  # One compilation for everything (a vmapped flax init compiles slowly).
    task = family.task(tp)
    params = task.init()
    batch = task.batch(jnp.int32(2))
    # init is model.init(init_key, x[:1])['params'].
    reference = family.model.init(jax.random.wrap_key_data(tp['init_key']), train.x[:1])
    return params, batch, task.loss(params, batch), task.evaluate(params), reference['params']

  params, batch, losses, metrics, reference = run(task_params)
  assert losses.shape == (3,) and len(np.unique(np.asarray(losses))) == 3
  assert set(metrics) == {'train_loss', 'train_accuracy', 'train_objective', 'test_loss',
                          'test_accuracy'}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  one = jax.tree.map(lambda a: np.asarray(a[1]), (params, batch, metrics))
  params, (x, y), metrics = one
  subset = np.asarray(task_params['subset'][1])
  indices = np.asarray(family.batch_indices(jax.tree.map(lambda a: a[1], task_params), 2))
  np.testing.assert_array_equal(x, train.x[indices])
  np.testing.assert_array_equal(y, train.y[indices])
  np.testing.assert_allclose(losses[1], _np_mlp_loss(params, x, y, l2)[0], rtol=1e-5)
  objective, train_ce, train_acc = _np_mlp_loss(params, train.x[subset], train.y[subset], l2)
  _, test_ce, test_acc = _np_mlp_loss(params, test.x, test.y)
  np.testing.assert_allclose(metrics['train_loss'], train_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['train_accuracy'], train_acc, rtol=1e-6)
  np.testing.assert_allclose(metrics['train_objective'], objective, rtol=1e-5)
  np.testing.assert_allclose(metrics['test_loss'], test_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['test_accuracy'], test_acc, rtol=1e-6)


def test_rollout_decreases_loss(digits):
  family = _family(digits, subset_size=256)
  task = family.task(family.sample(jax.random.key(0)))
  params = jax.jit(task.init)()
  divergence = metamd_jax.init_divergence(params, 0.5)
  num_steps = 300
  result = jax.jit(lambda d: metamd_jax.rollout(d, task, num_steps))(divergence)
  losses = np.asarray(result.losses)
  assert np.all(np.isfinite(losses))
  assert losses[-32:].mean() < 0.5 * losses[:8].mean()
  evaluate = jax.jit(task.evaluate)
  before, after = evaluate(params), evaluate(result.final_params)
  assert after['train_loss'] < 0.5 * before['train_loss']
  assert after['test_accuracy'] > 0.6


def test_properties(digits):
  family = _family(digits)
  assert family.num_classes == 10
  assert family.input_shape == (8, 8, 1)
  assert set(jax.eval_shape(family.init_params)) == {'Dense_0', 'Dense_1'}
  no_test = ClassificationFamily(digits[0], None, models.MLP((16,), 10), 32, 64)
  task = no_test.task(no_test.sample(jax.random.key(0)))
  metrics = jax.eval_shape(lambda: task.evaluate(task.init()))
  assert set(metrics) == {'train_loss', 'train_accuracy'}


def test_bad_constructor_values_raise(digits):
  train, test = digits
  mlp = models.MLP((16,), num_classes=10)
  with pytest.raises(ValueError, match=r'num_classes \(5\).*num_classes \(10'):
    ClassificationFamily(train, test, models.MLP((16,), num_classes=5), 32, 100)
  with pytest.raises(ValueError, match='subset_size'):
    ClassificationFamily(train, test, mlp, 32, len(train) + 1)
  with pytest.raises(ValueError, match='subset_size'):
    ClassificationFamily(train, test, mlp, 32, 16)
  with pytest.raises(ValueError, match='batch_size'):
    ClassificationFamily(train, test, mlp, 0, 100)
  with pytest.raises(ValueError, match='l2'):
    ClassificationFamily(train, test, mlp, 32, 100, l2=-1.0)
  with pytest.raises(ValueError, match='test.num_classes'):
    ClassificationFamily(train, datasets.split_by_class(test, [0, 1]), mlp, 32, 100)
