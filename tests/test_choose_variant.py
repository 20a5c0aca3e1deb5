"""experiments.choose_variant: adaptive MetaMD's variant chosen on validation tasks."""

import math

import jax
import numpy as np
import optax
import pytest

from configs import default as default_config
from configs import tiny
from experiments import (
  benchmark_runs,
  benchmark_targets,
  builders,
  choose_variant,
  evaluate,
  protocol,
)
from metamd_jax import divergence as divergence_lib
from metamd_jax import evaluation


def _check(reference_steps, entries, reference_loss=1.0, adam_diverged=0):
  """An evaluate_shift-like check: the re-tuned reference and ``entries`` by name."""
  optimizers = {'adam': {'diverged': adam_diverged},
                'adam_retuned': {'diverged': 0, 'final_train_loss': [reference_loss, 0.0],
                                 'steps_to_adam_retuned_final_loss': [reference_steps, 0.0],
                                 'reached_fraction': 1.0}}
  for name, (diverged, steps, reached, loss) in entries.items():
    optimizers[name] = {'diverged': diverged, 'final_train_loss': [loss, 0.0],
                        'steps_to_adam_retuned_final_loss': [steps, 0.0],
                        'reached_fraction': reached}
  return {'reference': 'adam_retuned', 'optimizers': optimizers}


def test_rule_diverged_runs_then_faster_checks_then_loss_ratio():
  checks = {
      # a diverges once where Adam trains; b is never faster; c is faster once.
      'x': _check(10, {'a': (1, 3, 0.5, 0.5), 'b': (0, 12, 1.0, 0.9), 'c': (0, 5, 1.0, 2.0)}),
      'y': _check(10, {'a': (0, 3, 1.0, 0.5), 'b': (0, 11, 1.0, 0.9), 'c': (0, 12, 1.0, 2.0)}),
  }
  scores = {n: choose_variant.score(checks, n, 'adam') for n in ('a', 'b', 'c')}
  assert [scores[n]['diverged_runs'] for n in 'abc'] == [1, 0, 0]
  assert [scores[n]['num_faster'] for n in 'abc'] == [1, 0, 1]
  assert math.isinf(scores['a']['loss_ratio_geometric_mean'])  # a diverged run in x
  np.testing.assert_allclose(scores['b']['loss_ratio_geometric_mean'], 0.9)
  assert choose_variant.choose(scores) == 'c'  # fewer diverged, then faster beats lower loss
  # Without c, b has fewer diverged runs than a, which is faster and lower.
  assert choose_variant.choose({n: scores[n] for n in 'ab'}) == 'b'
  # Equal on the first two: the lower geometric mean of loss ratios (0.5 * 2 -> 1 vs 0.9).
  even = {'p': _check(10, {'p': (0, 12, 1.0, 0.5), 'q': (0, 12, 1.0, 0.9)}),
          'r': _check(10, {'p': (0, 12, 1.0, 2.0), 'q': (0, 12, 1.0, 0.9)})}
  scores = {n: choose_variant.score(even, n, 'adam') for n in ('p', 'q')}
  np.testing.assert_allclose(scores['p']['loss_ratio_geometric_mean'], 1.0)
  assert choose_variant.choose(scores) == 'q'
  # Exact ties keep the first candidate.
  assert choose_variant.choose({'q': scores['q'], 'q2': dict(scores['q'])}) == 'q'
  # Divergence where Adam itself diverged does not count (robustness_summary's rule).
  lenient = {'z': _check(10, {'a': (2, 3, 0.5, 0.5)}, adam_diverged=1)}
  assert choose_variant.score(lenient, 'a', 'adam')['diverged_runs'] == 0


@pytest.mark.heavy
def test_compare_runs_validation_tasks_only_and_applies_the_rule(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.eval.shifts = ('inputs_x2',)
  config.eval.seconds_check = False  # the steps checks alone (the time check: below)
  config.eval.accuracy_check = False  # (the accuracy check: below)
  family, _ = builders.build_families(config)
  # The initial divergence is SGD at meta.init_learning_rate: an independent reference.
  divergence = builders.build_divergence(config, family)
  monkeypatch.setattr(evaluation, 'held_out_tasks',
                      lambda *a, **k: pytest.fail('held-out tasks used'))
  # Two of the candidates (each costs its runs): one scale, and blended with one scale per
  # eigendirection of the learned factors.
  candidates = {name: choose_variant.CANDIDATES[name] for name in ('adaptive', 'eigen_0.01')}
  assert candidates['eigen_0.01'] == {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.01,
                                      'adaptive_blend_statistics': 'sum',
                                      'adaptive_momentum': 0.0, 'adaptive_eigenbasis': True,
                                      'adaptive_eigenbasis_rank': 0,
                                      'adaptive_online_power': 1.0,
                                      'adaptive_blend_max_dimension': 1024,
                                      'adaptive_blend_block_size': 0,
                                      'adaptive_blend_sketch_rank': 0,
                                      'adaptive_blend_sketch_interval': 1,
                                      'adaptive_overshoot': False,
                                      'adaptive_overshoot_decay': 0.5,
                                      'adaptive_refresh_growth': math.inf,
                                      'adaptive_overshoot_cap': math.inf,
                                      'adaptive_overshoot_scope': 'learned',
                                      'adaptive_restarts': False,
                                      'adaptive_restart_growth': 0.0,
                                      'adaptive_restart_shrink': 0.0,
                                      'adaptive_restart_momentum': None,
                                      'adaptive_restart_step_factor': 0.5,
                                      'adaptive_lengthen_below': None,
                                      'adaptive_min_scale': 0.1,
                                      'adaptive_guard_margin': None,
                                      'adaptive_guard_steps': None,
                                      'adaptive_guard_progress': None,
                                      'adaptive_guard_prior': False}
  monkeypatch.setattr(choose_variant, 'CANDIDATES', candidates)
  result = choose_variant.compare(config, tmp_path, divergence)

  assert list(result['checks']) == ['in_distribution', 'inputs_x2']
  assert set(result['levels']) == {'adaptive', 'eigen_0.01'}
  assert isinstance(result['levels']['adaptive'], float)
  metrics = jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)
  assert len(result['levels']['eigen_0.01']) == len(metrics)
  for check in result['checks'].values():
    assert check['reference'] == 'adam_retuned'
    assert set(check['optimizers']) == {'metamd', 'adaptive', 'eigen_0.01', 'adam',
                                        'adam_retuned'}
    for entry in check['optimizers'].values():
      assert entry['num_runs'] == builders.num_validation_tasks(config.eval)
  # In distribution, frozen MetaMD on the validation tasks is optax.sgd there.
  tasks = evaluation.tuning_tasks(family, config.seed,
                                 builders.num_validation_tasks(config.eval))
  sgd = evaluation.run(optax.sgd(config.meta.init_learning_rate), family, tasks,
                       config.eval.num_steps, track_every=1)
  np.testing.assert_allclose(
      result['checks']['in_distribution']['optimizers']['metamd']['final_train_loss'][0],
      np.mean(evaluation.final_train_loss(sgd.train_losses)), rtol=1e-4)
  # Adam re-tuned in distribution is Adam as tuned: the same rate.
  in_distribution = result['checks']['in_distribution']
  assert in_distribution['adam_retuned_learning_rate'] == result['reference_learning_rate']
  # The scores are the rule's, recomputed from the checks; the choice is the rule's.
  for name, row in result['scores'].items():
    assert row == choose_variant.score(result['checks'], name, 'adam')
    summary = benchmark_targets.robustness_summary(result['checks'], [name], 'adam')[name]
    assert row['faster'] == summary['faster']
  assert result['chosen'] == choose_variant.choose(result['scores'])
  settings = candidates[result['chosen']]
  assert result['adaptive_per_leaf'] == settings['adaptive_per_leaf']
  assert result['adaptive_blend_rate'] == settings['adaptive_blend_rate']
  assert result.get('adaptive_blend_statistics', 'sum') == settings.get(
      'adaptive_blend_statistics', 'sum')
  table = choose_variant.format_choice(result)
  assert f"chosen: **{result['chosen']}**" in table
  if 'adaptive_blend_statistics' in result:
    assert f"eval.adaptive_blend_statistics={result['adaptive_blend_statistics']!r}" in table
  assert result.get('adaptive_eigenbasis', False) == settings['adaptive_eigenbasis']
  assert table.count('| inputs_x2 |') == 5 and '| eigen_0.01 | learned (c per leaf' in table


def test_beyond_the_horizon_is_a_check_with_the_reference_retuned_there(tmp_path,
                                                                        monkeypatch):
  """With ``eval.horizon_multiplier = 2`` the validation tasks also run for ``2 T`` steps
  (the whole-set loss every 2 steps), judged against Adam re-tuned for ``2 T`` steps."""
  config = tiny.get_config()
  config.eval.shifts = ()
  config.eval.horizon_multiplier = 2
  config.eval.seconds_check = False
  config.eval.accuracy_check = False
  family, _ = builders.build_families(config)
  divergence = builders.build_divergence(config, family)  # SGD at init_learning_rate
  monkeypatch.setattr(evaluation, 'held_out_tasks',
                      lambda *a, **k: pytest.fail('held-out tasks used'))
  monkeypatch.setattr(choose_variant, 'CANDIDATES',
                      {'adaptive': choose_variant.CANDIDATES['adaptive']})
  result = choose_variant.compare(config, tmp_path, divergence)

  assert list(result['checks']) == ['in_distribution', '2T']
  long = result['checks']['2T']
  steps = 2 * config.eval.num_steps
  assert long['num_steps'] == steps and f'({steps} steps' in long['description']
  assert result['scores']['adaptive']['num_checks'] == 2
  tasks = evaluation.tuning_tasks(family, config.seed,
                                 builders.num_validation_tasks(config.eval))
  # Frozen MetaMD there is optax.sgd for 2 T steps; the reference is re-tuned for 2 T
  # steps on the tuning tasks.
  sgd = evaluation.run(optax.sgd(config.meta.init_learning_rate), family, tasks, steps,
                       track_every=2)
  np.testing.assert_allclose(long['optimizers']['metamd']['final_train_loss'][0],
                             np.mean(evaluation.final_train_loss(sgd.train_losses)),
                             rtol=1e-4)
  tune_tasks = evaluation.tuning_tasks(family, config.seed, config.eval.num_tune_tasks)
  tuned, _ = protocol.tune_baselines(('adam',), config.eval, family, tune_tasks, steps)
  assert long['adam_retuned_learning_rate'] == tuned['adam']
  adam = evaluation.run(optax.adam(tuned['adam']), family, tasks, steps, track_every=2)
  np.testing.assert_allclose(long['optimizers']['adam_retuned']['final_train_loss'][0],
                             np.mean(evaluation.final_train_loss(adam.train_losses)),
                             rtol=1e-4)


def test_reference_that_always_diverges_is_named(tmp_path, monkeypatch):
  config = tiny.get_config()
  family, _ = builders.build_families(config)
  monkeypatch.setattr(protocol, 'tune_baselines', lambda names, *a: ({n: None for n in names},
                                                                      {}))
  with pytest.raises(ValueError, match='adam diverged at every learning rate'):
    choose_variant.compare(config, tmp_path, builders.build_divergence(config, family))


def test_missing_artifact_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='divergence.npz'):
    choose_variant.compare(tiny.get_config(), tmp_path)


def test_candidates_are_checked_and_kept_in_their_tie_breaking_order():
  assert choose_variant.check_candidates(['blended_kron_0.03', 'adaptive']) == (
      'adaptive', 'blended_kron_0.03')
  expected = {  # name: (blend rate, statistics, momentum, eigenbasis)
      'blended_kron_0.1': (0.1, 'kronecker', 0.0, False),
      'blended_0.01_nesterov_0.9': (0.01, 'sum', 0.9, False),
      'blended_peak_0.003_nesterov_0.5': (0.003, 'peak_average', 0.5, False),
      'eigen_kron_0.1_nesterov_0.5': (0.1, 'kronecker', 0.5, True),
      'eigen_peak_0.01_nesterov_0.5': (0.01, 'peak_average', 0.5, True)}
  for name, (rate, statistics, momentum, eigenbasis) in expected.items():
    assert choose_variant.CANDIDATES[name] == {
        'adaptive_per_leaf': True, 'adaptive_blend_rate': rate,
        'adaptive_blend_statistics': statistics, 'adaptive_momentum': momentum,
        'adaptive_eigenbasis': eigenbasis, 'adaptive_eigenbasis_rank': 0,
        'adaptive_online_power': 1.0,
        'adaptive_blend_max_dimension': 1024, 'adaptive_blend_block_size': 0,
        'adaptive_blend_sketch_rank': 0, 'adaptive_blend_sketch_interval': 1,
        'adaptive_overshoot': False, 'adaptive_overshoot_decay': 0.5,
        'adaptive_refresh_growth': math.inf, 'adaptive_overshoot_cap': math.inf,
        'adaptive_overshoot_scope': 'learned',
        'adaptive_restarts': False, 'adaptive_restart_growth': 0.0,
        'adaptive_restart_shrink': 0.0, 'adaptive_restart_momentum': None,
        'adaptive_restart_step_factor': 0.5, 'adaptive_lengthen_below': None,
        'adaptive_min_scale': 0.1, 'adaptive_guard_margin': None,
        'adaptive_guard_steps': None, 'adaptive_guard_progress': None,
        'adaptive_guard_prior': False}, name
  assert all(settings['adaptive_momentum'] == 0.0 for name, settings in
             choose_variant.CANDIDATES.items() if 'nesterov' not in name)
  assert choose_variant.CANDIDATES['eigen_kron_0.1_nesterov_0.5_online_0.5'] == {
      **choose_variant.CANDIDATES['eigen_kron_0.1_nesterov_0.5'], 'adaptive_online_power': 0.5}
  for rate in (0.003, 0.01, 0.03, 0.3):
    assert choose_variant.CANDIDATES[f'eigen_kron_{rate}_nesterov_0.5_online_0.5'] == {
        **choose_variant.CANDIDATES['eigen_kron_0.1_nesterov_0.5_online_0.5'],
        'adaptive_blend_rate': rate}
  for rate in (0.01, 0.03):
    for power in (0.0, 1.0):
      assert choose_variant.CANDIDATES[f'eigen_kron_{rate}_nesterov_0.5_online_{power}'] == {
          **choose_variant.CANDIDATES[f'eigen_kron_{rate}_nesterov_0.5_online_0.5'],
          'adaptive_online_power': power}
  default = choose_variant.CANDIDATES['eigen_kron_0.1_nesterov_0.5_online_0.5']
  for size in (256, 128, 64):
    assert choose_variant.CANDIDATES[f'eigen_kron_0.1_nesterov_0.5_online_0.5_blocks_{size}'] == {
        **default, 'adaptive_blend_block_size': size}
  assert choose_variant.CANDIDATES['eigen_kron_0.1_nesterov_0.5_online_0.5_max_512'] == {
      **default, 'adaptive_blend_max_dimension': 512}
  assert all(settings['adaptive_online_power'] == (0.0 if 'online_0.0' in name else
                                                   0.5 if 'online_0.5' in name else 1.0)
             for name, settings in choose_variant.CANDIDATES.items())
  assert all(settings['adaptive_eigenbasis'] == name.startswith('eigen') for name, settings
             in choose_variant.CANDIDATES.items())
  assert all(settings['adaptive_overshoot'] == name.endswith('_overshoot_0.5')
             for name, settings in choose_variant.CANDIDATES.items())
  for short, statistics in (('sum', 'sum'), ('peak', 'peak_average')):
    for rate in (0.01, 0.03, 0.1):
      assert choose_variant.CANDIDATES[
          f'eigen_{short}_{rate}_nesterov_0.5_online_0.5_overshoot_0.5'] == {
              **default, 'adaptive_blend_rate': rate, 'adaptive_blend_statistics': statistics,
              'adaptive_overshoot': True}
  assert choose_variant.CANDIDATES[
      'eigen_kron_0.1_nesterov_0.5_online_0.5_blocks_128_overshoot_0.5'] == {
          **default, 'adaptive_blend_block_size': 128, 'adaptive_overshoot': True}
  # The overshoot candidates: the config's own settings, with the check at a decay.
  config = tiny.get_config()
  config.eval.adaptive_blend_rate = 0.03
  config.eval.adaptive_online_power = 0.0
  config.eval.adaptive_overshoot = False
  own = choose_variant.settings_of(config, 'config')
  assert own['adaptive_blend_rate'] == 0.03 and own['adaptive_overshoot'] is False
  for decay in (0.0, 0.5, 0.8):
    assert choose_variant.settings_of(config, f'config_overshoot_{decay}') == {
        **own, 'adaptive_overshoot': True, 'adaptive_overshoot_decay': decay}
  checked = choose_variant.settings_of(config, 'config_overshoot_0.5')
  for rate in (0.03, 0.3):
    assert choose_variant.settings_of(config, f'config_overshoot_0.5_blend_{rate}') == {
        **checked, 'adaptive_blend_rate': rate}
  for power in (0.0, 1.0):
    assert choose_variant.settings_of(config, f'config_overshoot_0.5_online_{power}') == {
        **checked, 'adaptive_online_power': power}
  # The refresh candidates: the config's own settings, with the roots also refreshed on
  # growth.
  assert own['adaptive_refresh_growth'] == config.eval.adaptive_refresh_growth
  for growth in (0.0, 0.1, 0.3, 1.0, math.inf):
    assert choose_variant.settings_of(config, f'config_refresh_{growth}') == {
        **own, 'adaptive_refresh_growth': growth}
  for growth in (0.0, 0.1):
    for rate in (0.03, 0.1, 0.15, 0.2, 0.3):
      assert choose_variant.settings_of(config, f'config_refresh_{growth}_blend_{rate}') == {
          **own, 'adaptive_refresh_growth': growth, 'adaptive_blend_rate': rate}
  # The cap candidates: the config's own settings, the check's factor capped.
  assert own['adaptive_overshoot_cap'] == config.eval.adaptive_overshoot_cap == 3.0
  for cap in (2.0, 3.0, 10.0, 30.0, math.inf):
    assert choose_variant.settings_of(config, f'config_cap_{cap}') == {
        **own, 'adaptive_overshoot_cap': cap}
  # The restart candidates: the config's own settings, the state started afresh after
  # the horizon, twice it, ...; at the config's blend rate or another.
  assert own['adaptive_restarts'] is config.eval.adaptive_restarts
  assert choose_variant.settings_of(config, 'config_restart') == {
      **own, 'adaptive_restarts': True}
  for rate in (0.03, 0.1):
    assert choose_variant.settings_of(config, f'config_restart_blend_{rate}') == {
        **own, 'adaptive_restarts': True, 'adaptive_blend_rate': rate}
  # ... or with each epoch's blend rate grown with its length.
  assert own['adaptive_restart_growth'] == config.eval.adaptive_restart_growth == 0.0
  for growth in (0.25, 0.5):
    assert choose_variant.settings_of(config, f'config_restart_growth_{growth}') == {
        **own, 'adaptive_restarts': True, 'adaptive_restart_growth': growth}
  assert own['adaptive_restart_shrink'] == config.eval.adaptive_restart_shrink == 0.0
  assert own['adaptive_eigenbasis_rank'] == config.eval.adaptive_eigenbasis_rank == 0
  for rank in (0, 16, 32, 64, 128):
    assert choose_variant.settings_of(config, f'config_eigenbasis_rank_{rank}') == {
        **own, 'adaptive_eigenbasis_rank': rank}
  for shrink in (0.0, 0.25, 0.5):
    assert choose_variant.settings_of(config, f'config_restart_shrink_{shrink}') == {
        **own, 'adaptive_restarts': True, 'adaptive_restart_shrink': shrink}
  assert choose_variant.settings_of(config, 'config_restart_growth_0.5_shrink_0.5') == {
      **own, 'adaptive_restarts': True, 'adaptive_restart_growth': 0.5,
      'adaptive_restart_shrink': 0.5}
  # ... or with the epochs longer than the horizon taking their own momentum.
  assert own['adaptive_restart_momentum'] is config.eval.adaptive_restart_momentum is None
  assert own['adaptive_restart_step_factor'] == config.eval.adaptive_restart_step_factor == 0.5
  for momentum, factor in ((0.8, 0.2), (0.9, 0.1), (0.9, 0.2), (0.9, 0.3), (0.95, 0.1)):
    assert choose_variant.settings_of(
        config, f'config_restart_momentum_{momentum}_step_{factor}') == {
            **own, 'adaptive_restarts': True, 'adaptive_restart_momentum': momentum,
            'adaptive_restart_step_factor': factor}
  # ... or with a frequent-directions sketch on the long sides of Shampoo's statistics.
  assert own['adaptive_blend_sketch_rank'] == config.eval.adaptive_blend_sketch_rank == 64
  for rank in (0, 16, 32, 64):
    assert choose_variant.settings_of(config, f'config_sketch_{rank}') == {
        **own, 'adaptive_blend_sketch_rank': rank}
  # ... or merging a gradient into the sketch at every step, every few steps or at the
  # roots' refreshes (the default).
  assert own['adaptive_blend_sketch_interval'] == config.eval.adaptive_blend_sketch_interval == 0
  for interval in (0, 1, 2, 4):
    assert choose_variant.settings_of(config, f'config_sketch_interval_{interval}') == {
        **own, 'adaptive_blend_sketch_interval': interval}
  # ... or with the blend rate alone changed (0: no online half).
  for rate in (0, 0.03, 0.05, 0.07):
    assert choose_variant.settings_of(config, f'config_blend_{rate}') == {
        **own, 'adaptive_blend_rate': rate}
  # ... or starting a leaf's eigenbasis scales below 1 after a small first gradient (the
  # default: 0.3 and 0.1).
  assert (own['adaptive_lengthen_below'], own['adaptive_min_scale']) == (0.3, 0.1)
  for below in (0.1, 0.3):
    for floor in (0.01, 0.1):
      assert choose_variant.settings_of(config, f'config_lengthen_{below}_min_{floor}') == {
          **own, 'adaptive_lengthen_below': below, 'adaptive_min_scale': floor}
  # ... or behind frozen MetaMD with the guard (off in the default).
  assert (own['adaptive_guard_margin'], own['adaptive_guard_steps'],
          own['adaptive_guard_progress'], own['adaptive_guard_prior']) == (None, None, None,
                                                                          False)
  for margin in (2, 3):
    for steps in (15, 20, 30, None):
      assert choose_variant.settings_of(config, f'config_guard_{margin}_steps_{steps}') == {
          **own, 'adaptive_guard_margin': float(margin), 'adaptive_guard_steps': steps}
  # ... at margin 2, switching on progress past a step count.
  for steps in (15, 20):
    for progress in (0.01, 0.02):
      assert choose_variant.settings_of(
          config, f'config_guard_2_steps_{steps}_progress_{progress}') == {
              **own, 'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': steps,
              'adaptive_guard_progress': progress}
  # ... at margin 2, switching at 20, to a fallback without the online half (and without
  # the longer first steps).
  assert choose_variant.settings_of(config, 'config_guard_2_steps_20_blend_0') == {
      **own, 'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': 20,
      'adaptive_blend_rate': 0.0}
  assert choose_variant.settings_of(config, 'config_guard_2_steps_20_blend_0_lengthen_off') == {
      **own, 'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': 20,
      'adaptive_blend_rate': 0.0, 'adaptive_lengthen_below': None}
  # ... with the fallback's Shampoo statistics started from the frozen steps' mass.
  assert choose_variant.settings_of(config, 'config_guard_2_steps_20_prior') == {
      **own, 'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': 20,
      'adaptive_guard_prior': True}
  assert choose_variant.settings_of(config, 'config_guard_2_steps_20_prior_lengthen_off') == {
      **own, 'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': 20,
      'adaptive_guard_prior': True, 'adaptive_lengthen_below': None}
  # Ties: the config first, the overshoot candidates after every other one.
  assert choose_variant.check_candidates(
      ['config_overshoot_0.5', 'eigen', 'config', 'config_overshoot_0.0']) == (
          'config', 'eigen', 'config_overshoot_0.0', 'config_overshoot_0.5')
  with pytest.raises(ValueError, match="unknown candidate 'config_overshoot_0.9'"):
    choose_variant.check_candidates(['config_overshoot_0.9'])
  with pytest.raises(ValueError, match="unknown candidate 'blended_2'"):
    choose_variant.check_candidates(['adaptive', 'blended_2'])
  with pytest.raises(ValueError, match='twice'):
    choose_variant.check_candidates(['adaptive', 'adaptive'])
  with pytest.raises(ValueError, match='empty'):
    choose_variant.check_candidates([])


def test_config_set_candidates_are_the_configs_settings_with_the_named_fields(
    tmp_path, monkeypatch):
  config = tiny.get_config()
  config.eval.adaptive_momentum = 0.5
  own = choose_variant.settings_of(config, 'config')
  name = 'config:adaptive_momentum=0.7:adaptive_lengthen_below=None:adaptive_refresh_growth=inf'
  assert choose_variant.settings_of(config, name) == {
      **own, 'adaptive_momentum': 0.7, 'adaptive_lengthen_below': None,
      'adaptive_refresh_growth': math.inf}
  # The same settings as a named candidate give the same candidate.
  assert choose_variant.settings_of(
      config, 'config:adaptive_overshoot=True:adaptive_overshoot_decay=0.8') == \
      choose_variant.settings_of(config, 'config_overshoot_0.8')
  # After the named candidates in ties, in the order given.
  assert choose_variant.check_candidates(
      ['config:adaptive_momentum=0.9', 'config_overshoot_0.8', 'config:adaptive_momentum=0.3',
       'config']) == ('config', 'config_overshoot_0.8', 'config:adaptive_momentum=0.9',
                      'config:adaptive_momentum=0.3')
  for bad, match in (('config:', 'sets nothing'),
                     ('config:adaptive_momentum', 'is not <field>=<value>'),
                     ('config:=0.7', 'is not <field>=<value>'),
                     ('config:momentum=0.7', "unknown field 'momentum'"),
                     ('config:adaptive_momentum=0.7:adaptive_momentum=0.9', 'twice'),
                     ('config:adaptive_momentum=fast', 'not a Python literal')):
    with pytest.raises(ValueError, match=match):
      choose_variant.check_candidates([bad])
  variant = choose_variant.variant_config(config, 'config:adaptive_momentum=0.7')
  assert variant.eval.adaptive_momentum == 0.7 and config.eval.adaptive_momentum == 0.5
  with pytest.raises(ValueError, match=r"candidate 'config:adaptive_momentum=1.5'.*"
                                       r'adaptive_momentum must be a number in \[0, 1\)'):
    choose_variant.variant_config(config, 'config:adaptive_momentum=1.5')
  with pytest.raises(ValueError, match=r"config:adaptive_momentum='x'.*cannot be cast"):
    choose_variant.variant_config(config, "config:adaptive_momentum='x'")
  # compare builds each candidate's optimiser from its own settings, and checks them all
  # before it runs anything.
  family, _ = builders.build_families(config)
  divergence = builders.build_divergence(config, family)
  with pytest.raises(ValueError, match="candidate 'config:adaptive_blend_rate=-1'"):
    choose_variant.compare(config, tmp_path, divergence,
                           ['config', 'config:adaptive_blend_rate=-1'])
  built = {}

  def record(variant, divergence, calibration):
    built[variant.eval.adaptive_momentum] = variant.eval.adaptive_blend_rate
    return None

  monkeypatch.setattr(protocol, 'tune_baselines', lambda *a, **k: ({'adam': 1e-3}, None))
  monkeypatch.setattr(evaluate, 'calibrate', lambda *a, **k: {'reference_norm': 1.0})
  monkeypatch.setattr(evaluate, 'adaptive_optimizer', record)
  with pytest.raises(ValueError, match='calibration failed for every candidate'):
    choose_variant.compare(config, tmp_path, divergence,
                           ['config', 'config:adaptive_momentum=0.7:adaptive_blend_rate=0.02'])
  assert built == {0.5: config.eval.adaptive_blend_rate, 0.7: 0.02}


def _one_ms_per_step(monkeypatch):
  """A clock of 1 ms per step for benchmark_runs.time_runs; returns the calls it saw."""
  timed = []

  def fake_time_runs(optimizer, family, task_params, num_steps, repeats):
    count = jax.tree.leaves(task_params)[0].shape[0]
    timed.append((num_steps, count, repeats))
    return np.full(count, 1e-3 * num_steps)

  monkeypatch.setattr(benchmark_runs, 'time_runs', fake_time_runs)
  return timed


def test_seconds_check_is_one_more_check_won_when_faster_in_time():
  checks = {'x': _check(10, {'a': (0, 5, 1.0, 0.5), 'b': (0, 5, 1.0, 0.4)})}
  seconds = {'optimizers': {'a': {'faster': True}, 'b': {'faster': False}}}
  scores = {n: choose_variant.score(checks, n, 'adam', seconds) for n in 'ab'}
  assert scores['a']['faster'] == ['x', choose_variant.SECONDS]
  assert scores['b']['faster'] == ['x']
  assert scores['a']['num_checks'] == scores['b']['num_checks'] == 2
  # The loss ratios are the steps checks' alone: b ends lower, a wins the time check.
  np.testing.assert_allclose([scores[n]['loss_ratio_geometric_mean'] for n in 'ab'],
                             [0.5, 0.4])
  assert choose_variant.choose(scores) == 'a'
  # Without the time check the lower loss decides.
  assert choose_variant.choose({n: choose_variant.score(checks, n, 'adam')
                                for n in 'ab'}) == 'b'


def _timed(seconds_by_name):
  """A check in seconds: ``{name: (mean seconds or None, reached fraction, faster)}``."""
  return {'optimizers': {
      name: {'elapsed_seconds_to_reference_final_loss': [mean, 0.0],
             'reached_fraction': reached, 'faster': faster}
      for name, (mean, reached, faster) in seconds_by_name.items()}}


def test_among_tied_candidates_one_many_times_slower_drops_out_before_the_loss():
  """The rule's third step: tied on failed runs and checks won, a candidate more than
  TIME_FACTOR times slower than the fastest one is not chosen for its lower loss, whether
  or not either wins the check in time; within the factor the loss decides as before."""
  checks = {'x': _check(10, {'a': (0, 5, 1.0, 0.5), 'b': (0, 5, 1.0, 0.4),
                             'c': (0, 5, 1.0, 0.3)})}
  assert choose_variant.TIME_FACTOR == 2.0

  def chosen(times, names='abc'):
    timed = _timed(times)
    return choose_variant.choose({n: choose_variant.score(checks, n, 'adam', timed)
                                  for n in names})

  # Both lose the check in time; b, with the lower loss, takes 25 times a's time.
  assert chosen({'a': (1.0, 1.0, False), 'b': (25.0, 1.0, False)}, 'ab') == 'a'
  slow = _timed({'a': (1.0, 1.0, False), 'b': (25.0, 1.0, False)})
  rows = {n: choose_variant.score(checks, n, 'adam', slow) for n in 'ab'}
  assert choose_variant.dropped_by_time(rows) == ['b']
  assert choose_variant.dropped_by_time({n: choose_variant.score(checks, n, 'adam')
                                         for n in 'ab'}) == []
  # Within twice the fastest one's time the loss decides (1.9 and 2.0 times: kept).
  assert chosen({'a': (1.0, 1.0, False), 'b': (1.9, 1.0, False)}, 'ab') == 'b'
  assert chosen({'a': (1.0, 1.0, False), 'b': (2.0, 1.0, False)}, 'ab') == 'b'
  assert chosen({'a': (1.0, 1.0, False), 'b': (2.1, 1.0, False)}, 'ab') == 'a'
  # The factor is to the fastest of the tied candidates: c (lowest loss) is out, b is in.
  assert chosen({'a': (1.0, 1.0, True), 'b': (1.5, 1.0, True), 'c': (3.0, 1.0, True)}) == 'b'
  # A candidate that does not reach the loss on every task has no time: it drops out.
  row = choose_variant.score(checks, 'c', 'adam', _timed({'c': (0.5, 0.9, False)}))
  assert math.isinf(row['seconds_to_reference_loss'])
  assert chosen({'a': (1.0, 1.0, False), 'c': (0.5, 0.9, False)}, 'ac') == 'a'
  # Fewer checks won still loses, however fast.
  slow_wins = _timed({'a': (10.0, 1.0, True), 'b': (1.0, 1.0, False)})
  assert choose_variant.choose({n: choose_variant.score(checks, n, 'adam', slow_wins)
                                for n in 'ab'}) == 'a'
  # Rows without times (no check in seconds, or stored before it) keep the loss order.
  assert choose_variant.choose({n: choose_variant.score(checks, n, 'adam')
                                for n in 'abc'}) == 'c'


def test_seconds_check_times_runs_stopped_at_the_reference_loss(monkeypatch):
  """With a clock of 1 ms per step the elapsed seconds are the steps to the reference's
  final loss, against the reference's T steps; a task that never reaches it loses."""
  timed = _one_ms_per_step(monkeypatch)
  steps = 10
  losses = {'ref': [[3.0, 2.0, 1.0], [3.0, 2.5, 2.0]],  # final losses 1 and 2, every 5
            'quick': [[3.0, 0.5, 0.5], [3.0, 1.0, 1.0]],  # 5 steps on both tasks
            'slow': [[3.0, 3.0, 1.0], [3.0, 2.5, 2.5]]}  # 10 steps, then never
  curves = {name: evaluation.Curves(losses=np.zeros((2, steps)),
                                    train_losses=np.asarray(v), every=5, metrics={})
            for name, v in losses.items()}
  tasks = {'seed': np.arange(2)}
  optimizers = {name: optax.sgd(0.1) for name in curves}
  result = choose_variant.seconds_check(optimizers, 'ref', None, tasks, curves, steps,
                                        repeats=2)
  assert result['reference_seconds_for_T_steps'] == pytest.approx(1e-3 * steps)
  assert set(result['optimizers']) == {'quick', 'slow'}
  quick, slow = result['optimizers']['quick'], result['optimizers']['slow']
  assert quick['elapsed_seconds_per_task'] == pytest.approx([5e-3, 5e-3])
  assert quick['elapsed_fraction_of_reference_T_seconds'] == pytest.approx(0.5)
  assert quick['faster'] and quick['reached_fraction'] == 1.0
  assert slow['elapsed_seconds_per_task'][0] == pytest.approx(1e-2)
  assert slow['elapsed_seconds_per_task'][1] is None
  assert slow['reached_fraction'] == 0.5 and not slow['faster']
  # Its one task that reaches the loss takes the reference's time; it loses all the same.
  assert slow['elapsed_fraction_of_reference_T_seconds'] == pytest.approx(1.0)
  # The reference's T steps over both tasks, then one task per stopped run.
  assert timed[0] == (steps, 2, 2)
  assert sorted(timed[1:]) == [(5, 1, 2), (5, 1, 2), (10, 1, 2)]
  table = '\n'.join(choose_variant.seconds_lines(result))
  assert '| quick | 0.0050 ± 0.0000 | 0.5 | yes |' in table
  assert '(50% reached) | 1 | no |' in table
  # Against a share of the reference's time (eval.seconds_check_fraction): half of it is
  # not beaten by a run that takes half, 0.6 of it is.
  for fraction, won in ((0.5, False), (0.6, True)):
    result = choose_variant.seconds_check(optimizers, 'ref', None, tasks, curves, steps,
                                          repeats=2, fraction=fraction)
    assert result['fraction'] == fraction
    assert result['optimizers']['quick']['faster'] == won
    assert not result['optimizers']['slow']['faster']
    assert f'against {fraction:g} of its own' in result['description']


def test_compare_with_the_seconds_check(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.eval.shifts = ()
  config.eval.seconds_check = True
  config.eval.accuracy_check = False
  family, _ = builders.build_families(config)
  divergence = builders.build_divergence(config, family)  # SGD at init_learning_rate
  monkeypatch.setattr(choose_variant, 'CANDIDATES',
                      {'adaptive': choose_variant.CANDIDATES['adaptive']})
  _one_ms_per_step(monkeypatch)
  result = choose_variant.compare(config, tmp_path, divergence)
  timed = result[choose_variant.SECONDS]
  assert set(timed['optimizers']) == {'metamd', 'adaptive'}
  # 1 ms per step: the time check is won exactly when the steps check in distribution is.
  in_distribution = result['checks']['in_distribution']['optimizers']
  for name, row in timed['optimizers'].items():
    steps = in_distribution[name]['steps_to_adam_retuned_final_loss'][0]
    reached = in_distribution[name]['reached_fraction']
    assert row['reached_fraction'] == reached
    if reached == 1.0:
      assert row['elapsed_seconds_to_reference_final_loss'][0] == pytest.approx(1e-3 * steps)
    # Won below the config's share of the reference's time (the default's third).
    assert config.eval.seconds_check_fraction == pytest.approx(1 / 3)
    assert row['faster'] == (reached == 1.0 and steps < config.eval.seconds_check_fraction
                             * config.eval.num_steps)
  row = result['scores']['adaptive']
  assert row == choose_variant.score(result['checks'], 'adaptive', 'adam', timed)
  assert row['num_checks'] == 2
  assert (choose_variant.SECONDS in row['faster']) == timed['optimizers']['adaptive']['faster']
  assert f'Check {choose_variant.SECONDS}' in choose_variant.format_choice(result)
  assert "step on time" not in choose_variant.format_choice(result)  # one candidate
  # A second candidate tied with it, 3 times slower, is named as dropped by time.
  fast = {**row, 'seconds_to_reference_loss': 1.0}
  slow = {**row, 'seconds_to_reference_loss': 3.0}
  two = {**result, 'scores': {'adaptive': fast, 'slow': slow}}
  assert "step on time" in choose_variant.format_choice(two)
  assert 'loss): slow.' in choose_variant.format_choice(two)


def test_seconds_check_must_be_a_boolean(tmp_path):
  config = tiny.get_config()
  config.eval.seconds_check = None  # the ConfigDict refuses a non-boolean itself
  with pytest.raises(ValueError, match='eval.seconds_check must be True or False'):
    builders.validate_config(config)


def test_runs_that_end_above_their_start_count_with_diverged_ones():
  """The rule's first step: runs that diverged or ended above their initial loss, where the
  reference trains; a candidate that blows up to a finite loss loses to a slower one."""
  checks = {'x': _check(10, {'a': (0, 5, 1.0, 0.5), 'b': (0, 8, 1.0, 0.6)}),
            'y': _check(10, {'a': (0, 5, 1.0, 0.5), 'b': (0, 8, 1.0, 0.6)}),
            'z': _check(10, {'a': (0, 5, 1.0, 0.5), 'b': (0, 8, 1.0, 0.6)}, adam_diverged=1)}
  checks['x']['optimizers']['a']['above_initial_loss'] = 2
  checks['z']['optimizers']['a']['above_initial_loss'] = 3  # Adam diverged there: not counted
  scores = {n: choose_variant.score(checks, n, 'adam') for n in 'ab'}
  assert (scores['a']['diverged_runs'], scores['a']['above_initial_runs'],
          scores['a']['failed_runs']) == (0, 2, 2)
  assert scores['b']['failed_runs'] == 0
  assert scores['a']['num_faster'] == scores['b']['num_faster'] == 3  # both faster in all
  assert choose_variant.choose(scores) == 'b'
  # Without the count, a's lower loss would win; a row written before the count was kept
  # is read by its diverged runs.
  old = {n: {k: v for k, v in scores[n].items() if k not in ('above_initial_runs',
                                                            'failed_runs')} for n in 'ab'}
  assert choose_variant.choose(old) == 'a'


def _with_accuracy(check, accuracies):
  """``check`` with mean test accuracies ``{name: accuracy}`` (the re-tuned reference's
  under ``'adam_retuned'``)."""
  for name, accuracy in accuracies.items():
    check['optimizers'][name]['test_accuracy'] = [accuracy, 0.0]
  return check


def test_accuracy_check_is_one_more_check_won_at_the_references_accuracy_or_above():
  checks = {'in_distribution': _with_accuracy(
      _check(10, {'a': (0, 5, 1.0, 0.5), 'b': (0, 5, 1.0, 0.4), 'c': (1, 5, 1.0, 0.3)}),
      {'adam_retuned': 0.9, 'a': 0.9, 'b': 0.89, 'c': 0.95})}
  scores = {n: choose_variant.score(checks, n, 'adam', accuracy=True) for n in 'abc'}
  # a ties the reference's accuracy (won); b is below it; c diverged on a task.
  assert scores['a']['faster'] == ['in_distribution', choose_variant.ACCURACY]
  assert scores['b']['faster'] == ['in_distribution']
  assert choose_variant.ACCURACY not in scores['c']['faster']
  assert all(scores[n]['num_checks'] == 2 for n in 'abc')
  # The loss ratios are the steps checks' alone: b ends lower, a wins on accuracy.
  np.testing.assert_allclose([scores[n]['loss_ratio_geometric_mean'] for n in 'ab'],
                             [0.5, 0.4])
  assert choose_variant.choose({n: scores[n] for n in 'ab'}) == 'a'
  # Without the accuracy check the lower loss decides.
  assert choose_variant.choose({n: choose_variant.score(checks, n, 'adam')
                                for n in 'ab'}) == 'b'
  # A family without accuracy (a regression, a language model) has no such check.
  plain = {'in_distribution': _check(10, {'a': (0, 5, 1.0, 0.5)})}
  assert not choose_variant.has_accuracy(plain)
  row = choose_variant.score(plain, 'a', 'adam', accuracy=True)
  assert row['num_checks'] == 1 and row['faster'] == ['in_distribution']


def test_compare_with_the_accuracy_check(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.eval.shifts = ()
  config.eval.seconds_check = False
  config.eval.num_validation_tasks = 3  # not eval.num_tasks (2, the held-out tasks)
  assert config.eval.accuracy_check  # the default's
  family, _ = builders.build_families(config)
  divergence = builders.build_divergence(config, family)  # SGD at init_learning_rate
  monkeypatch.setattr(choose_variant, 'CANDIDATES',
                      {'adaptive': choose_variant.CANDIDATES['adaptive']})
  monkeypatch.setattr(evaluation, 'held_out_tasks',
                      lambda *a, **k: pytest.fail('held-out tasks used'))
  result = choose_variant.compare(config, tmp_path, divergence)
  assert result['num_tasks'] == 3
  for entry in result['checks']['in_distribution']['optimizers'].values():
    assert entry['num_runs'] == 3
  assert result['accuracy_check']
  row = result['scores']['adaptive']
  assert row == choose_variant.score(result['checks'], 'adaptive', 'adam', accuracy=True)
  assert row['num_checks'] == 2
  # Recomputed from the validation runs themselves: the mean test accuracy of the
  # candidate against Adam's at its tuned rate (in distribution the re-tuned rate is it).
  tasks = evaluation.tuning_tasks(family, config.seed, 3)
  entries = result['checks']['in_distribution']['optimizers']
  adam = evaluation.run(optax.adam(result['reference_learning_rate']), family, tasks,
                        config.eval.num_steps, track_every=1)
  np.testing.assert_allclose(entries['adam_retuned']['test_accuracy'][0],
                             np.mean(adam.metrics['test_accuracy']), rtol=1e-5)
  won = (entries['adaptive']['diverged'] == 0 and entries['adaptive']['test_accuracy'][0]
         >= np.mean(adam.metrics['test_accuracy']))
  assert (choose_variant.ACCURACY in row['faster']) == won
  table = choose_variant.format_choice(result)
  assert f'{choose_variant.ACCURACY}: test accuracy at least its' in table
  assert '2 checks; chosen' in table


def test_num_validation_tasks_defaults_to_num_tasks_and_is_checked():
  config = tiny.get_config()
  assert default_config.get_config().eval.num_validation_tasks == 10
  assert builders.num_validation_tasks(config.eval) == 2
  config.eval.num_validation_tasks = 0  # 0: eval.num_tasks
  config.eval.num_tasks = 4
  assert builders.num_validation_tasks(config.eval) == 4
  builders.validate_config(config)
  config.eval.num_validation_tasks = -1
  with pytest.raises(ValueError, match='eval.num_validation_tasks must be an integer >= 0'):
    builders.validate_config(config)


@pytest.mark.parametrize('fraction', [0.0, -0.1, 1.5, float('nan')])
def test_seconds_check_fraction_must_be_in_zero_one(fraction):
  config = tiny.get_config()
  config.eval.seconds_check_fraction = fraction
  with pytest.raises(ValueError, match=r'eval.seconds_check_fraction must be a number in'):
    builders.validate_config(config)


def test_accuracy_check_must_be_a_boolean():
  config = tiny.get_config()
  config.eval.accuracy_check = None
  with pytest.raises(ValueError, match='eval.accuracy_check must be True or False'):
    builders.validate_config(config)
