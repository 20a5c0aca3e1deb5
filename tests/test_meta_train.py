"""The meta-step against per-task meta-gradients and optax's own update."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import QuadraticFamily

import metamd_jax
from metamd_jax import meta_train, objectives


def _setup(poison_every=0, objective='bound'):
  family = QuadraticFamily(poison_every=poison_every)
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  optimizer = optax.adam(0.05)
  state = meta_train.init_state(divergence, optimizer)
  step = jax.jit(meta_train.make_meta_step(family, optimizer, num_steps=5,
                                           objective=objective))
  return family, divergence, optimizer, state, step


@pytest.mark.parametrize('objective', ['bound', 'unrolled'])
def test_meta_step_is_the_mean_meta_gradient_through_optax(objective):
  family, divergence, optimizer, state, step = _setup(objective=objective)
  task_params = meta_train.sample_tasks(family, jax.random.key(0), 0, 4)
  new_state, metrics = step(state, task_params)
  grads, losses = [], []
  for i in range(4):
    tp = jax.tree.map(lambda x, i=i: x[i], task_params)
    result = objectives.meta_gradient(divergence, family.task(tp), 5, objective=objective)
    grads.append(result.grad)
    losses.append(result.loss)
  mean_grad = jax.tree.map(lambda *g: sum(g) / 4, *grads)
  updates, _ = optimizer.update(mean_grad, optimizer.init(divergence), divergence)
  expected = optax.apply_updates(divergence, updates)
  for a, b in zip(jax.tree.leaves(new_state.divergence), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics['meta_loss'], np.mean(losses), rtol=1e-5)
  assert int(new_state.step) == 1 and int(metrics['dropped_tasks']) == 0


def test_non_finite_inner_runs_are_dropped_and_counted():
  family, divergence, optimizer, state, step = _setup(poison_every=2)
  task_params = meta_train.sample_tasks(family, jax.random.key(0), 0, 4)
  assert list(np.asarray(task_params['poison'])) == [True, False, True, False]
  new_state, metrics = step(state, task_params)
  assert int(metrics['dropped_tasks']) == 2 and int(new_state.dropped_tasks) == 2
  assert int(metrics['skipped']) == 0
  clean = jax.tree.map(lambda x: x[1::2], task_params)
  _, _, _, clean_state, clean_step = _setup()
  expected, _ = clean_step(clean_state, clean)
  for a, b in zip(jax.tree.leaves(new_state.divergence), jax.tree.leaves(expected.divergence)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_state.divergence))


def test_all_non_finite_meta_batch_is_skipped_and_backs_off():
  family, divergence, optimizer, state, step = _setup(poison_every=1)
  task_params = meta_train.sample_tasks(family, jax.random.key(0), 0, 3)
  new_state, metrics = step(state, task_params)
  assert int(metrics['skipped']) == 1 and int(new_state.skipped_updates) == 1
  assert int(metrics['backed_off']) == 1
  for a, b in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(a, b)
  # No gradient is written; the steps are halved (up to the eps floor).
  params = family.init_params()
  grads = jax.tree.map(jnp.ones_like, params)
  old = jax.tree.map(jnp.subtract, params, metamd_jax.mirror_step(divergence, params, grads))
  new = jax.tree.map(jnp.subtract, params,
                     metamd_jax.mirror_step(new_state.divergence, params, grads))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    np.testing.assert_allclose(a, 0.5 * b, rtol=1e-2)


def test_bad_backoff_is_rejected():
  with pytest.raises(ValueError, match='backoff'):
    meta_train.make_meta_step(QuadraticFamily(), optax.adam(1e-3), num_steps=3, backoff=0.0)


def test_tasks_depend_only_on_the_step():
  family = QuadraticFamily()
  a = meta_train.sample_tasks(family, jax.random.key(3), 7, 2)
  b = meta_train.sample_tasks(family, jax.random.key(3), 7, 2)
  c = meta_train.sample_tasks(family, jax.random.key(3), 8, 2)
  np.testing.assert_array_equal(a['target'], b['target'])
  assert not np.allclose(a['target'], c['target'])


def test_statistics_adjoint_with_cg_fails_at_build_time_naming_both():
  family = QuadraticFamily()
  with pytest.raises(ValueError, match="adjoint='statistics'.*solver='cg'"):
    meta_train.make_meta_step(family, optax.adam(0.05), num_steps=5, adjoint='statistics',
                              solver='cg')
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  with pytest.raises(ValueError, match="adjoint='statistics'.*solver='cg'"):
    _fit(family, divergence, optax.adam(0.05), adjoint='statistics', solver='cg')
  with pytest.raises(ValueError, match='unknown adjoint'):
    meta_train.make_meta_step(family, optax.adam(0.05), num_steps=5, adjoint='reverse')


def test_default_meta_step_is_the_statistics_meta_step():
  """'auto' with the exact solver: the meta-step of adjoint='statistics', bit for bit."""
  family, _, optimizer, state, step = _setup()
  explicit = jax.jit(meta_train.make_meta_step(family, optimizer, num_steps=5,
                                               adjoint='statistics'))
  task_params = meta_train.sample_tasks(family, jax.random.key(2), 0, 4)
  (auto_state, auto_metrics), (expected, metrics) = (step(state, task_params),
                                                     explicit(state, task_params))
  for a, b in zip(jax.tree.leaves(auto_state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert {k: float(v) for k, v in auto_metrics.items()} == {
      k: float(v) for k, v in metrics.items()}


def test_unknown_objective_fails_at_build_time():
  family = QuadraticFamily()
  with pytest.raises(ValueError, match='objective'):
    meta_train.make_meta_step(family, optax.adam(1e-3), num_steps=3, objective='val')


@pytest.mark.parametrize('meta_learning_rate', [0.05, -0.05])
def test_best_divergence_has_the_lowest_moving_average_of_the_inner_loss(meta_learning_rate):
  # A negative rate ascends the bound, so the divergences get worse: the best is early.
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  optimizer = optax.sgd(meta_learning_rate)
  decay = 0.6
  step = jax.jit(meta_train.make_meta_step(family, optimizer, num_steps=5, score_decay=decay))
  state = meta_train.init_state(divergence, optimizer)
  seen, raw, averages = [], 0.0, []
  for k in range(6):
    task_params = meta_train.sample_tasks(family, jax.random.key(0), k, 3)
    inner = [objectives.meta_gradient(
        state.divergence, family.task(jax.tree.map(lambda x, i=i: x[i], task_params)),
        5).losses for i in range(3)]
    batch = np.mean([min(np.mean(losses), losses[0]) for losses in inner])  # capped
    seen.append(state.divergence)
    state, metrics = step(state, task_params)
    np.testing.assert_allclose(metrics['mean_loss'], batch, rtol=1e-5)
    raw = decay * raw + (1 - decay) * batch
    averages.append(raw / (1 - decay ** (k + 1)))
    np.testing.assert_allclose(state.score, averages[-1], rtol=1e-5)
  best = int(np.argmin(averages))
  np.testing.assert_allclose(state.best_score, averages[best], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.best_divergence), jax.tree.leaves(seen[best])):
    np.testing.assert_array_equal(a, b)
  if meta_learning_rate < 0:
    assert best < 5
  with pytest.raises(ValueError, match='score_decay'):
    meta_train.make_meta_step(family, optimizer, num_steps=5, score_decay=1.0)


def test_meta_batches_without_a_finite_score_leave_the_selection_unchanged():
  family, divergence, optimizer, state, step = _setup(poison_every=1)  # every task NaN
  for k in range(2):
    state, metrics = step(state, meta_train.sample_tasks(family, jax.random.key(0), k, 4))
    assert np.isnan(metrics['mean_loss'])
  assert np.isinf(state.best_score) and np.isinf(state.score)
  for a, b in zip(jax.tree.leaves(state.best_divergence), jax.tree.leaves(divergence)):
    np.testing.assert_array_equal(a, b)


def test_a_blown_up_but_finite_inner_run_scores_its_initial_loss():
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 5.0)  # |1 - 5 * 3| > 1
  optimizer = optax.sgd(1e-3)
  step = jax.jit(meta_train.make_meta_step(family, optimizer, num_steps=5))
  task_params = meta_train.sample_tasks(family, jax.random.key(0), 0, 3)
  _, metrics = step(meta_train.init_state(divergence, optimizer), task_params)
  first = [family.task(jax.tree.map(lambda x, i=i: x[i], task_params)).loss(
      family.init_params(), None) for i in range(3)]
  assert float(metrics['final_loss']) > 100 * np.mean(first)  # it did blow up
  np.testing.assert_allclose(metrics['mean_loss'], np.mean(first), rtol=1e-6)


class CountingFamily(QuadraticFamily):
  """Counts ``task`` calls: the meta-step calls it once per trace (one vmapped task)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.traces = 0

  def task(self, task_params):
    self.traces += 1
    return super().task(task_params)


def _fit(family, divergence, optimizer, **kwargs):
  options = dict(num_meta_steps=3, horizon=5, meta_batch_size=2, key=jax.random.key(1))
  options.update(kwargs)
  return meta_train.fit(family, divergence, optimizer, **options)


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _without_seconds(history):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in history]


def test_fit_is_the_hand_written_loop_and_compiles_once():
  family = CountingFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  optimizer = optax.adam(0.05)
  seen = []
  family.traces = 0  # init_params built one task
  result = _fit(family, divergence, optimizer, select='last', callback=seen.append)
  assert family.traces == 1  # one compilation for the whole run
  state = meta_train.init_state(divergence, optimizer)
  step = jax.jit(meta_train.make_meta_step(family, optimizer, num_steps=5))
  expected = []
  for k in range(3):
    state, metrics = step(state, meta_train.sample_tasks(family, jax.random.key(1), k, 2))
    expected.append({'step': k + 1, **{n: float(v) for n, v in metrics.items()}})
  _assert_trees_equal(result.state, state)
  _assert_trees_equal(result.divergence, state.divergence)
  assert _without_seconds(result.history) == expected
  assert seen == result.history and all(r['seconds'] > 0 for r in seen)
  assert result.resumed_from is None


def test_fit_keeps_the_best_or_the_last_divergence():
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  # Ascending the bound (a negative rate) makes later divergences worse: best != last.
  best = _fit(family, divergence, optax.sgd(-0.05), num_meta_steps=4)
  last = _fit(family, divergence, optax.sgd(-0.05), num_meta_steps=4, select='last')
  _assert_trees_equal(best.divergence, best.state.best_divergence)
  _assert_trees_equal(last.divergence, last.state.divergence)
  scores = [r['score'] for r in best.history]
  assert int(best.state.best_step) == int(np.argmin(scores)) + 1
  assert float(best.state.best_score) == min(scores)


def test_fit_resumes_bit_for_bit_from_its_checkpoints(tmp_path):
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  optimizer = optax.adam(0.05)
  clean = _fit(family, divergence, optimizer, num_meta_steps=5)
  first = _fit(family, divergence, optimizer, num_meta_steps=3, workdir=tmp_path,
               checkpoint_every=2)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['2', '3']
  resumed = _fit(family, divergence, optimizer, num_meta_steps=5, workdir=tmp_path,
                 checkpoint_every=2)
  assert first.resumed_from is None and resumed.resumed_from == 3
  _assert_trees_equal(resumed.state, clean.state)
  assert _without_seconds(resumed.history) == _without_seconds(clean.history)
  assert resumed.history[:3] == first.history  # restored with the checkpoint
  done = _fit(family, divergence, optimizer, num_meta_steps=5, workdir=tmp_path)
  assert done.resumed_from == 5 and done.history == resumed.history


@pytest.mark.parametrize('field,value,message', [
    ('select', 'first', 'select'),
    ('meta_batch_size', 0, 'meta_batch_size'),
    ('horizon', 2.5, 'horizon'),
    ('num_meta_steps', -1, 'num_meta_steps'),
    ('checkpoint_every', 0, 'checkpoint_every'),
])
def test_fit_rejects_bad_arguments_by_name(field, value, message):
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  with pytest.raises(ValueError, match=message):
    _fit(family, divergence, optax.adam(0.05), **{field: value})


def test_fit_rejects_a_checkpoint_of_another_structure(tmp_path):
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  _fit(family, divergence, optax.adam(0.05), num_meta_steps=1, workdir=tmp_path)
  other = metamd_jax.init_divergence(family.init_params(), 0.2, structure='diagonal')
  with pytest.raises(ValueError, match='written by another run: initial_divergence'):
    _fit(family, other, optax.adam(0.05), num_meta_steps=2, workdir=tmp_path)
  # Checkpoints without the run's description (an earlier version's): the restore's own
  # structure check names the mismatch.
  (tmp_path / 'checkpoints' / meta_train.RUN_FILE).unlink()
  with pytest.raises(ValueError, match='does not match this meta-training state'):
    _fit(family, other, optax.adam(0.05), num_meta_steps=2, workdir=tmp_path)


@pytest.mark.parametrize('damage', ['no_state', 'truncated_metadata'])
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, damage):
  """A latest checkpoint that does not restore (a folder half written, a file cut short)
  is named in a warning and the run resumes from the previous one: the same run as one
  made straight through."""
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  _fit(family, divergence, optax.adam(0.05), num_meta_steps=3, workdir=tmp_path,
       checkpoint_every=1)
  latest = tmp_path / 'checkpoints' / '3'
  if damage == 'no_state':
    shutil.rmtree(latest / 'state')
  else:
    metadata = latest / 'state' / '_METADATA'
    metadata.write_bytes(metadata.read_bytes()[:len(metadata.read_bytes()) // 2])
  with pytest.warns(RuntimeWarning, match='checkpoint of meta-step 3 .* does not restore'):
    resumed = _fit(family, divergence, optax.adam(0.05), num_meta_steps=4, workdir=tmp_path,
                   checkpoint_every=1)
  assert resumed.resumed_from == 2
  straight = _fit(family, divergence, optax.adam(0.05), num_meta_steps=4)
  _assert_trees_equal(resumed.state, straight.state)
  assert _without_seconds(resumed.history) == _without_seconds(straight.history)


def test_fit_resumes_only_the_run_that_wrote_the_checkpoints(tmp_path):
  """A resumed call with another horizon, key, objective or run_info would continue a run
  with other meta-steps than its first ones: named, with both values. The meta-step count
  may grow (the run goes on) and the selection change (it only picks from the state);
  fewer meta-steps than the checkpoints hold is an error."""
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  first = _fit(family, divergence, optax.adam(0.05), num_meta_steps=2, workdir=tmp_path,
               run_info={'optimizer': 'adam', 'learning_rate': 0.05})
  for change, message in ((dict(horizon=7), 'horizon: 5 then, 7 now'),
                          (dict(key=jax.random.key(2)), r'key: \[0, 1\] then, \[0, 2\] now'),
                          (dict(objective='unrolled'), "objective: 'bound' then, 'unrolled' now"),
                          (dict(run_info={'optimizer': 'adam', 'learning_rate': 0.5}),
                           r'run_info\.learning_rate: 0\.05 then, 0\.5 now'),
                          (dict(run_info=None), r"run_info: '<absent>' then, None now; "
                                                r"run_info\.learning_rate: 0\.05 then, "
                                                "'<absent>' now")):
    options = {'num_meta_steps': 3, 'workdir': tmp_path,
               'run_info': {'optimizer': 'adam', 'learning_rate': 0.05}, **change}
    with pytest.raises(ValueError, match=f'written by another run: {message}'):
      _fit(family, divergence, optax.adam(0.05), **options)
  with pytest.raises(ValueError, match='at meta-step 2, beyond num_meta_steps = 1'):
    _fit(family, divergence, optax.adam(0.05), num_meta_steps=1, workdir=tmp_path,
         run_info={'optimizer': 'adam', 'learning_rate': 0.05})
  resumed = _fit(family, divergence, optax.adam(0.05), num_meta_steps=3, workdir=tmp_path,
                 select='last', run_info={'optimizer': 'adam', 'learning_rate': 0.05})
  assert resumed.resumed_from == 2 and resumed.history[:2] == first.history
  straight = _fit(family, divergence, optax.adam(0.05), num_meta_steps=3,
                  workdir=tmp_path / 'straight')
  _assert_trees_equal(resumed.state, straight.state)
