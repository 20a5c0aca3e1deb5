"""Meta-testing helpers against plain Python references."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from helpers import QuadraticFamily, quadratic_task

from metamd_jax import evaluation, meta_train


def _python_loop(optimizer, task, num_steps, every=0):
  """The reference: a plain Python optax loop; ``(params, losses, whole-set losses)``."""
  reference = task.init()
  state = optimizer.init(reference)
  tracked = [task.evaluate(reference)['train_loss']] if every else []
  expected = []
  for t in range(num_steps):
    loss, grads = jax.value_and_grad(task.loss)(reference, task.batch(t))
    updates, state = optimizer.update(grads, state, reference)
    reference = optax.apply_updates(reference, updates)
    expected.append(loss)
    if every and (t + 1) % every == 0:
      tracked.append(task.evaluate(reference)['train_loss'])
  return reference, expected, tracked


def test_train_equals_a_python_optax_loop():
  task = quadratic_task()
  optimizer = optax.adam(0.05)
  params, losses = jax.jit(lambda: evaluation.train(optimizer, task, 6))()
  reference, expected, _ = _python_loop(optimizer, task, 6)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_train_passes_the_loss_to_optimizers_that_take_it():
  """The minibatch loss arrives as ``value`` (optax's extra arguments)."""
  task = quadratic_task()

  def scale_by_loss(updates, state, params=None, value=None, **extra):
    del params, extra
    return jax.tree.map(lambda u: value * u, updates), state

  taking = optax.chain(
      optax.GradientTransformationExtraArgs(optax.init_empty_state, scale_by_loss),
      optax.sgd(0.1))
  _, losses = evaluation.train(taking, task, 4)
  # By hand: each gradient times its minibatch loss, then sgd.
  params, want = task.init(), []
  for t in range(4):
    loss, grads = jax.value_and_grad(task.loss)(params, task.batch(t))
    params = jax.tree.map(lambda p, g, loss=loss: p - 0.1 * loss * g, params, grads)
    want.append(loss)
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  _, expected, _ = _python_loop(optax.sgd(0.1), task, 4)
  assert not np.allclose(losses[1:], expected[1:], rtol=1e-3)  # the loss did scale



@pytest.mark.parametrize('tracked', [False, True])
def test_runs_take_the_run_batches_of_a_task_that_has_them(tracked):
  """``train`` and ``train_tracked`` ask ``run_batches`` once for the run's length and
  train on what it returns (here other batches than ``batch``'s, to tell them apart)."""
  task = _with_full_loss(quadratic_task())
  asked = []

  def run_batches(num_steps):
    asked.append(num_steps)
    return lambda step: task.batch(step + 1)

  shifted = dataclasses.replace(task, run_batches=run_batches)
  optimizer = optax.sgd(0.1)
  if tracked:
    _, losses, _ = jax.jit(lambda: evaluation.train_tracked(optimizer, shifted, 6, 3))()
  else:
    _, losses = jax.jit(lambda: evaluation.train(optimizer, shifted, 6))()
  assert asked == [6]
  _, expected, _ = _python_loop(optimizer, dataclasses.replace(
      task, batch=lambda step: task.batch(step + 1)), 6)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_final_losses_and_curve_stats():
  losses = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
  np.testing.assert_allclose(evaluation.final_loss(losses, 2), [1.0, 9.0])
  assert evaluation.final_loss(np.array([[1.0, np.nan]]), 2)[0] == np.inf
  tracked = np.array([[3.0, 2.0, 1.0], [5.0, np.inf, np.nan]])
  np.testing.assert_array_equal(evaluation.final_train_loss(tracked), [1.0, np.inf])
  mean, std = evaluation.curve_stats(tracked)
  np.testing.assert_allclose(mean, [4.0, 2.0, 1.0])  # diverged entries are left out
  np.testing.assert_allclose(std, [1.0, 0.0, 0.0])


def test_tune_learning_rate_picks_the_lowest_final_loss():
  family = QuadraticFamily()
  tasks = meta_train.sample_tasks(family, jax.random.key(0), 0, 2)
  best, scores = evaluation.tune_learning_rate(optax.sgd, [1e-3, 0.3, 10.0], family, tasks,
                                               20, window=3)
  assert best == 0.3
  assert scores[10.0] == np.inf and scores[1e-3] > scores[0.3]
  with pytest.raises(evaluation.AllDivergedError, match='diverged'):
    evaluation.tune_learning_rate(optax.sgd, [10.0, 100.0], family, tasks, 20, window=3)


def test_tune_learning_rate_on_the_whole_set_loss():
  family = QuadraticFamily()
  tasks = meta_train.sample_tasks(family, jax.random.key(0), 0, 2)
  rates = [1e-3, 0.1, 0.3, 10.0]
  best, scores = evaluation.tune_learning_rate(optax.sgd, rates, family, tasks, 20, window=3,
                                               score='train_loss')
  for lr in rates[:3]:  # the score is the mean whole-set loss of the final parameters
    curves = evaluation.run(optax.sgd(lr), family, tasks, 20)
    np.testing.assert_allclose(scores[lr], np.mean(curves.metrics['train_loss']), rtol=1e-5)
  assert best == min(rates[:3], key=scores.get) and scores[10.0] == np.inf
  with pytest.raises(ValueError, match='score must be'):
    evaluation.tune_learning_rate(optax.sgd, rates, family, tasks, 20, window=3, score='x')


@pytest.mark.parametrize('score', ['minibatch', 'train_loss'])
def test_tune_learning_rate_sequential_gives_the_vmapped_scores(score):
  """``sequential=True`` maps over the grid instead of vmapping: same scores, same pick."""
  family = QuadraticFamily()
  tasks = meta_train.sample_tasks(family, jax.random.key(0), 0, 2)
  rates = [1e-3, 0.1, 0.3, 10.0]
  vmapped = evaluation.tune_learning_rate(optax.adam, rates, family, tasks, 20, window=3,
                                          score=score)
  mapped = evaluation.tune_learning_rate(optax.adam, rates, family, tasks, 20, window=3,
                                         score=score, sequential=True)
  assert mapped[0] == vmapped[0] and list(mapped[1]) == rates
  np.testing.assert_allclose([mapped[1][lr] for lr in rates],
                             [vmapped[1][lr] for lr in rates], rtol=1e-5)
  with pytest.raises(evaluation.AllDivergedError, match='diverged'):
    evaluation.tune_learning_rate(optax.sgd, [10.0, 100.0], family, tasks, 20, window=3,
                                  sequential=True)


def _with_full_loss(task):
  """The quadratic task with ``evaluate``: the loss over all of its 32 rows."""
  everything = (jax.numpy.concatenate([task.batch(i)[0] for i in range(4)]),
                jax.numpy.concatenate([task.batch(i)[1] for i in range(4)]))
  return dataclasses.replace(
      task, evaluate=lambda params: {'train_loss': task.loss(params, everything)})


@pytest.mark.parametrize('every', [1, 3])
def test_train_tracked_records_the_whole_set_loss_of_a_python_loop(every):
  task = _with_full_loss(quadratic_task())
  optimizer = optax.sgd(0.1, momentum=0.5)
  params, losses, tracked = jax.jit(
      lambda: evaluation.train_tracked(optimizer, task, 6, every))()
  reference, expected, expected_tracked = _python_loop(optimizer, task, 6, every)
  assert len(expected_tracked) == 6 // every + 1
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(tracked, expected_tracked, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_run_tracks_the_training_loss_of_every_task():
  family = QuadraticFamily()
  tasks = meta_train.sample_tasks(family, jax.random.key(1), 0, 3)
  curves = evaluation.run(optax.sgd(0.1), family, tasks, 8, track_every=4)
  assert curves.train_losses.shape == (3, 3) and curves.every == 4
  for i in range(3):
    task = family.task(jax.tree.map(lambda x, i=i: x[i], tasks))
    _, _, tracked = evaluation.train_tracked(optax.sgd(0.1), task, 8, 4)
    np.testing.assert_allclose(curves.train_losses[i], tracked, rtol=1e-6)
  assert evaluation.run(optax.sgd(0.1), family, tasks, 8).train_losses is None
  # One task's parameters, not stacked: named before anything runs.
  with pytest.raises(ValueError, match='stacked tasks have'):
    evaluation.run(optax.sgd(0.1), family, family.sample(jax.random.key(1)), 8)


def test_train_tracked_rejects_bad_arguments():
  task = quadratic_task()
  with pytest.raises(ValueError, match='no evaluate'):
    evaluation.train_tracked(optax.sgd(0.1), task, 4)
  with pytest.raises(ValueError, match='multiple of every'):
    evaluation.train_tracked(optax.sgd(0.1), _with_full_loss(task), 5, every=2)
  with pytest.raises(ValueError, match='every must be'):
    evaluation.train_tracked(optax.sgd(0.1), _with_full_loss(task), 4, every=0)
  no_key = dataclasses.replace(task, evaluate=lambda params: {'accuracy': 1.0})
  with pytest.raises(ValueError, match="'train_loss'"):
    evaluation.train_tracked(optax.sgd(0.1), no_key, 4)


def test_steps_to_loss_reads_the_first_step_at_the_target():
  tracked = np.array([[5.0, 4.0, 2.0, 2.0, 1.0], [9.0, 9.0, 9.0, 9.0, 8.0]])
  np.testing.assert_array_equal(evaluation.steps_to_loss(tracked, 2.0, every=3)[0], 6.0)
  steps = evaluation.steps_to_loss(tracked, np.array([5.0, 1.0]))
  assert steps[0] == 0 and np.isnan(steps[1])
  runs = np.random.default_rng(0).uniform(0.1, 2.0, size=(20, 11)).astype(np.float32)
  assert np.all(evaluation.steps_to_loss(runs, runs[:, -1]) <= 10)  # a run reaches its own


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('seed', [0, 7])
def test_tuning_and_held_out_tasks_keep_their_keys(seed):
  family = QuadraticFamily()
  # The protocol's keys: step 0 of meta-training's sampling, from seed + a fixed offset.
  assert (evaluation.TUNE_KEY_OFFSET, evaluation.TEST_KEY_OFFSET) == (1_000_003, 2_000_003)
  tune = evaluation.tuning_tasks(family, seed, 3)
  test = evaluation.held_out_tasks(family, seed, 4)
  assert _leaves_equal(tune, meta_train.sample_tasks(
      family, jax.random.key(seed + 1_000_003), 0, 3))
  assert _leaves_equal(test, meta_train.sample_tasks(
      family, jax.random.key(seed + 2_000_003), 0, 4))
  assert test['target'].shape == (4, 3, 2)
  assert not np.array_equal(evaluation.tuning_tasks(family, seed, 4)['target'],
                            test['target'])
  with pytest.raises(ValueError, match='num_tasks'):
    evaluation.held_out_tasks(family, seed, 0)


def test_mean_std_and_reached_fraction_against_numpy():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(4, 5))
  values[0, 1], values[2, 3], values[3, 0] = np.nan, np.inf, -np.inf
  finite = values[np.isfinite(values)]
  mean, std = evaluation.mean_std(values)
  assert isinstance(mean, float) and isinstance(std, float)
  np.testing.assert_allclose([mean, std], [np.mean(finite), np.std(finite)], rtol=1e-12)
  assert evaluation.mean_std([2.0]) == (2.0, 0.0)
  assert all(np.isnan(evaluation.mean_std([np.nan, np.inf])))
  assert all(np.isnan(evaluation.mean_std([])))
  assert evaluation.reached_fraction(values) == 17 / 20
  steps = evaluation.steps_to_loss(np.array([[3.0, 1.0], [3.0, 2.0]]), np.array([1.0, 1.0]))
  assert evaluation.reached_fraction(steps) == 0.5


def test_compile_hoisted_is_jit_and_shares_one_program_across_captured_arrays():
  rng = np.random.default_rng(0)
  data = [rng.standard_normal((7, 3)).astype(np.float32) for _ in range(2)]

  def closure(x):  # closes over an array, as run() closes over a divergence and data
    return lambda w, extra: {'loss': jax.numpy.sum((x @ w['w']) ** 2) + extra,
                             'grad': jax.grad(lambda v: jax.numpy.sum(jax.numpy.tanh(x @ v)))(
                                 w['w'])}

  w, extra = {'w': np.ones(3, np.float32)}, np.float32(0.5)
  before = len(evaluation._COMPILED)
  outputs = [evaluation.compile_hoisted(closure(x), w, extra)() for x in data]
  # One new program for both closures: the captured arrays are its arguments.
  assert len(evaluation._COMPILED) == before + 1
  for x, out in zip(data, outputs):
    expected = jax.jit(closure(x))(w, extra)
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # A different shape is a different program.
  evaluation.compile_hoisted(closure(data[0][:4]), w, extra)()
  assert len(evaluation._COMPILED) == before + 2
