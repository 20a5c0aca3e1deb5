"""The main job's comparison: adaptive MetaMD and the everyday changes (tiny config)."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metamd_jax
from configs import tiny
from experiments import benchmark_runs, builders, evaluate, plots, protocol, report
from metamd_jax import adaptive, evaluation


@pytest.fixture(scope='module')
def setup():
  config = tiny.get_config()
  meta_train_family, meta_test_family = builders.build_families(config)
  divergence = builders.build_divergence(config, meta_train_family)
  return config, meta_train_family, meta_test_family, divergence


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_low_rank_row_is_a_plain_run_of_low_rank_metamd(setup, tmp_path, monkeypatch):
  """With ``eval.frozen_rank`` the main job has the row ``'metamd_low_rank'``: the held-out
  runs of :func:`metamd_jax.low_rank_metamd` at that rank and fill, timed to the step like
  the other learned rows; without it, no such row."""
  config, meta_train_family, meta_test_family, divergence = setup
  config = config.copy_and_resolve_references()
  monkeypatch.setattr(builders, 'build_families',
                      lambda _: (meta_train_family, meta_test_family))
  monkeypatch.setattr(plots, 'plot_evaluation', lambda *args, **kwargs: None)
  monkeypatch.setattr(benchmark_runs, 'time_runs', lambda optimizer, family, tasks, steps,
                      repeats: np.full(jax.tree.leaves(tasks)[0].shape[0], 1e-3 * steps))
  config.eval.baselines, config.eval.shifts, config.eval.adaptive = (), (), False
  config.eval.time_steps, config.eval.horizon_multiplier = True, 0
  config.eval.frozen_rank, config.eval.frozen_rank_fill = 3, 'mean'
  # The initial divergence's factors are multiples of I (nothing to truncate): perturbed.
  rng = np.random.default_rng(0)
  divergence = jax.tree.map(
      lambda x: x + 0.3 * np.abs(x).max() * rng.standard_normal(x.shape).astype(x.dtype),
      divergence)
  results = evaluate.evaluate(config, tmp_path, divergence)
  assert list(results['optimizers']) == ['metamd', 'metamd_low_rank']
  tasks = evaluation.held_out_tasks(meta_test_family, config.seed, config.eval.num_tasks)
  plain = evaluation.run(metamd_jax.low_rank_metamd(divergence, 3, fill='mean'),
                         meta_test_family, tasks, config.eval.num_steps,
                         track_every=config.eval.track_every)
  row = results['optimizers']['metamd_low_rank']
  np.testing.assert_allclose(row['final_train_loss'][0],
                             np.mean(evaluation.final_train_loss(plain.train_losses)), rtol=1e-5)
  # Rank 3 truncates the tiny MLP's factors: not frozen MetaMD's run.
  assert not math.isclose(row['final_train_loss'][0],
                          results['optimizers']['metamd']['final_train_loss'][0], rel_tol=1e-3)
  assert 'elapsed_seconds_to_metamd_final_loss' in row and row['seconds_per_step'] > 0
  config.eval.frozen_rank = None
  assert 'metamd_low_rank' not in evaluate.evaluate(config, tmp_path, divergence)['optimizers']


def test_adaptive_row_with_a_huge_reference_is_metamd(setup, tmp_path, monkeypatch):
  config, meta_train_family, meta_test_family, divergence = setup
  config = config.copy_and_resolve_references()
  monkeypatch.setattr(builders, 'build_families',
                      lambda _: (meta_train_family, meta_test_family))  # loaded once
  config.eval.baselines = ()
  config.eval.shifts = ()
  config.eval.frozen_rank = None  # the low-rank row: its own test below
  config.eval.time_steps, config.eval.horizon_multiplier = True, 2
  # The default: blended MetaMD with Shampoo's statistics and Nesterov's momentum.
  assert (config.eval.adaptive_blend_rate, config.eval.adaptive_blend_statistics,
          config.eval.adaptive_momentum) == (0.1, 'kronecker', 0.5)
  config.eval.adaptive_blend_rate = 0.0  # adaptive MetaMD alone: never adapting, it is MetaMD
  config.eval.adaptive_momentum = 0.0
  config.eval.adaptive_overshoot = False  # the default's check shortens passing steps
  config.eval.adaptive_refresh_growth = math.inf  # recorded as None (JSON has no inf)
  config.eval.adaptive_overshoot_cap = math.inf  # recorded as None too
  calls = []

  def reference(div, family, task_params, num_steps, *, quantile, decay, per_leaf,
                require_training):
    assert per_leaf is True  # the default: one scale per leaf (a level for all, here)
    assert require_training is True  # levels of runs that train their tasks only
    calls.append((family, task_params, num_steps, quantile, decay))
    return 1e30  # never adapts: s_t = 1

  monkeypatch.setattr(adaptive, 'reference_gradient_norm', reference)
  assert config.eval.adaptive_eigenbasis  # the default: one scale per learned direction
  eigen_calls = []

  def levels(div, family, task_params, num_steps, *, quantile, decay, rank):
    assert rank is None and config.eval.adaptive_eigenbasis_rank == 0  # a scale per direction
    eigen_calls.append((family, task_params, num_steps))
    bases, _ = metamd_jax.eigenbasis.leaf_bases(div, rank)
    return [tuple(np.full(size, 1e30) for size in metamd_jax.eigenbasis.share_sizes(b))
            if b.inverse_values is None else (np.asarray(1e30),) for b in bases]

  monkeypatch.setattr(metamd_jax.eigenbasis, 'eigenbasis_levels', levels)
  monkeypatch.setattr(plots, 'plot_evaluation', lambda *args, **kwargs: None)  # tested elsewhere
  # A clock of 1 ms per step (the runs timed to the step compile once per step count; the
  # real clock is the quick benchmark's, tests/test_benchmark.py).
  timed = []

  def fake_time_runs(optimizer, family, task_params, num_steps, repeats):
    timed.append(num_steps)
    return np.full(jax.tree.leaves(task_params)[0].shape[0], 1e-3 * num_steps)

  monkeypatch.setattr(benchmark_runs, 'time_runs', fake_time_runs)
  results = evaluate.evaluate(config, tmp_path, divergence)
  assert config.eval.num_steps in timed  # the T-step runs were timed
  (family, task_params, _), = eigen_calls  # the same calibration tasks as the levels below
  assert family is meta_train_family and _leaves_equal(task_params, calls[0][1])
  # Calibrated once, on the meta-train tuning tasks, never on the held-out ones.
  (family, task_params, num_steps, quantile, decay), = calls
  assert family is meta_train_family and num_steps == config.eval.num_steps
  assert (quantile, decay) == (config.eval.adaptive_quantile, config.eval.adaptive_decay)
  ev = config.eval
  assert _leaves_equal(task_params,
                       evaluation.tuning_tasks(meta_train_family, config.seed, ev.num_tune_tasks))
  assert not _leaves_equal(task_params,
                           evaluation.held_out_tasks(meta_train_family, config.seed,
                                                     ev.num_tune_tasks))
  assert list(results['optimizers']) == ['metamd', 'metamd_adaptive']
  metamd, adaptive_row = (results['optimizers'][n] for n in ('metamd', 'metamd_adaptive'))
  np.testing.assert_allclose(adaptive_row['mean_curve'], metamd['mean_curve'], rtol=1e-5)
  np.testing.assert_allclose(adaptive_row['final_train_loss'], metamd['final_train_loss'],
                             rtol=1e-5)
  assert adaptive_row['reference_norm'] == 1e30
  # Timed steps and the long horizon (eval.time_steps, eval.horizon_multiplier).
  for entry in (metamd, adaptive_row):
    assert entry['seconds_per_step'] > 0
    assert 'seconds_to_metamd_final_loss' in entry
    # ... and timed to the step: runs stopped where each task reaches the loss.
    elapsed = entry['elapsed_seconds_to_metamd_final_loss']
    assert (elapsed[0] is None) == (entry['reached_fraction'] == 0)
  assert metamd['reached_fraction'] == 1.0  # the reference reaches its own loss
  assert metamd['elapsed_seconds_to_metamd_final_loss'][0] > 0
  long = results['long_horizon']
  assert set(long) == {'metamd', 'metamd_adaptive'}
  assert long['metamd']['steps'] == 2 * config.eval.num_steps
  np.testing.assert_allclose(long['metamd']['loss_at_T'], metamd['final_train_loss'],
                             rtol=1e-5)
  # The same long runs are the check '2T': Adam re-tuned for 2T steps on the tuning tasks.
  check = results['shifts']['2T']
  assert check['num_steps'] == 2 * ev.num_steps and check['reference'] == 'adam_retuned'
  tuned, _ = protocol.tune_baselines(('adam',), ev, meta_train_family,
                                     evaluation.tuning_tasks(meta_train_family, config.seed,
                                                             ev.num_tune_tasks),
                                     2 * ev.num_steps)
  assert check['adam_retuned_learning_rate'] == tuned['adam']
  for name in ('metamd', 'metamd_adaptive'):
    np.testing.assert_allclose(check['optimizers'][name]['final_train_loss'],
                               long[name]['loss_at_long'], rtol=1e-6)
  written = json.loads((tmp_path / 'results.json').read_text())
  assert written['adaptive']['reference_norm'] == 1e30
  assert written['adaptive']['refresh_growth'] is None  # the schedule alone
  assert written['adaptive']['overshoot_cap'] is None  # inf: no cap
  table = (tmp_path / 'results.md').read_text()
  assert '| metamd_adaptive | learned (c = 1e+30) |' in table
  assert 'Elapsed, timing per task a run stopped where it reaches that loss: metamd ' in table
  assert 'Beyond the horizon: 2T' in table and 'ms per step' in table
  assert '| 2T | adam_retuned |' in table


def test_calibration_failure_leaves_the_adaptive_row_out(setup, monkeypatch):
  config, meta_train_family, _, divergence = setup

  def diverges(*args, **kwargs):
    raise ValueError('the frozen divergence diverges')

  monkeypatch.setattr(adaptive, 'reference_gradient_norm', diverges)
  tasks = evaluation.tuning_tasks(meta_train_family, config.seed, 1)
  result = evaluate.calibrate(config, divergence, meta_train_family, tasks)
  assert result['reference_norm'] is None


def test_a_divergence_that_does_not_train_its_tuning_tasks_is_not_calibrated(setup, caplog):
  """Frozen steps 100 times the learned ones end above their start on the tuning task
  (finite or not): no levels, the adaptive row left out with a warning naming why."""
  config, meta_train_family, _, divergence = setup
  tasks = evaluation.tuning_tasks(meta_train_family, config.seed, 1)
  assert evaluate.calibrate(config, divergence, meta_train_family, tasks)[
      'reference_norm'] is not None
  too_long = metamd_jax.divergence.scale_steps(divergence, 100.0)
  result = evaluate.calibrate(config, too_long, meta_train_family, tasks)
  assert result['reference_norm'] is None and result['eigenbasis_levels'] is None
  assert 'adaptive MetaMD left out: frozen MetaMD' in caplog.text
  assert evaluate.adaptive_optimizer(config, too_long, result) is None


def _calibrated(setup, divergence=None, **settings):
  """The config with ``eval`` settings changed, one tuning task and its calibration (for
  ``divergence``, by default the setup's)."""
  config, meta_train_family, _, learned = setup
  divergence = learned if divergence is None else divergence
  config = config.copy_and_resolve_references()
  config.eval.update(settings)
  builders.validate_config(config)
  tasks = evaluation.tuning_tasks(meta_train_family, config.seed, 1)
  return config, tasks, evaluate.calibrate(config, divergence, meta_train_family, tasks)


def _guard(config, divergence, calibration, optimizer):
  """``optimizer`` behind the guard the config's settings describe, with ``calibration``'s
  levels (:func:`metamd_jax.calibrated.guard`, as :func:`evaluate.adaptive_optimizer`
  applies it)."""
  return metamd_jax.calibrated.guard(divergence, {**calibration, **evaluate.settings(config)},
                                     optimizer)


@pytest.mark.heavy
def test_guard_runs_frozen_metamd_then_the_adaptive_optimizer(setup):
  """``eval.adaptive_guard_margin`` puts the adaptive optimiser behind frozen MetaMD (at
  ``eval.frozen_rank`` where set) with :func:`metamd_jax.guarded_switch`, levels the
  calibrated reference norms: its fast step is that frozen MetaMD's; switching at step 1
  (``eval.adaptive_guard_steps = 0``) it is the adaptive optimiser's run, and a switch
  after 3 steps is the frozen run's 3 steps then the adaptive optimiser started there."""
  _, meta_train_family, _, divergence = setup
  rng = np.random.default_rng(0)  # factors that are not multiples of I (rank 3 truncates)
  divergence = jax.tree.map(
      lambda x: x + 0.1 * np.abs(x).max() * rng.standard_normal(x.shape).astype(x.dtype),
      divergence)
  config, tasks, result = _calibrated(setup, divergence)
  assert result['guard_margin'] is None and result['guard_steps'] is None
  adaptive_alone = evaluate.adaptive_optimizer(config, divergence, result)
  num_steps = 8

  def variant(**settings):
    changed = config.copy_and_resolve_references()
    changed.eval.update(settings)
    builders.validate_config(changed)
    return changed

  # Off: the optimiser itself. On: its fast step is frozen MetaMD's, at eval.frozen_rank.
  assert _guard(config, divergence, result, adaptive_alone) is adaptive_alone
  params = meta_train_family.init_params()
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  for rank in (None, 3):
    fast = (metamd_jax.metamd(divergence) if rank is None
            else metamd_jax.low_rank_metamd(divergence, rank))
    guarded = _guard(variant(adaptive_guard_margin=1e30, frozen_rank=rank), divergence,
                             result, optax.sgd(0.0))
    got = guarded.update(grads, guarded.init(params), params)[0]
    want = fast.update(grads, fast.init(params), params)[0]
    chex.assert_trees_all_close(got, want, rtol=1e-6)
  assert not _leaves_equal(
      metamd_jax.metamd(divergence).update(grads, metamd_jax.metamd(divergence).init(params))[0],
      metamd_jax.low_rank_metamd(divergence, 3).update(
          grads, metamd_jax.low_rank_metamd(divergence, 3).init(params))[0])

  def losses(optimizer):
    return evaluation.run(optimizer, meta_train_family, tasks, num_steps).losses

  first = evaluate.adaptive_optimizer(
      variant(adaptive_guard_margin=2.0, adaptive_guard_steps=0), divergence, result)
  assert isinstance(first.init(params), metamd_jax.GuardedState)
  np.testing.assert_allclose(losses(first), losses(adaptive_alone), rtol=1e-5)
  after_three = losses(evaluate.adaptive_optimizer(
      variant(adaptive_guard_margin=1e30, adaptive_guard_steps=3, frozen_rank=3), divergence,
      result))
  # By hand: the low-rank frozen step 3 times, then the adaptive optimiser started afresh.
  task = meta_train_family.task(jax.tree.map(lambda x: x[0], tasks))
  batch = metamd_jax.tasks.base.batches_of(task, num_steps)
  params = task.init()
  frozen = metamd_jax.low_rank_metamd(divergence, 3)
  state, update = frozen.init(params), jax.jit(frozen.update)
  for step in range(num_steps):
    if step == 3:
      state, update = adaptive_alone.init(params), jax.jit(adaptive_alone.update)
    loss, grads = jax.value_and_grad(task.loss)(params, batch(step))
    np.testing.assert_allclose(after_three[0, step], loss, rtol=1e-5)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert np.all(np.isfinite(after_three)) and np.all(after_three < 5)  # a sane run

  # eval.adaptive_guard_prior: the fallback starts from Shampoo's statistics with the
  # frozen step's gradient mass (by hand: statistics_prior on the fallback's init).
  shampoo = metamd_jax.statistics.scale_by_kronecker_statistics()
  params = meta_train_family.init_params()
  with_prior = _guard(variant(adaptive_guard_margin=1e30, adaptive_guard_steps=1,
                                      adaptive_guard_prior=True, frozen_rank=3),
                              divergence, result, shampoo)
  state = with_prior.init(params)
  _, state = with_prior.update(grads, state, params)
  got, state = with_prior.update(grads, state, params)
  mass = jnp.stack([jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)])
  want, _ = shampoo.update(grads, metamd_jax.statistics_prior(shampoo.init(params), params,
                                                              mass), params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)  # entries up to about 0.1
  empty = shampoo.update(grads, shampoo.init(params))[0]  # started empty: longer steps
  assert not all(np.allclose(x, y, rtol=0.1) for x, y in zip(jax.tree.leaves(got),
                                                              jax.tree.leaves(empty)))

  # eval.adaptive_guard_progress: the run passes each step's minibatch loss to the guard.
  # Progress 0 past step 5: the switch waits for the first update whose averaged relative
  # decrease of the run's own minibatch losses is negative (float64 reference from the
  # frozen run's losses). Fallback sgd(0): from the switch the parameters stay put.
  long_steps = num_steps + 2
  frozen_losses = np.asarray(evaluation.run(
      _guard(variant(adaptive_guard_margin=1e30, frozen_rank=3), divergence, result,
                     optax.sgd(0.0)), meta_train_family, tasks, long_steps).losses)[0]
  average, want_switch = 0.0, None
  for t in range(2, long_steps + 1):  # update t gets the loss of step t - 1 (0-based)
    relative = (frozen_losses[t - 2] - frozen_losses[t - 1]) / abs(frozen_losses[t - 2])
    average = 0.9 * average + 0.1 * relative
    if t > 5 and average / (1 - 0.9 ** (t - 1)) < 0 and want_switch is None:
      want_switch = t
  assert config.eval.adaptive_decay == 0.9
  assert want_switch is not None and 6 < want_switch < long_steps  # waits; visible below
  got = np.asarray(evaluation.run(
      _guard(variant(adaptive_guard_margin=1e30, adaptive_guard_steps=5,
                             adaptive_guard_progress=0.0, frozen_rank=3), divergence, result,
                     optax.sgd(0.0)), meta_train_family, tasks, long_steps).losses)[0]
  np.testing.assert_allclose(got[:want_switch], frozen_losses[:want_switch], rtol=1e-6)
  assert not np.allclose(got[want_switch], frozen_losses[want_switch], rtol=1e-6)
  # Any progress is below 1e30: the switch comes right after step 5, as without it.
  got = np.asarray(evaluation.run(
      _guard(variant(adaptive_guard_margin=1e30, adaptive_guard_steps=5,
                             adaptive_guard_progress=1e30, frozen_rank=3), divergence, result,
                     optax.sgd(0.0)), meta_train_family, tasks, long_steps).losses)[0]
  np.testing.assert_allclose(got[:6], frozen_losses[:6], rtol=1e-6)
  assert not np.allclose(got[6], frozen_losses[6], rtol=1e-6)


def test_per_leaf_calibration_gives_one_level_per_leaf(setup):
  _, meta_train_family, meta_test_family, divergence = setup
  config, _, result = _calibrated(setup, adaptive_per_leaf=True)
  leaves = jax.tree.leaves(meta_train_family.init_params())
  assert result['per_leaf'] is True and len(result['reference_norm']) == len(leaves)
  assert all(c > 0 for c in result['reference_norm'])
  optimizer = evaluate.adaptive_optimizer(config, divergence, result)
  state = optimizer.init(meta_test_family.init_params())
  # The default: blended MetaMD followed by Nesterov's momentum, restarted after the
  # horizon, twice it, ...
  assert isinstance(state, metamd_jax.RestartState)
  assert int(state.next) == config.eval.num_steps
  assert state.inner[0][0].adaptive.scale.shape == (len(leaves),)
  assert report._learning_rate_text(None, [1.5, 2.25, math.inf]) == (
      'learned (c per leaf: 1.5 to 2.25)')
  assert report._learning_rate_text(None, 8.94) == 'learned (c = 8.94)'
  assert evaluate.adaptive_optimizer(config, divergence, None) is None
  with config.ignore_type():
    config.eval.adaptive_per_leaf = 1
  with pytest.raises(ValueError, match=r'config\.eval\.adaptive_per_leaf'):
    builders.validate_config(config)


def test_eigenbasis_calibration_gives_levels_per_eigendirection(setup):
  _, meta_train_family, meta_test_family, divergence = setup
  config, tasks, result = _calibrated(setup, adaptive_eigenbasis=True,
                                      adaptive_eigenbasis_rank=0)  # a scale per direction
  assert result['eigenbasis'] is True
  levels = result['eigenbasis_levels']
  expected = metamd_jax.eigenbasis.eigenbasis_levels(
      divergence, meta_train_family, tasks, config.eval.num_steps,
      quantile=config.eval.adaptive_quantile, decay=config.eval.adaptive_decay)
  assert len(levels) == len(expected) == len(jax.tree.leaves(meta_train_family.init_params()))
  for ours, theirs in zip(levels, expected):  # JSON-able lists of the library's levels
    assert all(isinstance(x, (list, float)) for x in ours)
    for a, b in zip(ours, theirs):
      np.testing.assert_array_equal(np.asarray(a, np.float64), b)
  # The default blend with eigenbasis MetaMD as its learned half, then the momentum (the
  # restarts left out here; they wrap the whole state, tested below).
  config.eval.adaptive_restarts = False
  optimizer = evaluate.adaptive_optimizer(config, divergence, result)
  state = optimizer.init(meta_test_family.init_params())
  assert isinstance(state[0][0].adaptive, metamd_jax.eigenbasis.EigenbasisState)
  # eval.adaptive_lengthen_below (0.3 with 0.1 in the default): the library's blended
  # MetaMD with those settings; a first gradient 1000 times smaller than in distribution
  # takes longer steps than with the option off.
  assert (config.eval.adaptive_lengthen_below, config.eval.adaptive_min_scale) == (0.3, 0.1)
  assert result['lengthen_below'] == 0.3
  params = meta_test_family.init_params()
  tiny_grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

  def first(optimizer):
    return optimizer.update(tiny_grads, optimizer.init(params), params)[0]

  ev = config.eval
  library = metamd_jax.blended_metamd(
      divergence, result['reference_norm'], ev.adaptive_blend_rate, decay=ev.adaptive_decay,
      per_leaf=True, statistics=ev.adaptive_blend_statistics,
      eigenbasis_levels=result['eigenbasis_levels'], online_power=ev.adaptive_online_power,
      sketch_rank=ev.adaptive_blend_sketch_rank or None,
      sketch_interval=ev.adaptive_blend_sketch_interval,
      overshoot_decay=ev.adaptive_overshoot_decay, refresh_growth=ev.adaptive_refresh_growth,
      overshoot_cap=ev.adaptive_overshoot_cap, eigenbasis_lengthen_below=0.3,
      eigenbasis_min_scale=0.1)
  ours = first(evaluate.adaptive_optimizer(config, divergence, result))
  chex.assert_trees_all_close(ours, first(optax.chain(
      library, metamd_jax.nesterov_momentum(ev.adaptive_momentum))), rtol=1e-5, atol=1e-9)
  config.eval.adaptive_lengthen_below = None
  off = first(evaluate.adaptive_optimizer(config, divergence, result))
  assert optax.tree.norm(ours) > 2 * optax.tree.norm(off)
  config.eval.adaptive_lengthen_below = 0.3
  config.eval.adaptive_blend_rate = 0.0
  # With the overshoot check (the default) blended MetaMD at rate 0 carries it.
  assert config.eval.adaptive_overshoot
  state = evaluate.adaptive_optimizer(config, divergence, result).init(
      meta_test_family.init_params())
  assert isinstance(state[0][0].adaptive, metamd_jax.eigenbasis.EigenbasisState)
  assert isinstance(state[0][0].overshoot, metamd_jax.overshoot.OvershootState)
  config.eval.adaptive_overshoot = False
  state = evaluate.adaptive_optimizer(config, divergence, result).init(
      meta_test_family.init_params())
  assert isinstance(state[0][0], metamd_jax.eigenbasis.EigenbasisState)
  with pytest.raises(ValueError, match='no eigenbasis levels'):
    evaluate.adaptive_optimizer(config, divergence, {**result, 'eigenbasis_levels': None})
  assert result['eigenbasis_rank'] == config.eval.adaptive_eigenbasis_rank == 0
  # eval.adaptive_eigenbasis_rank: the 64-row side of the first kernel keeps 16 scales and
  # one for the rest, calibrated at that rank; the optimiser is the library's at that rank.
  ranked_config, _, ranked = _calibrated(setup, adaptive_eigenbasis=True,
                                         adaptive_eigenbasis_rank=16)
  assert ranked['eigenbasis_rank'] == 16
  expected = metamd_jax.eigenbasis.eigenbasis_levels(
      divergence, meta_train_family, tasks, config.eval.num_steps,
      quantile=config.eval.adaptive_quantile, decay=config.eval.adaptive_decay, rank=16)
  assert [[len(x) for x in leaf] for leaf in ranked['eigenbasis_levels']] == [
      [8, 1], [17, 8], [10, 1], [8, 10]]
  for ours, theirs in zip(ranked['eigenbasis_levels'], expected):
    for a, b in zip(ours, theirs):
      np.testing.assert_array_equal(np.asarray(a, np.float64), b)
  ranked_config.eval.update(adaptive_restarts=False, adaptive_momentum=0.0,
                            adaptive_blend_rate=0.0, adaptive_overshoot=False)
  params = meta_test_family.init_params()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
  ours = evaluate.adaptive_optimizer(ranked_config, divergence, ranked)
  theirs = metamd_jax.eigenbasis.eigenbasis_metamd(divergence, expected, rank=16)
  chex.assert_trees_all_close(ours.update(grads, ours.init(params), params)[0],
                              theirs.update(grads, theirs.init(params), params)[0])
  with pytest.raises(ValueError, match='rank 16: calibrate with the same config'):
    evaluate.adaptive_optimizer(config, divergence, ranked)
  # Without the eigenbasis scales the rank has nothing to rank: one scale per leaf.
  ranked_config.eval.adaptive_eigenbasis = False
  builders.validate_config(ranked_config)
  state = evaluate.adaptive_optimizer(ranked_config, divergence, ranked).init(params)
  assert isinstance(state[0], metamd_jax.adaptive.ScaleByAdaptiveMirrorDescentState)
  ranked_config.eval.adaptive_eigenbasis = True
  for bad in (-1, True, 2.0):
    with ranked_config.ignore_type():
      ranked_config.eval.adaptive_eigenbasis_rank = bad
    with pytest.raises(ValueError, match=r'config\.eval\.adaptive_eigenbasis_rank.*int >= 0'):
      builders.validate_config(ranked_config)
  config.eval.adaptive_per_leaf = False
  with pytest.raises(ValueError, match=r'config\.eval\.adaptive_eigenbasis.*adaptive_per_leaf'):
    builders.validate_config(config)
  with config.ignore_type():
    config.eval.adaptive_eigenbasis = 1
  with pytest.raises(ValueError, match=r'config\.eval\.adaptive_eigenbasis.*True or False'):
    builders.validate_config(config)


def _flat(x):
  return np.asarray(x).reshape(len(x), -1)


def test_shifted_families_are_shifted(setup):
  config, family, _, _ = setup
  tasks = evaluation.held_out_tasks(family, config.seed, 2)
  per_task = [jax.tree.map(lambda x, i=i: x[i], tasks) for i in range(2)]
  num_features = int(np.prod(family.input_shape))

  doubled = builders.shifted_family(config, family, 'inputs_x2')
  for tp in per_task:
    (x, y), (x2, y2) = family.task(tp).batch(3), doubled.task(tp).batch(3)
    np.testing.assert_array_equal(x2, 2 * np.asarray(x))
    np.testing.assert_array_equal(y2, y)
  np.testing.assert_array_equal(doubled.test.x, 2 * family.test.x)

  standardised = builders.shifted_family(config, family, 'inputs_standardised')
  pool, original = _flat(standardised.train.x), _flat(family.train.x)
  varying = original.std(axis=0) > 0
  assert 0 < varying.sum() < num_features  # digits has constant pixels
  np.testing.assert_allclose(pool.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(pool.std(axis=0)[varying], 1, rtol=1e-4)
  np.testing.assert_array_equal(pool[:, ~varying], 0)

  permuted = builders.shifted_family(config, family, 'features_permuted')
  permutation = builders.feature_permutation(config, num_features)
  np.testing.assert_array_equal(np.sort(permutation), np.arange(num_features))
  assert not np.array_equal(permutation, np.arange(num_features))
  for tp in per_task:  # the same permutation for every task, and for the test set
    np.testing.assert_array_equal(_flat(permuted.task(tp).batch(0)[0]),
                                  _flat(family.task(tp).batch(0)[0])[:, permutation])
  np.testing.assert_array_equal(_flat(permuted.test.x), _flat(family.test.x)[:, permutation])

  quarter = builders.shifted_family(config, family, 'batch_quarter')
  assert quarter.batch_size == family.batch_size // 4
  assert quarter.task(per_task[0]).batch(0)[0].shape[0] == family.batch_size // 4
  np.testing.assert_array_equal(quarter.train.x, family.train.x)

  offset = builders.shifted_family(config, family, 'inputs_offset')
  np.testing.assert_array_equal(offset.train.x, family.train.x + 1)
  np.testing.assert_array_equal(offset.test.x, family.test.x + 1)

  as_bytes = builders.shifted_family(config, family, 'inputs_x255')
  np.testing.assert_allclose(as_bytes.train.x, family.train.x * 255, rtol=1e-6)
  np.testing.assert_allclose(as_bytes.test.x, family.test.x * 255, rtol=1e-6)
  assert as_bytes.train.x.max() == pytest.approx(255 * family.train.x.max())
  twice = builders.shifted_family(config, family, 'inputs_div255')
  np.testing.assert_allclose(twice.train.x, family.train.x / 255, rtol=1e-6)
  np.testing.assert_allclose(twice.test.x, family.test.x / 255, rtol=1e-6)

  x4 = builders.shifted_family(config, family, 'batch_x4')
  assert x4.batch_size == min(family.subset_size, 4 * family.batch_size)
  assert x4.task(per_task[0]).batch(0)[0].shape[0] == x4.batch_size

  noisy = builders.shifted_family(config, family, 'label_noise')
  changed = np.mean(noisy.train.y != family.train.y)
  # A fifth of the labels redrawn, 9 in 10 of those to another class (10 classes).
  assert 0.12 < changed < 0.24
  np.testing.assert_array_equal(noisy.train.x, family.train.x)
  np.testing.assert_array_equal(noisy.test.y, family.test.y)  # clean test labels
  assert noisy.train.y.min() >= 0 and noisy.train.y.max() < family.num_classes


@pytest.mark.parametrize('field,value', [
    ('eval.shifts', ('inputs_x2', 'inputs_x3')),
    ('eval.shifts', ('inputs_x2', 'inputs_x2')),
    ('eval.adaptive_decay', 1.0),
    ('eval.adaptive_decay', -0.1),
    ('eval.adaptive_quantile', 0.0),
    ('eval.adaptive_quantile', -1.0),
    ('eval.adaptive_quantile', 1.5),
    ('eval.adaptive_blend_rate', -0.1),
    ('eval.adaptive_blend_rate', float('nan')),
    ('eval.adaptive_blend_rate', math.inf),
    ('eval.adaptive_blend_statistics', 'mean'),
    ('eval.adaptive_momentum', 1.0),
    ('eval.adaptive_momentum', -0.5),
    ('eval.adaptive_momentum', float('nan')),
    ('eval.adaptive_online_power', -0.5),
    ('eval.adaptive_online_power', 2.0),
    ('eval.adaptive_blend_max_dimension', 0),
    ('eval.adaptive_blend_max_dimension', -3),
    ('eval.adaptive_blend_block_size', -1),
    ('eval.adaptive_blend_block_size', True),
    ('eval.adaptive_blend_sketch_rank', -1),
    ('eval.adaptive_blend_sketch_rank', True),
    ('eval.adaptive_blend_sketch_interval', -1),
    ('eval.adaptive_blend_sketch_interval', True),
    ('eval.adaptive_overshoot_decay', 1.0),
    ('eval.adaptive_overshoot_decay', -0.1),
    ('eval.adaptive_refresh_growth', -0.1),
    ('eval.adaptive_refresh_growth', float('nan')),
    ('eval.adaptive_overshoot_cap', 0.5),
    ('eval.adaptive_overshoot_cap', float('nan')),
    ('eval.adaptive_overshoot_cap', 0.0),
    ('eval.adaptive_lengthen_below', 0.0),
    ('eval.adaptive_lengthen_below', 1.5),
    ('eval.adaptive_min_scale', 0.0),
    ('eval.adaptive_min_scale', 2.0),
    ('eval.frozen_rank', 0),
    ('eval.frozen_rank', True),
    ('eval.frozen_rank', -3),
    ('eval.frozen_rank_fill', 'median'),
    ('eval.adaptive_guard_margin', 0.0),
    ('eval.adaptive_guard_margin', -1.0),
    ('eval.adaptive_guard_margin', float('inf')),
    ('eval.adaptive_guard_steps', -1),
    ('eval.adaptive_guard_progress', -0.1),
    ('eval.adaptive_guard_progress', float('nan')),
    ('eval.adaptive_guard_progress', 0.01),  # needs a margin and a step count
    ('eval.adaptive_guard_prior', True),  # needs the guard and Shampoo's statistics
])
def test_bad_adaptive_and_shift_values_name_the_field(field, value):
  config = tiny.get_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=rf'config\.{field}'):
    builders.validate_config(config)


def test_a_sketch_with_blocks_is_refused():
  config = tiny.get_config()
  config.eval.adaptive_blend_block_size = 128
  config.eval.adaptive_blend_sketch_rank = 32
  with pytest.raises(ValueError, match=r'config\.eval\.adaptive_blend_sketch_rank.*block_size'):
    builders.validate_config(config)
  config.eval.adaptive_blend_block_size = 0
  builders.validate_config(config)


def test_adaptive_optimizer_is_blended_with_a_positive_blend_rate():
  config = tiny.get_config()
  config.eval.adaptive_restarts = False  # compared with the bare optimisers over 12 steps
  config.eval.adaptive_momentum = 0.0  # the momentum is checked last
  config.eval.adaptive_online_power = 1.0  # the online half shortened as the learned one
  # One scale per leaf (the eigenbasis scales need their own levels: tested above).
  config.eval.adaptive_eigenbasis = False
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
  divergence = metamd_jax.init_divergence(params, 0.1)
  calibration = {'reference_norm': (1.0, 1.0)}
  grads = {'w': jnp.full((3, 2), 2.0), 'b': jnp.full((2,), 2.0)}

  def first_update(optimizer):
    return jax.jit(optimizer.update)(grads, optimizer.init(params), params)[0]

  assert evaluate.adaptive_optimizer(config, divergence, None) is None
  assert evaluate.adaptive_optimizer(config, divergence, {'reference_norm': None}) is None
  config.eval.adaptive_blend_rate = 0.0
  adaptive_updates = first_update(evaluate.adaptive_optimizer(config, divergence, calibration))
  chex.assert_trees_all_close(adaptive_updates, first_update(metamd_jax.adaptive_metamd(
      divergence, (1.0, 1.0), per_leaf=True)))
  config.eval.adaptive_blend_rate = 0.5
  config.eval.adaptive_blend_statistics = 'kronecker'
  kronecker_updates = first_update(evaluate.adaptive_optimizer(config, divergence, calibration))
  chex.assert_trees_all_close(kronecker_updates, first_update(metamd_jax.blended_metamd(
      divergence, (1.0, 1.0), 0.5, per_leaf=True, statistics='kronecker')))
  # The 3-row side of w: two diagonal blocks (block size 2), or its diagonal (over 2).
  config.eval.adaptive_blend_sketch_rank = 0  # the default's sketch: not with blocks
  grads = {'w': jnp.asarray([[2.0, 1.0], [0.5, 2.0], [1.0, -1.0]]), 'b': jnp.full((2,), 2.0)}
  for field, option in (('adaptive_blend_block_size', 'block_size'),
                        ('adaptive_blend_max_dimension', 'max_dimension')):
    whole = first_update(evaluate.adaptive_optimizer(config, divergence, calibration))
    config.eval[field] = 2
    changed = first_update(evaluate.adaptive_optimizer(config, divergence, calibration))
    chex.assert_trees_all_close(changed, first_update(metamd_jax.blended_metamd(
        divergence, (1.0, 1.0), 0.5, per_leaf=True, statistics='kronecker', **{option: 2})))
    assert not np.allclose(changed['w'], whole['w'], rtol=1e-3), field
    config.eval[field] = {'adaptive_blend_block_size': 0}.get(field, 1024)
  # eval.adaptive_blend_sketch_rank: an 8-row side (over the rank 1 plus the 2 columns)
  # keeps a rank-1 sketch. The first gradient's two directions are exact in it (the second
  # is the escaped mass, added along every direction), so the first updates agree; the
  # second gradient, along other directions, meets that inflated mass.
  # (Without the overshoot check, which would act from the second step on.)
  overshoot, config.eval.adaptive_overshoot = config.eval.adaptive_overshoot, False
  tall = {'w': jnp.ones((8, 2)), 'b': jnp.ones((2,))}
  tall_divergence = metamd_jax.init_divergence(tall, 0.1)
  tall_grads = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32),
                'b': jnp.full((2,), 2.0)}
  second = jax.tree.map(lambda g: -0.5 * g[::-1], tall_grads)

  def tall_update(optimizer):
    return jax.jit(optimizer.update)(tall_grads, optimizer.init(tall), tall)[0]

  def second_update(optimizer):
    state, update = optimizer.init(tall), jax.jit(optimizer.update)
    state = update(tall_grads, state, tall)[1]
    return update(second, state, tall)[0]

  whole = evaluate.adaptive_optimizer(config, tall_divergence, calibration)
  config.eval.adaptive_blend_sketch_rank = 1
  sketched = evaluate.adaptive_optimizer(config, tall_divergence, calibration)
  # Two compiled programs: float32 rounding on entries up to about 0.5 (atol 1e-7).
  chex.assert_trees_all_close(second_update(sketched), second_update(metamd_jax.blended_metamd(
      tall_divergence, (1.0, 1.0), 0.5, per_leaf=True, statistics='kronecker',
      sketch_rank=1)), atol=1e-7)
  # Equal up to the sketch's float32 rounding (7e-7 on entries of about 0.25).
  chex.assert_trees_all_close(tall_update(sketched), tall_update(whole), rtol=1e-5)
  assert not np.allclose(second_update(sketched)['w'], second_update(whole)['w'], rtol=1e-3)
  # eval.adaptive_blend_sketch_interval: the second step's gradient merged only at step 3.
  every_step = second_update(sketched)
  config.eval.adaptive_blend_sketch_interval = 2
  every_other = second_update(evaluate.adaptive_optimizer(config, tall_divergence,
                                                          calibration))
  chex.assert_trees_all_close(every_other, second_update(metamd_jax.blended_metamd(
      tall_divergence, (1.0, 1.0), 0.5, per_leaf=True, statistics='kronecker',
      sketch_rank=1, sketch_interval=2)))
  assert not np.allclose(every_other['w'], every_step['w'], rtol=1e-3)
  np.testing.assert_array_equal(every_other['b'], every_step['b'])  # no sketch on b
  config.eval.adaptive_blend_sketch_interval = 1
  config.eval.adaptive_overshoot = overshoot
  config.eval.adaptive_blend_sketch_rank = 0
  grads = {'w': jnp.full((3, 2), 2.0), 'b': jnp.full((2,), 2.0)}
  config.eval.adaptive_blend_statistics = 'sum'
  blended_updates = first_update(evaluate.adaptive_optimizer(config, divergence, calibration))
  chex.assert_trees_all_close(blended_updates, first_update(metamd_jax.blended_metamd(
      divergence, (1.0, 1.0), 0.5, per_leaf=True)))
  # The online half adds 0.5 * g / |g| = 0.5 per entry (the first step; g constant),
  # shortened like the learned half by the leaf's scale s = max(1, ||g||_{M^-1} / 1.0):
  # sqrt(0.1 * 6 * 4) for w, sqrt(0.1 * 2 * 4) < 1 for b.
  scales = {'w': np.sqrt(2.4), 'b': 1.0}
  chex.assert_trees_all_close(
      blended_updates, {k: u - 0.5 / scales[k] for k, u in adaptive_updates.items()},
      atol=1e-6)
  # eval.adaptive_online_power: the online half divided by s ** p instead.
  config.eval.adaptive_online_power = 0.5
  chex.assert_trees_all_close(
      first_update(evaluate.adaptive_optimizer(config, divergence, calibration)),
      {k: u - 0.5 / scales[k] ** 0.5 for k, u in adaptive_updates.items()}, atol=1e-6)
  config.eval.adaptive_online_power = 1.0
  # eval.adaptive_overshoot: blended MetaMD with the check, also at blend rate 0. Two steps
  # with the gradient flipped: rho = -1, so the learned half of the second is halved.
  flipped = jax.tree.map(lambda g: -g, grads)

  def two_updates(optimizer):
    state, update = optimizer.init(params), jax.jit(optimizer.update)
    _, state = update(grads, state, params)
    return update(flipped, state, params)[0]

  for rate in (0.5, 0.0):
    config.eval.adaptive_blend_rate = rate
    config.eval.adaptive_overshoot = True
    config.eval.adaptive_overshoot_decay = 0.0
    checked = two_updates(evaluate.adaptive_optimizer(config, divergence, calibration))
    chex.assert_trees_all_close(checked, two_updates(metamd_jax.blended_metamd(
        divergence, (1.0, 1.0), rate, per_leaf=True, overshoot_decay=0.0)))
    config.eval.adaptive_overshoot = False
    unchecked = two_updates(evaluate.adaptive_optimizer(config, divergence, calibration))
    learned = two_updates(metamd_jax.adaptive_metamd(divergence, (1.0, 1.0), per_leaf=True))
    chex.assert_trees_all_close(jax.tree.map(lambda a, b, c: a - b + c / 2, unchecked,
                                             checked, learned),
                                learned, atol=1e-6)
  # eval.adaptive_overshoot_cap: sigma = 2 on the second step, capped at 1.5.
  config.eval.adaptive_overshoot = True
  config.eval.adaptive_overshoot_cap = 1.5
  capped = two_updates(evaluate.adaptive_optimizer(config, divergence, calibration))
  chex.assert_trees_all_close(capped, two_updates(metamd_jax.blended_metamd(
      divergence, (1.0, 1.0), 0.0, per_leaf=True, overshoot_decay=0.0, overshoot_cap=1.5)))
  chex.assert_trees_all_close(jax.tree.map(lambda c, a: 1.5 * c - a, capped, learned),
                              jax.tree.map(jnp.zeros_like, learned), atol=1e-6)
  config.eval.adaptive_overshoot_cap = math.inf
  config.eval.adaptive_overshoot = False
  config.eval.adaptive_blend_rate = 0.5
  # eval.adaptive_refresh_growth: Shampoo's roots also refreshed on growth. Steps 1 to 10
  # and 11 refresh on the schedule; at step 12 (stale) a burst refreshes them with 0.5 only.
  config.eval.adaptive_blend_statistics = 'kronecker'

  def twelfth_update(optimizer):
    state, update = optimizer.init(params), jax.jit(optimizer.update)  # its conds compiled once
    for _ in range(11):
      _, state = update(grads, state, params)
    return update(jax.tree.map(lambda g: 30 * g, grads), state, params)[0]

  on_growth = {}
  for growth in (math.inf, 0.5):
    config.eval.adaptive_refresh_growth = growth
    on_growth[growth] = twelfth_update(evaluate.adaptive_optimizer(config, divergence,
                                                                    calibration))
    chex.assert_trees_all_close(on_growth[growth], twelfth_update(metamd_jax.blended_metamd(
        divergence, (1.0, 1.0), 0.5, per_leaf=True, statistics='kronecker',
        refresh_growth=growth)))
  assert not all(np.allclose(a, b, rtol=1e-3) for a, b in zip(
      jax.tree.leaves(on_growth[math.inf]), jax.tree.leaves(on_growth[0.5])))
  config.eval.adaptive_refresh_growth = math.inf
  config.eval.adaptive_blend_statistics = 'sum'
  # Nesterov's momentum: the first step is (1 + beta) * step_factor times the blended one.
  config.eval.adaptive_momentum = 0.9
  chex.assert_trees_all_close(
      first_update(evaluate.adaptive_optimizer(config, divergence, calibration)),
      jax.tree.map(lambda u: 1.9 * 0.5 * u, blended_updates), atol=1e-6)


def _restart_setup(seed):
  """Two leaves, a divergence that is SGD(0.1), unit levels and 8 random gradients."""
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  gradients = [{'w': jax.random.normal(k, (3, 2)), 'b': jax.random.normal(k, (2,))}
               for k in keys]
  return (params, metamd_jax.init_divergence(params, 0.1), {'reference_norm': (1.0, 1.0)},
          gradients)


def _updates_of(optimizer, gradients, params, compiled=True):
  """The updates of ``optimizer`` along ``gradients`` from ``params``, applied as it goes;
  the last parameters and state. ``compiled`` jits the update: op by op, every ``lax.cond``
  of a restart or a refresh would compile again at each step."""
  state, out = optimizer.init(params), []
  update = jax.jit(optimizer.update) if compiled else optimizer.update
  for g in gradients:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, params, state


def test_adaptive_restarts_start_the_whole_state_afresh_after_the_horizon():
  config = tiny.get_config()
  config.eval.update(adaptive_eigenbasis=False, adaptive_restarts=False, num_steps=3)
  params, divergence, calibration, gradients = _restart_setup(seed=0)

  def updates_of(optimizer, gradients, params=params):
    return _updates_of(optimizer, gradients, params)

  plain = evaluate.adaptive_optimizer(config, divergence, calibration)
  config.eval.adaptive_restarts = True
  restarted = evaluate.adaptive_optimizer(config, divergence, calibration)
  got, _, state = updates_of(restarted, gradients)
  assert isinstance(state, metamd_jax.RestartState) and int(state.next) == 12
  # The horizon's 3 steps as without restarts; then epochs [3, 6) and [6, 8) as fresh runs
  # (momentum, scales and statistics included) from where the last one ended.
  want, ended, _ = updates_of(plain, gradients[:3])
  for start, stop in ((3, 6), (6, 8)):
    more, ended, _ = updates_of(plain, gradients[start:stop], ended)
    want += more
  for a, b in zip(got, want):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(got[3]['w'], updates_of(plain, gradients[:4])[0][3]['w'])


def test_restart_growth_and_shrink_reweigh_each_epochs_halves():
  config = tiny.get_config()
  config.eval.update(adaptive_eigenbasis=False, adaptive_restarts=False, num_steps=3,
                     adaptive_blend_rate=0.5, adaptive_blend_statistics='kronecker',
                     adaptive_momentum=0.5)
  params, divergence, calibration, gradients = _restart_setup(seed=1)

  def updates_of(optimizer, gradients, params=params):
    return _updates_of(optimizer, gradients, params)[:2]

  def plain(rate):  # the same optimiser without restarts, at a given blend rate
    fixed = config.copy_and_resolve_references()
    fixed.eval.update(adaptive_restarts=False, adaptive_blend_rate=float(rate))
    return evaluate.adaptive_optimizer(fixed, divergence, calibration)

  config.eval.adaptive_restarts = True
  config.eval.adaptive_restart_growth = 0.5
  grown = evaluate.adaptive_optimizer(config, divergence, calibration)
  got, _ = updates_of(grown, gradients)
  # Epochs [0, 3) and [3, 6) are one horizon long (rate 0.5), [6, 12) two (0.5 sqrt(2)).
  want, ended = updates_of(plain(0.5), gradients[:3])
  for start, stop, rate in ((3, 6, 0.5), (6, 8, 0.5 * np.sqrt(2))):
    more, ended = updates_of(plain(rate), gradients[start:stop], ended)
    want += more
  for a, b in zip(got, want):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  # With the learned half shrunk too: the whole step times L**-0.5 and the blend rate
  # times L**(0.5 + 0.5), so the online half is the same as above and the learned half
  # 2**-0.5 as long: in the epoch of length 2, a fresh run at rate 1.0 scaled by 2**-0.5.
  config.eval.adaptive_restart_shrink = 0.5
  both, _ = updates_of(evaluate.adaptive_optimizer(config, divergence, calibration), gradients)
  want, ended = updates_of(plain(0.5), gradients[:3])
  more, ended = updates_of(plain(0.5), gradients[3:6], ended)
  want += more
  scaled = optax.chain(plain(1.0), optax.scale(2 ** -0.5))
  more, _ = updates_of(scaled, gradients[6:8], ended)
  for a, b in zip(both, want + more):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  config.eval.adaptive_restart_growth = 0.0
  config.eval.adaptive_restart_shrink = 0.0
  constant, _ = updates_of(evaluate.adaptive_optimizer(config, divergence, calibration),
                           gradients)
  for a, b in zip(got[:6], constant[:6]):  # the same until the first longer epoch
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  for changed in (got, both):
    assert not np.allclose(changed[6]['w'], constant[6]['w'])


def test_restart_momentum_changes_the_epochs_longer_than_the_horizon_only():
  config = tiny.get_config()
  config.eval.update(adaptive_eigenbasis=False, adaptive_restarts=True, num_steps=3,
                     adaptive_blend_rate=0.5, adaptive_blend_statistics='kronecker',
                     adaptive_momentum=0.5, adaptive_restart_growth=0.5)
  params, divergence, calibration, gradients = _restart_setup(seed=2)
  gradients = gradients + gradients[:4]  # 12 steps: epochs [0, 3), [3, 6), [6, 12)

  def updates_of(optimizer, gradients, params=params):
    return _updates_of(optimizer, gradients, params)[:2]

  def plain(rate, momentum):  # one epoch's optimiser without restarts, its momentum by hand
    fixed = config.copy_and_resolve_references()
    fixed.eval.update(adaptive_restarts=False, adaptive_blend_rate=float(rate),
                      adaptive_momentum=0.0, adaptive_restart_growth=0.0)
    return optax.chain(evaluate.adaptive_optimizer(fixed, divergence, calibration),
                       metamd_jax.nesterov_momentum(*momentum))

  kept, _ = updates_of(evaluate.adaptive_optimizer(config, divergence, calibration), gradients)
  config.eval.adaptive_restart_momentum = 0.9
  config.eval.adaptive_restart_step_factor = 0.2
  builders.validate_config(config)
  got, _ = updates_of(evaluate.adaptive_optimizer(config, divergence, calibration), gradients)
  # The first two epochs (one horizon long) keep momentum 0.5 at the factor 1/2; the
  # epoch [6, 12), two horizons long, runs afresh with momentum 0.9 at the factor 0.2.
  want, ended = updates_of(plain(0.5, (0.5, 0.5)), gradients[:3])
  more, ended = updates_of(plain(0.5, (0.5, 0.5)), gradients[3:6], ended)
  want += more
  more, _ = updates_of(plain(0.5 * np.sqrt(2), (0.9, 0.2)), gradients[6:], ended)
  want += more
  for a, b in zip(got, want):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(got[:6], kept[:6]):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(got[7]['w'], kept[7]['w'])


def test_restart_momentum_under_jit_matches_the_eager_run():
  config = tiny.get_config()
  config.eval.update(adaptive_eigenbasis=False, adaptive_restarts=True, num_steps=2,
                     adaptive_blend_rate=0.5, adaptive_blend_statistics='kronecker',
                     adaptive_momentum=0.5, adaptive_restart_momentum=0.9,
                     adaptive_restart_step_factor=0.2)
  params, divergence, calibration, gradients = _restart_setup(seed=3)
  optimizer = evaluate.adaptive_optimizer(config, divergence, calibration)
  eager, _, _ = _updates_of(optimizer, gradients, params, compiled=False)

  def body(carry, g):
    params, state = carry
    u, state = optimizer.update(g, state, params)
    return (optax.apply_updates(params, u), state), u

  stacked = jax.tree.map(lambda *x: jnp.stack(x), *gradients)
  _, scanned = jax.jit(lambda p: jax.lax.scan(body, (p, optimizer.init(p)), stacked))(params)
  for t, want in enumerate(eager):
    chex.assert_trees_all_close(jax.tree.map(lambda x, t=t: x[t], scanned), want,
                                rtol=1e-5, atol=1e-7)


def test_calibration_records_the_restart_momentum(setup):
  result = _calibrated(setup)[2]
  assert result['restart_momentum'] is None and result['restart_step_factor'] == 0.5
  config, _, result = _calibrated(setup, adaptive_restart_momentum=0.9,
                                  adaptive_restart_step_factor=0.2)
  assert result['restart_momentum'] == 0.9 and result['restart_step_factor'] == 0.2
  for field, bads, meaning, good in (
      ('momentum', (1.0, -0.1, math.nan, 'heavy', True), r'\[0, 1\)', 0.9),
      ('step_factor', (0.0, -1.0, math.inf, 'short'), 'positive finite', 0.2)):
    for bad in bads:
      with config.ignore_type():
        config.eval[f'adaptive_restart_{field}'] = bad
      with pytest.raises(ValueError, match=rf'config\.eval\.adaptive_restart_{field}.*{meaning}'):
        builders.validate_config(config)
    with config.ignore_type():
      config.eval[f'adaptive_restart_{field}'] = good
  config.eval.adaptive_restarts = False
  with pytest.raises(ValueError, match='restart_momentum.*needs eval.adaptive_restarts = True'):
    builders.validate_config(config)
  config.eval.adaptive_restarts = True
  config.eval.adaptive_momentum = 0.0
  with pytest.raises(ValueError, match='restart_momentum.*needs eval.adaptive_momentum > 0'):
    builders.validate_config(config)
  config.eval.adaptive_momentum = 0.5
  config.eval.adaptive_restart_momentum = None
  with pytest.raises(ValueError, match='step_factor.*needs eval.adaptive_restart_momentum'):
    builders.validate_config(config)


@pytest.mark.parametrize('field', ['restart_growth', 'restart_shrink'])
def test_calibration_records_the_restart_powers(setup, field):
  assert _calibrated(setup)[2][field] == 0.0  # the default
  config, _, result = _calibrated(setup, **{f'adaptive_{field}': 0.5})
  assert result[field] == 0.5
  for bad in (-0.5, math.inf, 'fast'):
    with config.ignore_type():
      config.eval[f'adaptive_{field}'] = bad
    with pytest.raises(ValueError, match=rf'config\.eval\.adaptive_{field}.*finite number >= 0'):
      builders.validate_config(config)
  with config.ignore_type():
    config.eval[f'adaptive_{field}'] = 0.5
  config.eval.adaptive_restarts = False
  with pytest.raises(ValueError, match=f'adaptive_{field}.*needs eval.adaptive_restarts = True'):
    builders.validate_config(config)


def test_calibration_records_the_restarts(setup):
  assert _calibrated(setup)[2]['restarts'] is True  # the default
  config, _, result = _calibrated(setup, adaptive_restarts=False)
  assert result['restarts'] is False
  with config.ignore_type():
    config.eval.adaptive_restarts = 1
  with pytest.raises(ValueError, match=r'config\.eval\.adaptive_restarts'):
    builders.validate_config(config)


def test_a_shift_keeps_every_optimizer_and_retunes_adam(setup, monkeypatch):
  config, meta_train_family, meta_test_family, divergence = setup
  tuned = []

  def tune(names, eval_config, family, task_params, num_steps):
    tuned.append((names, family, task_params))
    return {'adam': 0.1}, {}

  monkeypatch.setattr(protocol, 'tune_baselines', tune)
  optimizers = {'metamd': metamd_jax.metamd(divergence)}
  result = evaluate.evaluate_shift(config, 'batch_quarter', (meta_train_family, meta_test_family),
                                   optimizers, {'metamd': None})
  # Adam re-tuned on the shifted meta-train tuning tasks.
  (names, family, task_params), = tuned
  assert names == ('adam',) and family.batch_size == meta_train_family.batch_size // 4
  assert _leaves_equal(task_params, evaluation.tuning_tasks(family, config.seed,
                                                            config.eval.num_tune_tasks))
  assert list(result['optimizers']) == ['metamd', 'adam_retuned']
  assert result['adam_retuned_learning_rate'] == 0.1
  for entry in result['optimizers'].values():
    assert entry['num_runs'] == config.eval.num_tasks
    assert 0 <= entry['diverged'] + entry['above_initial_loss'] <= entry['num_runs']
    assert 'steps_to_adam_retuned_final_loss' in entry and 'test_accuracy' in entry
  assert result['optimizers']['adam_retuned']['reached_fraction'] == 1.0
  results = {'optimizers': {}, 'shifts': {'batch_quarter': result, 'inputs_x2': result}}
  rows = [line for line in report.format_shifts(results).splitlines()
          if line.startswith('| ') and not line.startswith(('| shift', '| ---'))]
  assert [row.split(' | ')[:2] for row in rows] == [
      ['| batch_quarter', 'metamd'], ['| batch_quarter', 'adam_retuned'],
      ['| inputs_x2', 'metamd'], ['| inputs_x2', 'adam_retuned']]


def _tiny_language_model_config():
  from configs import transformer_lm

  config = transformer_lm.get_config()
  task, meta, ev = config.task, config.meta, config.eval
  task.context, task.width, task.depth, task.num_heads = 16, 16, 1, 2
  task.batch_size, task.slice_size, task.eval_windows, task.test_windows = 4, 2048, 4, 4
  meta.horizon, meta.num_meta_steps, meta.checkpoint_every = 4, 2, 2
  ev.num_steps, ev.track_every, ev.num_tasks, ev.num_tune_tasks = 10, 5, 2, 1
  ev.baselines, ev.learning_rates = ('adamw',), (1e-2, 1e-1)
  # Tested on the tiny classification config (cheaper to compile): the adaptive row, timed
  # steps and the long horizon.
  ev.adaptive, ev.time_steps, ev.horizon_multiplier = False, False, 0
  return config


def test_language_model_families_and_shifts_use_the_right_text():
  config = _tiny_language_model_config()
  builders.validate_config(config)
  meta_train_family, meta_test_family = builders.build_families(config)
  blocks = f':{config.task.text_block_size}'  # the regions' interleaved blocks
  assert meta_train_family.train.name == 'python_docs:train' + blocks
  assert meta_test_family.train.name == 'python_docs:heldout' + blocks
  assert meta_train_family.test.name == meta_test_family.test.name == 'python_docs:test' + blocks
  code = builders.shifted_family(config, meta_test_family, 'heldout_text', 'meta_test')
  assert code.train.name == 'python_stdlib:heldout' + blocks
  assert code.test.name == 'python_stdlib:test' + blocks
  tuning = builders.shifted_family(config, meta_train_family, 'heldout_text', 'meta_train')
  assert tuning.train.name == 'python_stdlib:train' + blocks
  quarter = builders.shifted_family(config, meta_test_family, 'batch_quarter')
  assert quarter.batch_size == 1 and quarter.train is meta_test_family.train
  with pytest.raises(ValueError, match='changes image inputs'):
    builders.shifted_family(config, meta_test_family, 'inputs_x2')
  divergence = builders.build_divergence(config, meta_train_family)
  assert divergence['block_0']['attention']['query']['kernel'].cols == (1, 2)


@pytest.mark.parametrize('field, value, match', [
    ('task.text', 'wikipedia', r'config\.task\.text'),
    ('task.num_heads', 3, r'config\.task\.num_heads must divide'),
    ('task.slice_size', 8, r'config\.task\.slice_size'),
    ('eval.shifts', ('inputs_x2',), r'config\.eval\.shifts'),
    ('eval.reference', 'sgd', r'config\.eval\.reference'),
    ('eval.track_every', 3, r'config\.eval\.track_every must divide'),
])
def test_bad_language_model_values_name_the_field(field, value, match):
  config = _tiny_language_model_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    builders.validate_config(config)


def test_heldout_text_is_for_language_models_only():
  config = tiny.get_config()
  config.eval.shifts = ('heldout_text',)
  with pytest.raises(ValueError, match=r"config\.eval\.shifts may name 'heldout_text' only"):
    builders.validate_config(config)


@pytest.mark.heavy
def test_language_model_evaluation_end_to_end(tmp_path):
  # The divergence as meta-training starts it (the transformer's meta-gradient is covered
  # by tests/test_scripts.py and meta-training by the classification pipeline tests).
  # The held-out-text shift is the generic re-tuned comparison (tested on classification,
  # test_a_shift_keeps_every_optimizer_and_retunes_adam) on the family built in
  # test_language_model_families_and_shifts_use_the_right_text.
  config = _tiny_language_model_config()
  config.eval.shifts = ()
  family, _ = builders.build_families(config)
  results = evaluate.evaluate(config, tmp_path, builders.build_divergence(config, family))
  assert results['reference'] == 'adamw'
  assert set(results['optimizers']) == {'metamd', 'adamw'}
  for entry in results['optimizers'].values():
    assert 'test_bits_per_byte' in entry
    assert entry['curve_every'] == 5 and len(entry['mean_curve']) == 3
  adamw = results['optimizers']['adamw']
  # The reference reaches its own final loss; bits per byte are nats / ln 2.
  assert adamw['reached_fraction'] == 1.0
  np.testing.assert_allclose(adamw['test_bits_per_byte'][0],
                             adamw['test_loss'][0] / np.log(2), rtol=1e-5)
  assert not results.get('shifts')
  table = (tmp_path / 'results.md').read_text()
  assert 'test bits per byte' in table and 'steps to adamw final loss' in table
  assert (tmp_path / 'loss_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_language_model_on_a_user_text_file(tmp_path):
  config = _tiny_language_model_config()
  config.task.text, config.task.eval_text = 'text_file', ''
  config.eval.shifts = ()
  with pytest.raises(ValueError, match=r'config\.task\.data_dir'):
    builders.validate_config(config)
  corpus = (b'The quick brown fox jumps over the lazy dog. ' * 600)[:25_000]
  (tmp_path / 'corpus.txt').write_bytes(corpus)
  config.task.data_dir = str(tmp_path / 'corpus.txt')
  builders.validate_config(config)
  # 25 KB is too short for ten blocks of the config's 4096 bytes: the field is named.
  with pytest.raises(ValueError, match=r'config\.task\.text_block_size 4096: .* empty'):
    builders.build_families(config)
  config.task.text_block_size = 0  # contiguous regions
  meta_train_family, meta_test_family = builders.build_families(config)
  assert meta_train_family.train.tokens.tobytes() == corpus[:20_000]
  assert meta_test_family.train.tokens.tobytes() == corpus[20_000:22_500]
  assert meta_train_family.test.tokens.tobytes() == corpus[22_500:]


def test_shifts_apply_by_family_kind(setup):
  from configs import least_squares

  config, family, _, _ = setup
  every = tuple(builders.SHIFTS)
  assert builders.applicable_shifts(family, every) == tuple(
      s for s in every if s != 'heldout_text')
  lm_family, _ = builders.build_families(_tiny_language_model_config())
  assert builders.applicable_shifts(lm_family, every) == builders.LANGUAGE_MODEL_SHIFTS
  convex_config = least_squares.get_config()
  builders.validate_config(convex_config)  # inherits the default's image shifts
  convex_family, _ = builders.build_families(convex_config)
  assert builders.applicable_shifts(convex_family, convex_config.eval.shifts) == ()


def test_calibration_records_an_infinite_setting_as_none():
  """JSON has no infinity: inf (the schedule alone, no cap) is recorded as None."""
  assert evaluate.as_recorded(math.inf) is None
  assert evaluate.as_recorded(0.3) == 0.3 and evaluate.as_recorded('kronecker') == 'kronecker'
  assert evaluate.as_recorded(True) is True and evaluate.as_recorded(None) is None
