"""Smoke test of the benchmark (experiments/benchmark.py) on one tiny family."""

import json
import math

import ml_collections
import pytest

from configs import benchmark as benchmark_config
from configs import tiny
from experiments import benchmark, benchmark_setup


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
  config.quick_meta_steps = 2
  config.baselines = ('sgd', 'adam')
  # MetaMD alone keeps the smoke test well under a minute; the learned baselines are the
  # same code path with another structure or meta-objective (test_variant_configs).
  config.variant_names = ('metamd',)
  config.horizon_multiplier = 3
  config.timing_repeats = 1
  return config


def _finite_pair(value):
  assert isinstance(value, list) and len(value) == 2, value
  assert all(isinstance(v, float) and math.isfinite(v) for v in value), value


def test_quick_benchmark_writes_documented_results(tmp_path, capsys):
  config = _tiny_benchmark_config()
  benchmark.benchmark(config, tmp_path, progress=False)
  assert '## tiny' in capsys.readouterr().out

  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['settings']['num_tasks'] == 2
  family = results['families']['tiny']
  assert set(family['optimizers']) == {'metamd', 'sgd', 'adam'}
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
    # Curves are the whole-training-set loss after 0, 1, ..., T steps; the final loss is
    # its last entry.
    curve = entry['mean_curve']
    assert len(curve) == family['horizon'] + 1 and entry['curve_every'] == 1
    assert math.isclose(curve[-1], entry['final_train_loss'][0], rel_tol=1e-5)
  assert family['init_learning_rate'] == family['optimizers']['sgd']['learning_rate']
  for variant, info in family['meta_training'].items():
    assert info['num_meta_steps'] >= 1, variant
    assert (tmp_path / 'tiny' / variant / 'divergence.npz').exists()
  for row in family['learned_vs_baselines']['metamd'].values():
    _finite_pair(row['baseline_final_train_loss'])
    _finite_pair(row['baseline_wall_clock_seconds'])
  # The family declares fewer_steps_than_every_baseline: one target per tuned baseline,
  # read off the learned-vs-baselines rows.
  assert set(family['targets']) == {'fewer_steps_than_sgd', 'fewer_steps_than_adam'}
  for baseline in ('sgd', 'adam'):
    target = family['targets'][f'fewer_steps_than_{baseline}']
    row = family['learned_vs_baselines']['metamd'][baseline]
    assert (target['value'], target['limit']) == (row['steps'][0], row['baseline_steps'][0])
    assert target['met'] == (row['reached_fraction'] == 1.0 and target['value'] is not None
                             and target['limit'] is not None
                             and target['value'] < target['limit'])
  for entry in family['beyond_horizon'].values():
    assert entry['steps'] == 3 * family['horizon']
    _finite_pair(entry['loss_at_T'])
    assert 0.0 <= entry['blew_up_fraction'] <= 1.0
  assert (tmp_path / 'results.md').read_text().startswith('## tiny')
  for suffix in ('loss_vs_step', 'loss_vs_time', 'beyond_horizon'):
    assert (tmp_path / f'tiny_{suffix}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


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
