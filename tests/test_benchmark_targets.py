"""The benchmark's targets (experiments/benchmark_targets.py): declared in the config as
data, checked on a family's results."""

import ml_collections
import pytest

from configs import benchmark as benchmark_config
from experiments import benchmark_setup, benchmark_targets


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
    targets = config.families[name].targets
    assert targets.fewer_steps_than_every_baseline and not targets.steps_at_most_T_over


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


@pytest.mark.parametrize('family,field,value,message', [
    ('digits_mlp', 'steps_at_most_T_over', -1.0, 'finite number >= 0'),
    ('digits_mlp', 'seconds_at_most_reference_over', float('inf'), 'finite number >= 0'),
    ('digits_mlp', 'fewer_steps_than_every_baseline', 1, 'True or False'),
    ('least_squares', 'test_accuracy_at_least_reference', True, 'classification'),
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
