"""Smoke test of the benchmark (experiments/benchmark.py) on one tiny family."""

import json
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest

import metamd_jax
from configs import benchmark as benchmark_config
from configs import default, digits_mlp, mnist1d_cnn, tiny
from experiments import benchmark, benchmark_runs, benchmark_setup, benchmark_targets, builders
from metamd_jax import datasets, evaluation
from scripts import benchmark_wall_clock


def _tiny_benchmark_config() -> ml_collections.ConfigDict:
  config = benchmark_config.get_config()
  config.quick = True
  family = tiny.get_config()
  family.heldout = ml_collections.ConfigDict({'dataset': '', 'generator': {}})
  family.targets = benchmark_config.get_config().families.digits_mlp.targets
  config.families = ml_collections.ConfigDict({'tiny': family})
  config.family_names = ('tiny',)
  config.quick_family_names = ('tiny',)
  config.quick_num_tasks = 2
  config.quick_learning_rates = (0.01, 0.1)
  # The tiny config's own meta-steps: the meta-step program of the tiny pipeline tests,
  # compiled once per session.
  config.quick_meta_steps = tiny.get_config().meta.num_meta_steps
  # Adam alone (the reference): every tuned baseline is the same code path. Without SGD
  # the learned optimisers start from the family's own learning rate.
  config.baselines = ('adam',)
  config.init_from_tuned_sgd = False
  # MetaMD alone keeps the smoke test well under a minute; the learned baselines are the
  # same code path with another structure or meta-objective (test_variant_configs).
  config.variant_names = ('metamd',)
  config.horizon_multiplier = 3
  config.timing_repeats = 1
  config.quick_shifts = ('inputs_x2',)  # one cheap shift; the 3T check comes with it
  # Adam (the reference) joins the robustness checks anyway; SGD there is the same code.
  config.robustness_optimizers = ('metamd', 'metamd_adaptive')
  # Frozen MetaMD at rank 2 joins as the learned row 'metamd_low_rank'.
  family.eval.frozen_rank = 2
  return config


def _finite_pair(value):
  assert isinstance(value, list) and len(value) == 2, value
  assert all(isinstance(v, float) and math.isfinite(v) for v in value), value


@pytest.mark.heavy
def test_quick_benchmark_writes_documented_results(tmp_path, capsys, monkeypatch):
  config = _tiny_benchmark_config()
  benchmark.benchmark(config, tmp_path, progress=False)
  assert '## tiny' in capsys.readouterr().out

  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['settings']['num_tasks'] == 2
  family = results['families']['tiny']
  assert results['settings']['shifts'] == ['inputs_x2']
  assert set(family['optimizers']) == {'metamd', 'metamd_adaptive', 'metamd_low_rank', 'adam'}
  # Adaptive MetaMD: calibrated on the meta-train tuning tasks, a learned optimiser.
  # One level per parameter leaf (the default eval.adaptive_per_leaf); a leaf whose
  # gradients vanish has no level (infinite, null in JSON).
  norm = family['adaptive']['reference_norm']
  assert family['adaptive']['per_leaf'] is True and len(norm) == 4  # the MLP's four leaves
  assert all(c is None or c > 0 for c in norm) and any(c is not None for c in norm)
  assert family['optimizers']['metamd_adaptive']['reference_norm'] == norm
  assert family['adaptive']['calibration_tasks'] == 'meta-train tuning tasks'
  assert family['optimizers']['metamd_adaptive']['kind'] == 'learned'
  assert {'metamd', 'metamd_adaptive', 'metamd_low_rank'} <= set(family['learned_vs_baselines'])
  assert family['optimizers']['metamd_low_rank']['kind'] == 'learned'
  for name, entry in family['optimizers'].items():
    if entry['kind'] == 'baseline':
      assert entry['learning_rate'] in config.quick_learning_rates
    else:
      assert entry['learning_rate'] is None
    for field in ('final_train_loss', 'test_accuracy', 'wall_clock_seconds',
                  'seconds_per_step'):
      _finite_pair(entry[field])
    assert entry['wall_clock_seconds'][0] > 0
    # adam reaches its own final loss; the others may not, then the mean is null.
    steps = entry['steps_to_adam_final_loss']
    seconds = entry['seconds_to_adam_final_loss']
    if entry['reached_fraction'] > 0:
      _finite_pair(steps)
      _finite_pair(seconds)
      assert 0 <= steps[0] <= family['horizon']
    if name == 'adam':
      assert entry['reached_fraction'] == 1.0
    # The learned optimisers and the reference: also timed to the step where each task
    # reaches the reference's loss (runs stopped there).
    elapsed = entry['elapsed_seconds_to_adam_final_loss']
    if entry['reached_fraction'] > 0:
      _finite_pair(elapsed)
      assert elapsed[0] > 0
    else:
      assert elapsed == [None, None]
    # Curves are the whole-training-set loss after 0, 1, ..., T steps; the final loss is
    # its last entry.
    curve = entry['mean_curve']
    assert len(curve) == family['horizon'] + 1 and entry['curve_every'] == 1
    assert math.isclose(curve[-1], entry['final_train_loss'][0], rel_tol=1e-5)
  assert family['init_from'] == 'config'
  assert family['init_learning_rate'] == config.families.tiny.meta.init_learning_rate
  for variant, info in family['meta_training'].items():
    assert info['num_meta_steps'] >= 1, variant
    assert (tmp_path / 'tiny' / variant / 'divergence.npz').exists()
  # The adaptive row's optimiser loads from the workdir: the family's calibration holds the
  # digest of the divergence it was made for, the metamd variant's artifact.
  divergence, _ = metamd_jax.load_divergence(tmp_path / 'tiny' / 'metamd' / 'divergence.npz')
  assert family['adaptive']['divergence_digest'] == (
      metamd_jax.calibrated.divergence_digest(divergence))
  loaded = metamd_jax.load_calibration(tmp_path / 'results.json', family='tiny')
  assert loaded['reference_norm'] == [math.inf if c is None else c for c in norm]
  metamd_jax.load_optimizer(tmp_path, family='tiny')
  for row in family['learned_vs_baselines']['metamd'].values():
    _finite_pair(row['baseline_final_train_loss'])
    _finite_pair(row['baseline_wall_clock_seconds'])
  # The family declares the digits targets: T/4 steps and test accuracy; then
  # fewer_steps_than_every_baseline, one target per tuned baseline, read off the
  # learned-vs-baselines rows; and the robustness target; adaptive MetaMD's alike, and
  # low-rank MetaMD's but robustness (it is not among the robustness optimisers).
  assert set(family['targets']) == {
      'steps_to_adam_at_most_T_over_4', 'metamd_adaptive_steps_to_adam_at_most_T_over_4',
      'metamd_low_rank_steps_to_adam_at_most_T_over_4',
      'test_accuracy_at_least_adam', 'metamd_adaptive_test_accuracy_at_least_adam',
      'metamd_low_rank_test_accuracy_at_least_adam',
      'fewer_steps_than_adam', 'metamd_adaptive_fewer_steps_than_adam',
      'metamd_low_rank_fewer_steps_than_adam',
      'no_diverged_runs_where_adam_trains', 'faster_than_adam_retuned_in_0.8_of_checks',
      'metamd_adaptive_no_diverged_runs_where_adam_trains',
      'metamd_adaptive_faster_than_adam_retuned_in_0.8_of_checks'}
  for learned in ('metamd', 'metamd_adaptive', 'metamd_low_rank'):
    prefix = '' if learned == 'metamd' else f'{learned}_'
    entry, adam = family['optimizers'][learned], family['optimizers']['adam']
    accuracy = family['targets'][f'{prefix}test_accuracy_at_least_adam']
    assert (accuracy['value'], accuracy['limit']) == (entry['test_accuracy'][0],
                                                      adam['test_accuracy'][0])
    assert accuracy['met'] == (accuracy['value'] >= accuracy['limit'])
    steps = family['targets'][f'{prefix}steps_to_adam_at_most_T_over_4']
    assert steps['limit'] == family['horizon'] / 4
  for learned, baseline in (('metamd', 'adam'), ('metamd_adaptive', 'adam'),
                            ('metamd_low_rank', 'adam')):
    prefix = '' if learned == 'metamd' else f'{learned}_'
    target = family['targets'][f'{prefix}fewer_steps_than_{baseline}']
    row = family['learned_vs_baselines'][learned][baseline]
    assert (target['value'], target['limit']) == (row['steps'][0], row['baseline_steps'][0])
    assert target['met'] == (row['reached_fraction'] == 1.0 and target['value'] is not None
                             and target['limit'] is not None
                             and target['value'] < target['limit'])
  # Beyond the horizon: the learned optimisers, the reference and Adam re-tuned for 3T.
  assert set(family['beyond_horizon']) == {'metamd', 'metamd_adaptive', 'metamd_low_rank',
                                           'adam', 'adam_retuned'}
  for entry in family['beyond_horizon'].values():
    assert entry['steps'] == 3 * family['horizon']
    _finite_pair(entry['loss_at_T'])
    assert 0.0 <= entry['blew_up_fraction'] <= 1.0
  _check_robustness(family)
  markdown = (tmp_path / 'results.md').read_text()
  assert markdown.startswith('## tiny')
  assert "Elapsed, timing per task a run stopped where it reaches that loss: metamd " in markdown
  assert 'Robustness:' in markdown and '| 3T | metamd_adaptive | learned (c per leaf: ' in markdown
  for suffix in ('loss_vs_step', 'loss_vs_time', 'beyond_horizon', 'robustness'):
    assert (tmp_path / f'tiny_{suffix}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  _check_wall_clock(config, tmp_path, family)
  _check_low_rank_on_validation_tasks(config, tmp_path, monkeypatch)
  _check_elapsed(config, tmp_path, monkeypatch, capsys)
  _check_longer_runs(config, tmp_path, monkeypatch)
  _check_run_lengths(config, tmp_path, monkeypatch, capsys)


def _check_low_rank_on_validation_tasks(config, workdir, monkeypatch):
  """``metamd_rank_<r>[_<fill>]`` times frozen MetaMD at rank ``r``, and
  ``tasks='validation'`` runs the meta-train family's validation tasks: every row is a plain
  run of that optimiser on those tasks, and the stored (held-out) steps are not compared."""
  monkeypatch.setattr(benchmark_runs, 'time_runs', lambda optimizer, family, tasks, steps,
                      repeats: np.full(jax.tree.leaves(tasks)[0].shape[0], 1e-3 * steps))
  figures = benchmark_wall_clock.wall_clock(
      config, 'tiny', workdir, workdir / 'results.json', ['metamd_rank_1', 'metamd_rank_2_max'],
      repeats=1, tasks='validation')
  family_cfg = benchmark_setup.family_config(config, 'tiny')
  train_family, _ = builders.build_families(family_cfg)
  num_tasks = builders.num_validation_tasks(family_cfg.eval)
  assert figures['tasks'] == 'validation' and figures['num_tasks'] == num_tasks
  tasks = evaluation.tuning_tasks(train_family, family_cfg.seed, num_tasks)
  divergence, _ = metamd_jax.load_divergence(workdir / 'tiny' / 'metamd' / 'divergence.npz')
  stored = json.loads((workdir / 'results.json').read_text())['families']['tiny']
  plain = {'adam': optax.adam(stored['optimizers']['adam']['learning_rate']),
           'metamd_rank_1': metamd_jax.low_rank_metamd(divergence, 1),
           'metamd_rank_2_max': metamd_jax.low_rank_metamd(divergence, 2, fill='max')}
  assert list(figures['optimizers']) == list(plain)
  for name, optimizer in plain.items():
    run = evaluation.run(optimizer, train_family, tasks, family_cfg.meta.horizon, track_every=1)
    row = figures['optimizers'][name]
    assert row['final_train_loss'] == pytest.approx(
        float(np.mean(evaluation.final_train_loss(run.train_losses))), rel=1e-5), name
    assert row['stored_steps_to_reference_final_loss'] is None, name
  for bad, message in (('metamd_rank_0', 'integer >= 1'), ('metamd_rank_x', 'integer >= 1'),
                       ('metamd_rank_4_median', 'fill must be one of')):
    with pytest.raises(SystemExit, match=message):
      benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json', [bad])
  family_cfg.eval.frozen_rank = None  # 'metamd_low_rank' is the config's rank
  with pytest.raises(SystemExit, match='needs the config.s eval.frozen_rank'):
    benchmark_wall_clock.build_optimizer('metamd_low_rank', family_cfg, stored, divergence)
  with pytest.raises(SystemExit, match='--tasks must be one of'):
    benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json',
                                    ['metamd'], tasks='test')


def _check_run_lengths(config, workdir, monkeypatch, capsys):
  """``run_lengths``: every optimiser is also timed over runs of each step count, on every
  task; with a clock of 0.5 ms per run plus 1 ms per step the figures are those times."""
  timed = []

  def fake_time_runs(optimizer, family, task_params, num_steps, repeats):
    count = jax.tree.leaves(task_params)[0].shape[0]
    timed.append((num_steps, count))
    return np.full(count, 5e-4 + 1e-3 * num_steps)

  monkeypatch.setattr(benchmark_runs, 'time_runs', fake_time_runs)
  figures = benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json',
                                            ['metamd'], repeats=1, run_lengths=[1, 3])
  horizon, num_tasks = figures['horizon'], figures['num_tasks']
  assert sorted(timed) == sorted([(horizon, num_tasks)] * 2 + [(1, num_tasks), (3, num_tasks)] * 2)
  for name, row in figures['optimizers'].items():
    assert row['run_length_seconds'] == pytest.approx({'1': 1.5e-3, '3': 3.5e-3}), name
  out = capsys.readouterr().out
  assert '| optimiser | n = 1 | n = 3 |' in out and '| metamd | 1.50 | 3.50 |' in out
  for bad in ([0], [2, 2], [1.5], [True]):
    with pytest.raises(SystemExit, match='run-lengths'):
      benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json',
                                      ['metamd'], run_lengths=bad)


def _check_longer_runs(config, workdir, monkeypatch):
  """``horizon_multiplier=m``: every optimiser trains (and is timed over) ``m T`` steps, and
  the reference's loss is its own ``m T``-step loss: that of a plain run of the stored rate
  for ``m T`` steps on the same tasks. The stored steps (for ``T``) are not compared."""
  timed = []

  def fake_time_runs(optimizer, family, task_params, num_steps, repeats):
    timed.append(num_steps)
    return np.full(jax.tree.leaves(task_params)[0].shape[0], 1e-3 * num_steps)

  monkeypatch.setattr(benchmark_runs, 'time_runs', fake_time_runs)
  figures = benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json',
                                            ['metamd'], repeats=1, horizon_multiplier=2)
  family_cfg = benchmark_setup.family_config(config, 'tiny')
  horizon = 2 * family_cfg.meta.horizon
  assert figures['horizon'] == horizon and figures['horizon_multiplier'] == 2
  assert timed and all(steps == horizon for steps in timed)
  _, test_family = builders.build_families(family_cfg)
  tasks = evaluation.held_out_tasks(test_family, family_cfg.seed, figures['num_tasks'])
  stored = json.loads((workdir / 'results.json').read_text())['families']['tiny']
  adam = optax.adam(stored['optimizers']['adam']['learning_rate'])
  plain = evaluation.run(adam, test_family, tasks, horizon, track_every=1)
  row = figures['optimizers']['adam']
  assert row['final_train_loss'] == pytest.approx(
      float(np.mean(evaluation.final_train_loss(plain.train_losses))), rel=1e-5)
  assert row['reached_fraction'] == 1.0 and row['steps_to_reference_final_loss'][0] <= horizon
  assert all(r['stored_steps_to_reference_final_loss'] is None
             for r in figures['optimizers'].values())
  for bad in (0, True):
    with pytest.raises(SystemExit, match='horizon-multiplier'):
      benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json',
                                      ['metamd'], horizon_multiplier=bad)


def _check_elapsed(config, workdir, monkeypatch, capsys):
  """``elapsed=True`` times, per task, a run stopped at the step where that task reaches
  the reference's loss: with a clock of 1 ms per step the elapsed seconds are the steps."""
  timed = []

  def fake_time_runs(optimizer, family, task_params, num_steps, repeats):
    count = jax.tree.leaves(task_params)[0].shape[0]
    timed.append((num_steps, count))
    return np.full(count, 1e-3 * num_steps)

  monkeypatch.setattr(benchmark_runs, 'time_runs', fake_time_runs)
  figures = benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json',
                                            ['metamd'], repeats=1, elapsed=True)
  horizon = figures['horizon']
  for name, row in figures['optimizers'].items():
    per_task = row['elapsed_seconds_per_task']
    assert len(per_task) == figures['num_tasks'], name
    reached = [s for s in per_task if s is not None]
    assert len(reached) == round(row['reached_fraction'] * figures['num_tasks']), name
    steps = row['steps_to_reference_final_loss'][0]
    if steps is None:  # no task reached it: nothing was timed
      assert not reached and row['elapsed_fraction_of_reference_T_seconds'] is None, name
      continue
    # 1 ms per step: the elapsed mean is the mean steps to the loss, in ms.
    assert row['elapsed_seconds_to_reference_final_loss'][0] == pytest.approx(1e-3 * steps)
    assert row['elapsed_fraction_of_reference_T_seconds'] == pytest.approx(steps / horizon)
  assert figures['optimizers']['adam']['reached_fraction'] == 1.0  # its own loss
  # Each stopped run is one task, of its own step count; the T-step runs time all tasks.
  assert all(count == 1 for steps, count in timed if steps != horizon)
  assert '| elapsed s to it | elapsed x T-step s |' in capsys.readouterr().out


def _check_wall_clock(config, workdir, family):
  """scripts/benchmark_wall_clock re-times the finished run: on the CPU it ran on, the
  same runs (step counts, final losses) from the stored divergence, rates and calibration."""
  figures = benchmark_wall_clock.wall_clock(
      config, 'tiny', workdir, workdir / 'results.json',
      ['metamd_adaptive', 'metamd', 'metamd_low_rank'], repeats=1,
      json_path=workdir / 'wall_clock.json')
  # adam first
  assert list(figures['optimizers']) == ['adam', 'metamd_adaptive', 'metamd', 'metamd_low_rank']
  assert figures['errors'] == {} and figures['num_tasks'] == 2
  adam_seconds = figures['optimizers']['adam']['seconds_for_T_steps']
  for name, row in figures['optimizers'].items():
    stored = family['optimizers'][name]
    assert row['steps_to_reference_final_loss'] == stored['steps_to_adam_final_loss'], name
    assert row['stored_steps_to_reference_final_loss'] == stored['steps_to_adam_final_loss']
    assert row['final_train_loss'] == pytest.approx(stored['final_train_loss'][0], rel=1e-5)
    assert row['seconds_for_T_steps'] > 0
    assert row['seconds_per_step'] == pytest.approx(row['seconds_for_T_steps'] / family['horizon'])
    seconds_to = row['seconds_to_reference_final_loss'][0]
    if seconds_to is not None:
      assert row['fraction_of_reference_T_seconds'] == pytest.approx(seconds_to / adam_seconds)
  assert json.loads((workdir / 'wall_clock.json').read_text())['optimizers'].keys() == (
      figures['optimizers'].keys())
  # Another adaptive variant (--set): accepted where named as changed, refused otherwise.
  assert benchmark_wall_clock.parse_settings(['adaptive_momentum=0', 'adaptive_blend_statistics'
                                              '=sum']) == {'adaptive_momentum': 0.0,
                                                           'adaptive_blend_statistics': 'sum'}
  for bad in ('adaptive_decay=0.5', 'adaptive_momentum', 'adaptive_momentum=fast'):
    with pytest.raises(SystemExit, match='--set'):
      benchmark_wall_clock.parse_settings([bad])
  family_cfg = benchmark_setup.family_config(config, 'tiny')
  family_cfg.eval.adaptive_momentum = 0.0
  divergence, _ = metamd_jax.load_divergence(workdir / 'tiny' / 'metamd' / 'divergence.npz')
  assert benchmark_wall_clock.build_optimizer('metamd_adaptive', family_cfg, family, divergence,
                                              ('adaptive_momentum',)) is not None
  with pytest.raises(SystemExit, match='momentum'):
    benchmark_wall_clock.build_optimizer('metamd_adaptive', family_cfg, family, divergence)
  family_cfg = benchmark_setup.family_config(config, 'tiny')
  family_cfg.eval.adaptive_online_power = 0.25  # not what the run stored
  with pytest.raises(SystemExit, match='online_power'):
    benchmark_wall_clock.build_optimizer('metamd_adaptive', family_cfg, family, divergence)
  assert benchmark_wall_clock.parse_settings(['adaptive_online_power=0.5']) == {
      'adaptive_online_power': 0.5}
  family_cfg = benchmark_setup.family_config(config, 'tiny')
  family_cfg.eval.adaptive_blend_block_size = 256  # not what the run stored (no blocking)
  with pytest.raises(SystemExit, match='block_size'):
    benchmark_wall_clock.build_optimizer('metamd_adaptive', family_cfg, family, divergence)
  settings = benchmark_wall_clock.parse_settings(['adaptive_blend_block_size=256',
                                                  'adaptive_blend_max_dimension=512'])
  assert settings == {'adaptive_blend_block_size': 256, 'adaptive_blend_max_dimension': 512}
  assert all(type(value) is int for value in settings.values())
  with pytest.raises(SystemExit, match='an integer'):
    benchmark_wall_clock.parse_settings(['adaptive_blend_block_size=2.5'])
  assert benchmark_wall_clock.parse_settings(
      ['adaptive_overshoot=True', 'adaptive_overshoot_decay=0.8']) == {
          'adaptive_overshoot': True, 'adaptive_overshoot_decay': 0.8}
  with pytest.raises(SystemExit, match='true or false'):
    benchmark_wall_clock.parse_settings(['adaptive_overshoot=1'])
  assert benchmark_wall_clock.parse_settings(['adaptive_restarts=false']) == {
      'adaptive_restarts': False}
  with pytest.raises(SystemExit, match='true or false'):
    benchmark_wall_clock.parse_settings(['adaptive_restarts=no'])
  for pair, value in (('adaptive_refresh_growth=0.3', 0.3), ('adaptive_overshoot_cap=10', 10.0),
                      ('adaptive_restart_growth=0.5', 0.5), ('adaptive_restart_shrink=0.5', 0.5),
                      ('adaptive_restart_momentum=0.9', 0.9),
                      ('adaptive_restart_step_factor=0.2', 0.2),
                      ('adaptive_overshoot_scope=step', 'step'),
                      ('adaptive_guard_margin=2', 2.0), ('adaptive_guard_steps=20', 20),
                      ('adaptive_guard_progress=0.02', 0.02),
                      ('adaptive_guard_prior=true', True)):
    assert benchmark_wall_clock.parse_settings([pair]) == {pair.split('=')[0]: value}
  with pytest.raises(SystemExit, match='learned'):
    benchmark_wall_clock.parse_settings(['adaptive_overshoot_scope=online'])
  # A setting that differs from the stored calibration is named, not silently used.
  for field, stored, changed in (('refresh_growth', 0.1, math.inf), ('overshoot_cap', 3.0, 7.0),
                                 ('restarts', True, False), ('restart_growth', 0.0, 0.5),
                                 ('restart_shrink', 0.0, 0.5), ('restart_momentum', None, 0.9),
                                 ('restart_step_factor', 0.5, 0.2),
                                 ('overshoot_scope', 'learned', 'step'),
                                 ('eigenbasis_rank', 0, 4)):
    family_cfg = benchmark_setup.family_config(config, 'tiny')
    assert family['adaptive'][field] == family_cfg.eval[f'adaptive_{field}'] == stored
    family_cfg.eval[f'adaptive_{field}'] = changed  # not stored
    with pytest.raises(SystemExit, match=field):
      benchmark_wall_clock.build_optimizer('metamd_adaptive', family_cfg, family, divergence)
  family_cfg = benchmark_setup.family_config(config, 'tiny')
  family_cfg.eval.adaptive_overshoot = not family_cfg.eval.adaptive_overshoot  # not stored
  with pytest.raises(SystemExit, match='overshoot'):
    benchmark_wall_clock.build_optimizer('metamd_adaptive', family_cfg, family, divergence)
  with pytest.raises(SystemExit, match='no learned divergence'):
    benchmark_wall_clock.wall_clock(config, 'tiny', workdir / 'nowhere',
                                    workdir / 'results.json')
  with pytest.raises(SystemExit, match='is not a file'):
    benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'missing.json')
  with pytest.raises(SystemExit, match="neither metamd, metamd_adaptive nor a baseline"):
    benchmark_wall_clock.wall_clock(config, 'tiny', workdir, workdir / 'results.json', ['adan'])


def _check_robustness(family):
  """The robustness section of the tiny run: its documented keys and its summary."""
  robustness = family['robustness']
  assert list(robustness) == ['inputs_x2', '3T']  # the shifts, then the long horizon
  horizon = family['horizon']
  assert robustness['3T']['num_steps'] == 3 * horizon
  assert robustness['inputs_x2']['num_steps'] == horizon
  for check in robustness.values():
    assert {'description', 'reference', 'adam_retuned_learning_rate', 'seconds',
            'optimizers'} <= set(check)
    assert check['reference'] == 'adam_retuned'
    assert set(check['optimizers']) == {'metamd', 'metamd_adaptive', 'adam', 'adam_retuned'}
    for name, entry in check['optimizers'].items():
      assert entry['num_runs'] == 2
      assert 0 <= entry['diverged'] + entry['above_initial_loss'] <= 2
      for field in ('learning_rate', 'final_train_loss', 'steps_to_adam_retuned_final_loss',
                    'reached_fraction', 'test_accuracy'):
        assert field in entry, (name, field)
      if name == 'adam':  # as tuned on the meta-train family
        assert entry['learning_rate'] == family['optimizers'][name]['learning_rate']
    assert check['optimizers']['adam_retuned']['reached_fraction'] == 1.0
  assert family['beyond_horizon']['adam_retuned']['learning_rate'] == (
      robustness['3T']['adam_retuned_learning_rate'])
  # The summary is the robustness section's count (its arithmetic: test_benchmark_targets).
  summary = family['robustness_summary']
  assert summary == benchmark_targets.robustness_summary(
      robustness, ['metamd', 'metamd_adaptive'], 'adam')
  for name, prefix in (('metamd', ''), ('metamd_adaptive', 'metamd_adaptive_')):
    assert summary[name]['checks'] == ['inputs_x2', '3T']
    assert family['targets'][f'{prefix}no_diverged_runs_where_adam_trains']['value'] == (
        summary[name]['diverged_runs'])
    assert family['targets'][f'{prefix}faster_than_adam_retuned_in_0.8_of_checks'][
        'value'] == summary[name]['faster_fraction']


def test_variant_configs():
  config = benchmark_config.get_config()
  benchmark_setup.validate(config)
  family = benchmark_setup.family_config(config, 'mnist_mlp')
  assert family.eval.num_steps == family.meta.horizon
  assert family.eval.num_tasks >= 5 and len(family.eval.learning_rates) >= 7
  expected = {'metamd': ('kronecker', 'bound'), 'meta_sgd': ('diagonal', 'bound'),
              'unrolled': ('kronecker', 'unrolled')}
  for name, (structure, objective) in expected.items():
    variant = benchmark_setup.variant_config(family, config.variants[name])
    assert (variant.meta.structure, variant.meta.objective) == (structure, objective)
    assert 1 <= variant.meta.num_meta_steps <= family.meta.num_meta_steps
  diagonal = benchmark_setup.variant_config(family, config.variants['meta_sgd'])
  assert (diagonal.meta.optimizer, diagonal.meta.learning_rate) == ('adam', 0.1)
  metamd = benchmark_setup.variant_config(family, config.variants['metamd'])
  assert metamd.meta.optimizer == 'muon'
  config.variants.meta_sgd.meta.not_a_field = 1
  with pytest.raises(ValueError, match='not_a_field'):
    benchmark_setup.variant_config(family, config.variants['meta_sgd'])
  config.quick = True
  assert benchmark_setup.family_names(config) == tuple(config.quick_family_names)
  assert benchmark_setup.family_config(config, 'digits_mlp').meta.num_meta_steps == 3


def test_start_of_meta_training_per_family():
  config = benchmark_config.get_config()
  # Chosen per family on validation tasks (experiments/results/sweep_init_*.json).
  starts = {name: benchmark_setup.init_from_tuned_sgd(
      config, benchmark_setup.family_config(config, name)) for name in config.family_names}
  assert starts == {'mnist_mlp': True, 'mnist1d_cnn': False, 'digits_mlp': True,
                    'least_squares': True}
  config.init_from_tuned_sgd = False  # the benchmark-wide setting, where a family has none
  assert not benchmark_setup.init_from_tuned_sgd(
      config, benchmark_setup.family_config(config, 'mnist_mlp'))
  config.families.mnist1d_cnn.init_from_tuned_sgd = True
  assert benchmark_setup.init_from_tuned_sgd(
      config, benchmark_setup.family_config(config, 'mnist1d_cnn'))
  config.families.digits_mlp.init_from_tuned_sgd = 'yes'
  with pytest.raises(ValueError, match=r'config\.families\.digits_mlp\.init_from_tuned_sgd'):
    benchmark_setup.validate(config)


def test_image_families_meta_train_as_their_configs():
  # The variant's settings of each image family are chosen on validation tasks with the
  # divergence of its own config (experiments.choose_variant on a main job's artifact): the
  # benchmark meta-tests that divergence only if it meta-trains the same way (digits ran 60
  # meta-steps against its config's 100 until RESULTS.md section 20).
  config = benchmark_config.get_config()
  own = {'mnist_mlp': default, 'digits_mlp': digits_mlp, 'mnist1d_cnn': mnist1d_cnn}
  for name, module in own.items():
    family = benchmark_setup.family_config(config, name).meta.to_dict()
    expected = module.get_config().meta.to_dict()
    family.pop('checkpoint_every'), expected.pop('checkpoint_every')
    assert family == expected, name


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """Float64 bilinear resize along one axis: a triangle kernel widened by ``n_in / n_out``
  when shrinking (antialiasing), weights normalised over the input pixels."""
  scale = n_out / n_in
  width = min(scale, 1.0)
  rows = []
  for i in range(n_out):
    centre = (i + 0.5) / scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in) - centre) * width)
    rows.append(weights / weights.sum())
  return np.stack(rows)


@pytest.mark.parametrize('name,source,side', [('digits28', 'digits', 28),
                                              ('mnist8', 'mnist_subset', 8)])
def test_resized_heldout_datasets(name, source, side):
  data = benchmark_setup.resized_dataset(name, 'test')
  original = datasets.load_dataset(source, split='test')
  assert data.name == f'{name}:test' and data.num_classes == original.num_classes == 10
  np.testing.assert_array_equal(data.y, original.y)
  assert data.x.shape == (len(original), side, side, 1) and data.x.dtype == np.float32
  resize = _linear_resize_matrix(original.x.shape[1], side)
  expected = np.einsum('ij,bjkc,lk->bilc', resize, original.x.astype(np.float64), resize)
  np.testing.assert_allclose(data.x, expected, atol=1e-5)
  assert 0.0 <= data.x.min() and data.x.max() <= 1.0


def test_heldout_family_fits_the_learned_divergence():
  config = benchmark_config.get_config()
  datasets_by_family = {name: config.families[name].heldout.dataset
                        for name in config.family_names}
  assert datasets_by_family == {'mnist_mlp': 'digits28', 'mnist1d_cnn': 'mnist1d',
                                'digits_mlp': 'mnist8', 'least_squares': ''}
  family_cfg = benchmark_setup.family_config(config, 'digits_mlp')
  heldout = benchmark_setup.heldout_family(family_cfg)
  assert (heldout.train.name, heldout.test.name) == ('mnist8:train', 'mnist8:test')
  assert heldout.subset_size == family_cfg.task.subset_size
  train_family, _ = builders.build_families(family_cfg)
  key = jax.random.key(0)
  own = train_family.task(train_family.sample(key)).init()
  new = heldout.task(heldout.sample(key)).init()
  assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, new)
  divergence = metamd_jax.init_divergence(own, learning_rate=0.1)
  metamd_jax.divergence.check_structure(divergence, new)
  assert benchmark_setup.heldout_family(
      benchmark_setup.family_config(config, 'least_squares')) is None


@pytest.mark.parametrize('family,dataset,message', [
    ('digits_mlp', 'digits28', r"'digits28' .*fits the models of task\.dataset 'mnist_subset'"),
    ('mnist_mlp', 'mnist8', r"'mnist8' .*family's task\.dataset is 'mnist_subset'"),
    ('mnist_mlp', 'mnist1d', r"'mnist1d' .*fits the models of task\.dataset 'mnist1d'"),
    ('digits_mlp', 'cifar10', 'must be one of'),
])
def test_heldout_dataset_must_fit_the_family(family, dataset, message):
  config = benchmark_config.get_config()
  config.families[family].heldout.dataset = dataset
  with pytest.raises(ValueError, match=rf'config\.families\.{family}\.heldout\.dataset.*{message}'):
    benchmark_setup.validate(config)


@pytest.mark.parametrize('field,value,message', [
    ('shifts', ('heldout_text',), 'language-model families only'),
    ('shifts', 'inputs_x2', 'must be a tuple'),
    ('quick_shifts', ('inputs_x3',), 'not a shift'),
    ('quick_shifts', ('inputs_x2', 'inputs_x2'), 'must not repeat'),
    ('robustness_optimizers', ('metamd', 'adamax'), 'neither a learned variant'),
])
def test_bad_robustness_config_values_name_the_field(field, value, message):
  config = benchmark_config.get_config()
  with config.ignore_type():
    config[field] = value
  with pytest.raises(ValueError, match=rf'config\.{field}\b.*{message}'):
    benchmark_setup.validate(config)


def test_robustness_config():
  config = benchmark_config.get_config()
  assert set(config.shifts) == {'inputs_x2', 'inputs_offset', 'inputs_x255', 'inputs_div255',
                                'inputs_standardised', 'features_permuted', 'batch_quarter',
                                'batch_x4', 'label_noise'}
  assert benchmark_setup.shift_names(config) == tuple(config.shifts)
  config.quick = True
  assert 1 <= len(benchmark_setup.shift_names(config)) <= 2
  assert set(config.robustness_optimizers) == {*config.variant_names, 'metamd_adaptive',
                                               'adam', 'sgd'}
  # Names not in the run are skipped; the reference always joins.
  config.robustness_optimizers = ('metamd', 'unrolled', 'sgd')
  assert benchmark.robustness_names(config, 'adam', {'metamd': 0, 'sgd': 0, 'adam': 0}) == [
      'metamd', 'sgd', 'adam']
  config.variant_names = ('metamd', 'metamd_adaptive')
  with pytest.raises(ValueError, match=r'config\.variant_names names .metamd_adaptive'):
    benchmark_setup.validate(config)
