"""The benchmark's targets (experiments/benchmark_targets.py): declared in the config as
data, checked on a family's results."""

import ml_collections
import pytest

from configs import benchmark as benchmark_config
from experiments import benchmark_setup, benchmark_targets, plots, report


def _targets(**fields):
  targets = benchmark_config.get_config().families.least_squares.targets
  targets.fewer_steps_than_every_baseline = False
  for name, value in fields.items():
    targets[name] = value
  return targets


def _result(metamd_steps=10.0, reached=1.0, metamd_accuracy=0.9, adam_accuracy=0.88,
            metamd_sgd_steps=5.0):
  """A family's results, as experiments.benchmark writes them (T = 100, reference adam)."""
  def row(steps, seconds, baseline_steps, fraction):
    return {'steps': [steps, 1.0], 'seconds': [seconds, 0.0], 'reached_fraction': fraction,
            'baseline_steps': [baseline_steps, 2.0]}

  return {
      'horizon': 100, 'reference': 'adam',
      'optimizers': {
          'metamd': {'test_accuracy': [metamd_accuracy, 0.01]},
          'adam': {'test_accuracy': [adam_accuracy, 0.01], 'wall_clock_seconds': [0.3, 0.01]},
          'sgd': {'test_accuracy': [0.8, 0.01], 'wall_clock_seconds': [0.2, 0.01]},
      },
      'learned_vs_baselines': {'metamd': {
          'sgd': row(metamd_sgd_steps, 0.01, 90.0, 1.0),
          'adam': row(metamd_steps, 0.05, 80.0, reached),
      }},
  }


def test_the_config_declares_the_issue_targets():
  config = benchmark_config.get_config()
  mnist = config.families.mnist_mlp.targets
  assert (mnist.steps_at_most_T_over, mnist.seconds_at_most_reference_over) == (8, 3)
  assert mnist.test_accuracy_at_least_reference and not mnist.fewer_steps_than_every_baseline
  for name in ('mnist1d_cnn', 'digits_mlp', 'least_squares'):
    assert config.families[name].targets.fewer_steps_than_every_baseline
  # Digits: T/4 and test accuracy no lower than Adam's, as well.
  digits = config.families.digits_mlp.targets
  assert digits.steps_at_most_T_over == 4 and digits.test_accuracy_at_least_reference
  for name in ('mnist1d_cnn', 'least_squares'):
    assert not config.families[name].targets.steps_at_most_T_over
  # The robustness target on the image families (the shifts change images).
  for name in ('mnist_mlp', 'mnist1d_cnn', 'digits_mlp'):
    assert config.families[name].targets.robust_no_divergence_and_faster_fraction == 0.8
  assert config.families.least_squares.targets.robust_no_divergence_and_faster_fraction == 0


def test_met_targets():
  targets = _targets(steps_at_most_T_over=8.0, seconds_at_most_reference_over=3.0,
                     test_accuracy_at_least_reference=True, fewer_steps_than_every_baseline=True)
  checked = benchmark_targets.evaluate_targets(targets, _result())
  assert checked == {
      'steps_to_adam_at_most_T_over_8': {'value': 10.0, 'limit': 12.5, 'met': True},
      'seconds_at_most_adam_seconds_over_3': {'value': 0.05, 'limit': 0.3 / 3, 'met': True},
      'test_accuracy_at_least_adam': {'value': 0.9, 'limit': 0.88, 'met': True},
      'fewer_steps_than_sgd': {'value': 5.0, 'limit': 90.0, 'met': True},
      'fewer_steps_than_adam': {'value': 10.0, 'limit': 80.0, 'met': True},
  }


def test_the_seconds_target_takes_the_elapsed_seconds():
  """Where the results time runs stopped at the reference's loss, the wall-clock target
  takes those seconds rather than the steps times the mean step."""
  targets = _targets(seconds_at_most_reference_over=3.0)
  result = _result()  # the estimate: 0.05 s, under 0.3 / 3
  result['optimizers']['metamd']['elapsed_seconds_to_adam_final_loss'] = [0.12, 0.01]
  checked = benchmark_targets.evaluate_targets(targets, result)
  assert checked['seconds_at_most_adam_seconds_over_3'] == {'value': 0.12, 'limit': 0.3 / 3,
                                                            'met': False}
  result['optimizers']['metamd']['elapsed_seconds_to_adam_final_loss'] = [0.08, 0.01]
  assert benchmark_targets.evaluate_targets(targets, result)[
      'seconds_at_most_adam_seconds_over_3'] == {'value': 0.08, 'limit': 0.3 / 3, 'met': True}


@pytest.mark.parametrize('name', ['metamd_adaptive', 'metamd_low_rank'])
def test_adaptive_and_low_rank_metamd_are_checked_alike_on_their_own_figures(name):
  """Where the benchmark ran adaptive (or low-rank) MetaMD, every declared target is checked
  on its own steps, elapsed seconds, accuracy and baselines, under keys prefixed with its
  name."""
  targets = _targets(steps_at_most_T_over=8.0, seconds_at_most_reference_over=3.0,
                     test_accuracy_at_least_reference=True, fewer_steps_than_every_baseline=True)
  result = _result()
  result['optimizers'][name] = {
      'test_accuracy': [0.87, 0.01], 'elapsed_seconds_to_adam_final_loss': [0.2, 0.01]}
  result['learned_vs_baselines'][name] = {
      'adam': {'steps': [20.0, 1.0], 'seconds': [0.06, 0.0], 'reached_fraction': 1.0,
               'baseline_steps': [80.0, 2.0]},
      'sgd': {'steps': [95.0, 1.0], 'seconds': [0.1, 0.0], 'reached_fraction': 1.0,
              'baseline_steps': [90.0, 2.0]}}
  checked = benchmark_targets.evaluate_targets(targets, result)
  assert {key: value for key, value in checked.items()
          if key.startswith(f'{name}_')} == {
      f'{name}_steps_to_adam_at_most_T_over_8': {'value': 20.0, 'limit': 12.5, 'met': False},
      f'{name}_seconds_at_most_adam_seconds_over_3': {'value': 0.2, 'limit': 0.3 / 3,
                                                      'met': False},
      f'{name}_test_accuracy_at_least_adam': {'value': 0.87, 'limit': 0.88, 'met': False},
      f'{name}_fewer_steps_than_adam': {'value': 20.0, 'limit': 80.0, 'met': True},
      f'{name}_fewer_steps_than_sgd': {'value': 95.0, 'limit': 90.0, 'met': False},
  }
  # MetaMD's own keys are unchanged (its figures, not this row's).
  assert checked['steps_to_adam_at_most_T_over_8'] == {'value': 10.0, 'limit': 12.5,
                                                       'met': True}
  # Without its row in learned_vs_baselines (calibration failed): no key of its own.
  del result['learned_vs_baselines'][name]
  assert not any(key.startswith(f'{name}_')
                 for key in benchmark_targets.evaluate_targets(targets, result))


def test_missed_targets():
  targets = _targets(steps_at_most_T_over=8.0, test_accuracy_at_least_reference=True,
                     fewer_steps_than_every_baseline=True)
  # Too many steps and a lower accuracy.
  checked = benchmark_targets.evaluate_targets(
      targets, _result(metamd_steps=20.0, metamd_accuracy=0.8, metamd_sgd_steps=95.0))
  assert checked['steps_to_adam_at_most_T_over_8'] == {'value': 20.0, 'limit': 12.5,
                                                       'met': False}
  assert not checked['test_accuracy_at_least_adam']['met']
  assert not checked['fewer_steps_than_sgd']['met']
  assert checked['fewer_steps_than_adam']['met']
  # Few enough steps on average, but not every task reached the reference's loss.
  checked = benchmark_targets.evaluate_targets(targets, _result(reached=0.6))
  assert not checked['steps_to_adam_at_most_T_over_8']['met']
  assert not checked['fewer_steps_than_adam']['met']
  # No task reached it: no value.
  result = _result()
  result['learned_vs_baselines']['metamd']['adam']['steps'] = [None, None]
  result['learned_vs_baselines']['metamd']['adam']['reached_fraction'] = 0.0
  checked = benchmark_targets.evaluate_targets(targets, result)
  assert checked['steps_to_adam_at_most_T_over_8'] == {'value': None, 'limit': 12.5,
                                                       'met': False}


def test_only_declared_targets_are_checked():
  assert benchmark_targets.evaluate_targets(_targets(), _result()) == {}
  assert benchmark_targets.evaluate_targets(None, _result()) == {}
  checked = benchmark_targets.evaluate_targets(_targets(steps_at_most_T_over=4.0), _result())
  assert checked == {'steps_to_adam_at_most_T_over_4': {'value': 10.0, 'limit': 25.0,
                                                        'met': True}}
  # A reference that diverged at every learning rate has no row: the target is missed.
  result = _result()
  del result['learned_vs_baselines']['metamd']['adam'], result['optimizers']['adam']
  checked = benchmark_targets.evaluate_targets(
      _targets(steps_at_most_T_over=8.0, seconds_at_most_reference_over=3.0), result)
  assert checked['seconds_at_most_adam_seconds_over_3'] == {'value': None, 'limit': None,
                                                            'met': False}
  assert not checked['steps_to_adam_at_most_T_over_8']['met']


def _check(reference_steps, **entries):
  """One robustness check: ``name=(diverged, steps, reached_fraction)`` per optimiser.

  ``reference_steps=None``: the re-tuning diverged at every rate (no reference, no steps).
  """
  key = 'steps_to_adam_retuned_final_loss'

  def entry(diverged, steps, reached):
    out = {'learning_rate': None, 'diverged': diverged, 'above_initial_loss': 0,
           'num_runs': 5, 'final_train_loss': [0.1, 0.01], 'test_accuracy': [0.9, 0.01]}
    if reference_steps is not None:
      out[key], out['reached_fraction'] = [steps, 1.0], reached
    return out

  optimizers = {name: entry(*value) for name, value in entries.items()}
  if reference_steps is not None:
    optimizers['adam_retuned'] = entry(0, reference_steps, 1.0)
  return {'description': '', 'reference': 'adam_retuned', 'num_steps': 100, 'seconds': 1.0,
          'adam_retuned_learning_rate': 0.01 if reference_steps is not None else None,
          'optimizers': optimizers}


def _robustness():
  """Five checks; per check (diverged runs, mean steps, fraction of tasks that reached)."""
  return {
      # Adam trains; metamd faster on every task.
      'inputs_x2': _check(20.0, metamd=(0, 10.0, 1.0), metamd_adaptive=(0, 12.0, 1.0),
                          adam=(0, 20.0, 1.0)),
      # Adam diverges (metamd's divergences here do not count); metamd fewer steps on
      # average but not every task reached the loss.
      'batch_quarter': _check(20.0, metamd=(3, 5.0, 0.6), metamd_adaptive=(0, 15.0, 1.0),
                              adam=(2, 25.0, 0.6)),
      # Adam trains; metamd diverges once and is slower.
      'label_noise': _check(20.0, metamd=(1, 30.0, 1.0), metamd_adaptive=(0, 19.0, 1.0),
                            adam=(0, 20.0, 1.0)),
      # The long horizon: metamd faster; adaptive as fast as the reference (not fewer).
      '10T': _check(200.0, metamd=(0, 100.0, 1.0), metamd_adaptive=(0, 200.0, 1.0),
                    adam=(0, 300.0, 1.0)),
      # Re-tuned Adam diverged at every rate: no reference loss, nobody faster.
      'heldout_dataset': _check(None, metamd=(0, None, 0.0), metamd_adaptive=(0, None, 0.0),
                                adam=(0, None, 0.0)),
  }


def test_robustness_summary_counts():
  summary = benchmark_targets.robustness_summary(_robustness(), ['metamd', 'metamd_adaptive'],
                                                 'adam')
  checks = ['inputs_x2', 'batch_quarter', 'label_noise', '10T', 'heldout_dataset']
  trained = ['inputs_x2', 'label_noise', '10T', 'heldout_dataset']
  assert summary['metamd'] == {
      'baseline': 'adam', 'reference': 'adam_retuned', 'checks': checks,
      'baseline_trained': trained, 'diverged_runs': 1, 'diverged_in': ['label_noise'],
      'faster': ['inputs_x2', '10T'], 'faster_fraction': 2 / 5}
  assert summary['metamd_adaptive'] == {
      'baseline': 'adam', 'reference': 'adam_retuned', 'checks': checks,
      'baseline_trained': trained, 'diverged_runs': 0, 'diverged_in': [],
      'faster': ['inputs_x2', 'batch_quarter', 'label_noise'], 'faster_fraction': 3 / 5}
  # No checks: no fraction.
  assert benchmark_targets.robustness_summary({}, ['metamd'], 'adam')['metamd'][
      'faster_fraction'] is None


def _robust_result(robustness):
  result = _result()
  result['robustness'] = robustness
  result['robustness_summary'] = benchmark_targets.robustness_summary(
      robustness, ['metamd', 'metamd_adaptive'], 'adam')
  return result


def test_robustness_target_met_and_missed():
  targets = _targets(robust_no_divergence_and_faster_fraction=0.6)
  checked = benchmark_targets.evaluate_targets(targets, _robust_result(_robustness()))
  assert checked == {
      'no_diverged_runs_where_adam_trains': {'value': 1, 'limit': 0, 'met': False},
      'faster_than_adam_retuned_in_0.6_of_checks': {'value': 0.4, 'limit': 0.6, 'met': False},
      'metamd_adaptive_no_diverged_runs_where_adam_trains': {'value': 0, 'limit': 0,
                                                             'met': True},
      'metamd_adaptive_faster_than_adam_retuned_in_0.6_of_checks': {'value': 0.6,
                                                                    'limit': 0.6, 'met': True},
  }
  # Without the divergence where Adam trains and faster in 4 of 5 checks: both met at 0.8.
  robustness = _robustness()
  robustness['label_noise']['optimizers']['metamd'].update(
      diverged=0, steps_to_adam_retuned_final_loss=[15.0, 1.0])
  robustness['batch_quarter']['optimizers']['metamd']['reached_fraction'] = 1.0
  checked = benchmark_targets.evaluate_targets(
      _targets(robust_no_divergence_and_faster_fraction=0.8), _robust_result(robustness))
  assert checked['no_diverged_runs_where_adam_trains'] == {'value': 0, 'limit': 0, 'met': True}
  assert checked['faster_than_adam_retuned_in_0.8_of_checks'] == {'value': 0.8, 'limit': 0.8,
                                                                   'met': True}
  # Declared but no robustness checks ran: nothing to show, not met.
  checked = benchmark_targets.evaluate_targets(
      _targets(robust_no_divergence_and_faster_fraction=0.8), _result())
  assert checked == {
      'no_diverged_runs_where_adam_trains': {'value': None, 'limit': 0, 'met': False},
      'faster_than_adam_retuned_in_0.8_of_checks': {'value': None, 'limit': 0.8, 'met': False}}


def test_robustness_table_and_plot(tmp_path):
  result = _robust_result(_robustness())
  result.update(num_tasks=5, meta_training={}, init_learning_rate=0.1, init_from='config',
                beyond_horizon={}, learned_vs_baselines={})
  for entry in result['optimizers'].values():
    entry.update(learning_rate=None, wall_clock_seconds=[0.1, 0.0],
                 final_train_loss=[0.1, 0.0])
  result['optimizers']['metamd_adaptive'] = {'learning_rate': None, 'reference_norm': 2.5,
                                             'wall_clock_seconds': [0.1, 0.0],
                                             'final_train_loss': [0.1, 0.0]}
  text = report.format_benchmark_family('fam', result)
  rows = [line.split(' | ')[:5] for line in text.splitlines()
          if line.startswith(('| inputs_x2 |', '| batch_quarter |'))]
  assert rows == [['| inputs_x2', 'metamd', 'learned', '0/5', '0/5'],
                  ['| inputs_x2', 'metamd_adaptive', 'learned (c = 2.5)', '0/5', '0/5'],
                  ['| inputs_x2', 'adam', 'learned', '0/5', '0/5'],
                  ['| inputs_x2', 'adam_retuned', 'learned', '0/5', '0/5'],
                  ['| batch_quarter', 'metamd', 'learned', '3/5', '0/5'],
                  ['| batch_quarter', 'metamd_adaptive', 'learned (c = 2.5)', '0/5', '0/5'],
                  ['| batch_quarter', 'adam', 'learned', '2/5', '0/5'],
                  ['| batch_quarter', 'adam_retuned', 'learned', '0/5', '0/5']]
  assert '| heldout_dataset | metamd | learned | 0/5 | 0/5 | n/a (no reference) |' in text
  assert ('- metamd: 1 diverged run (label_noise) in the 4 of 5 checks where adam '
          "(meta-train-tuned learning rate) trained; reached adam_retuned's final loss in "
          'fewer steps on every task in 2/5 checks (40%): inputs_x2, 10T.') in text
  path = tmp_path / 'robustness.png'
  plots.plot_robustness(result['robustness'], path, 'fam')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('family,field,value,message', [
    ('digits_mlp', 'steps_at_most_T_over', -1.0, 'finite number >= 0'),
    ('digits_mlp', 'seconds_at_most_reference_over', float('inf'), 'finite number >= 0'),
    ('digits_mlp', 'fewer_steps_than_every_baseline', 1, 'True or False'),
    ('least_squares', 'test_accuracy_at_least_reference', True, 'classification'),
    ('digits_mlp', 'robust_no_divergence_and_faster_fraction', 1.5, r'fraction .* \[0, 1\]'),
    ('digits_mlp', 'robust_no_divergence_and_faster_fraction', -0.5, 'finite number >= 0'),
    ('least_squares', 'robust_no_divergence_and_faster_fraction', 0.8, 'classification'),
])
def test_bad_target_values_name_the_field(family, field, value, message):
  config = benchmark_config.get_config()
  targets = config.families[family].targets
  with targets.ignore_type():
    targets[field] = value
  with pytest.raises(ValueError, match=rf'config\.families\.{family}\.targets\.{field}.*'
                                       f'{message}'):
    benchmark_setup.family_config(config, family)


def test_unknown_or_malformed_targets_name_the_field():
  config = benchmark_config.get_config()
  config.families.digits_mlp.targets.fewer_steps_than_adam = True
  with pytest.raises(ValueError, match=r'config\.families\.digits_mlp\.targets\.'
                                       r'fewer_steps_than_adam is not a target'):
    benchmark_setup.validate(config)
  config = benchmark_config.get_config()
  with config.families.digits_mlp.ignore_type():
    config.families.digits_mlp.targets = ('fewer_steps_than_every_baseline',)
  with pytest.raises(ValueError, match=r'config\.families\.digits_mlp\.targets must be'):
    benchmark_setup.family_config(config, 'digits_mlp')
  family = benchmark_config.get_config().families.digits_mlp
  del family['targets']  # a family may declare none
  benchmark_targets.validate_targets(family, 'config.families.digits_mlp')
  assert isinstance(benchmark_config.get_config().families.mnist_mlp.targets,
                    ml_collections.ConfigDict)
