"""experiments.sweep: a config value chosen on validation tasks, never on held-out ones."""

import jax
import numpy as np
import optax
import pytest

import metamd_jax
from configs import tiny
from experiments import benchmark_runs, builders, choose_variant, sweep
from metamd_jax import evaluation


@pytest.mark.heavy
def test_sweep_scores_validation_tasks_and_chooses_the_best(tmp_path, monkeypatch):
  config = tiny.get_config()  # meta.eps = 0.01: the meta-step of the tiny pipeline tests
  config.eval.num_validation_tasks = 3  # not eval.num_tasks (2, the held-out tasks)
  held_out_calls = []
  monkeypatch.setattr(evaluation, 'held_out_tasks',
                      lambda *a, **k: held_out_calls.append(a) or pytest.fail('held-out'))
  result = sweep.sweep(config, tmp_path, 'meta.eps', [0.01, 0.1], progress=False)
  assert not held_out_calls
  assert result['values'] == ['0.01', '0.1'] and set(result['rows']) == {'0.01', '0.1'}
  assert result['criterion'] == 'validation_accuracy'
  means = {k: r['validation_accuracy'][0] for k, r in result['rows'].items()}
  assert result['chosen'] == max(means, key=lambda k: (means[k], k == '0.01'))

  # Validation accuracy, recomputed independently for one value and one task: train with
  # the saved divergence, count correct pool examples outside the task's subset in numpy.
  divergence, _ = metamd_jax.load_divergence(tmp_path / 'meta.eps=0.1' / 'divergence.npz')
  assert divergence['Dense_0']['kernel'].eps == 0.1
  family, _ = builders.build_families(config)
  tasks = evaluation.tuning_tasks(family, config.seed, 3)
  first = jax.tree.map(lambda x: x[0], tasks)
  params, _ = jax.jit(lambda tp: evaluation.train(metamd_jax.metamd(divergence),
                                                  family.task(tp), config.eval.num_steps))(first)
  predictions = np.asarray(family.logits(params, family.train.x)).argmax(-1)
  outside = np.ones(len(family.train), bool)
  outside[np.asarray(first['subset'])] = False
  expected = np.mean(predictions[outside] == family.train.y[outside])
  curves = sweep.validation_run(metamd_jax.metamd(divergence), family, tasks,
                                config.eval.num_steps)
  np.testing.assert_allclose(curves.metrics['validation_accuracy'][0], expected, atol=1e-6)
  # The row's mean is over the three validation tasks.
  assert result['num_tasks'] == 3
  np.testing.assert_allclose(result['rows']['0.1']['validation_accuracy'][0],
                             np.mean(curves.metrics['validation_accuracy']), rtol=1e-5)
  table = sweep.format_sweep(result)
  assert '| meta.eps |' in table and f"chosen by validation_accuracy: {result['chosen']}" in table


@pytest.mark.parametrize('field, match', [
    ('meta.nope', 'has no field'),
    ('nope.eps', 'no section'),
    ('meta.optimizer', 'numeric field'),
])
def test_bad_fields_are_named(field, match):
  with pytest.raises(ValueError, match=match):
    sweep.with_value(tiny.get_config(), field, 0.1)


def test_values_are_checked():
  assert sweep.parse_values('0.001, 0.1') == [0.001, 0.1]
  for bad in ('', 'a,b', '0.1,0.1', 'nan'):
    with pytest.raises(ValueError, match='--values'):
      sweep.parse_values(bad)
  with pytest.raises(ValueError, match=r'config\.meta\.eps'):
    sweep.with_value(tiny.get_config(), 'meta.eps', -1.0)


@pytest.mark.heavy
def test_robustness_rule_scores_the_configs_adaptive_metamd_under_the_shifts(tmp_path,
                                                                            monkeypatch):
  """``rule='robustness'``: each value's adaptive MetaMD (the config's own settings) under
  ``eval.shifts`` on validation tasks, scored and chosen by experiments.choose_variant's
  rule."""
  config = tiny.get_config()
  config.eval.shifts = ('inputs_x2',)
  monkeypatch.setattr(evaluation, 'held_out_tasks',
                      lambda *a, **k: pytest.fail('held-out tasks used'))
  # A clock of 1 ms per step for the check in seconds: the scores are the rule's either way
  # (the check's logic is tested in tests/test_choose_variant.py, the runs it times, stopped
  # at the reference's loss, in the quick benchmark of tests/test_benchmark.py).
  timed = []

  def fake_time_runs(optimizer, family, task_params, num_steps, repeats):
    timed.append(num_steps)
    return np.full(jax.tree.leaves(task_params)[0].shape[0], 1e-3 * num_steps)

  monkeypatch.setattr(benchmark_runs, 'time_runs', fake_time_runs)
  result = sweep.sweep(config, tmp_path, 'meta.eps', [0.01, 0.1], rule='robustness',
                       progress=False)
  assert timed  # the check in seconds ran
  assert result['criterion'] == 'robustness'
  assert result['num_tasks'] == builders.num_validation_tasks(config.eval)
  for row in result['rows'].values():
    assert list(row['checks']) == ['in_distribution', 'inputs_x2']
    # The tiny config inherits the default's checks in seconds and in test accuracy
    # (eval.seconds_check, eval.accuracy_check).
    assert row['robustness'] == choose_variant.score(row['checks'], choose_variant.OWN, 'adam',
                                                     row[choose_variant.SECONDS],
                                                     accuracy=True)
    assert row['robustness']['num_checks'] == 4
    assert choose_variant.OWN in row['checks']['in_distribution']['optimizers']
  assert result['chosen'] == choose_variant.choose(
      {key: row['robustness'] for key, row in result['rows'].items()})
  table = sweep.format_sweep(result)
  assert table.count('| 0.1 |') == 2 and "The config's adaptive MetaMD" in table
  # The 'config' candidate is the config's own settings.
  own = choose_variant.settings_of(config, choose_variant.OWN)
  assert own == {field: config.eval[field] for field in own}
  assert own.keys() == choose_variant.CANDIDATES['eigen_kron_0.1_nesterov_0.5'].keys()
  with pytest.raises(ValueError, match='rule must be one of'):
    sweep.sweep(config, tmp_path, 'meta.eps', [0.1], rule='speed')
  # Two values with one workdir would resume one value's run as the other's.
  with pytest.raises(ValueError,
                     match=r"name the same workdirs \['meta.eps=0.1', 'meta.eps=0.1'\]"):
    sweep.sweep(config, tmp_path, 'meta.eps', [0.1, 0.1000001])


def test_frozen_table_follows_the_configs_reference(tmp_path):
  """The frozen table's steps are to the final loss of ``eval.reference`` (AdamW here), as
  the robustness checks' are, tuned on the validation tasks; checked against a plain
  ``optax.adamw`` run at the tuned rate and the steps counted in numpy."""
  config = tiny.get_config()
  config.eval.baselines = ('adam', 'adamw')
  config.eval.reference = 'adamw'
  result = sweep.sweep(config, tmp_path, 'meta.eps', [0.1], progress=False)
  assert result['reference'] == 'adamw'
  rate = result['reference_learning_rate']
  assert rate in config.eval.learning_rates
  family, _ = builders.build_families(config)
  tasks = evaluation.tuning_tasks(family, config.seed, builders.num_validation_tasks(config.eval))
  num_steps = config.eval.num_steps
  reference = evaluation.run(optax.adamw(rate, b2=0.95, weight_decay=0.1), family, tasks,
                             num_steps, track_every=1)
  target = np.asarray(reference.train_losses)[:, -1]
  divergence, _ = metamd_jax.load_divergence(tmp_path / 'meta.eps=0.1' / 'divergence.npz')
  frozen = np.asarray(evaluation.run(metamd_jax.metamd(divergence), family, tasks, num_steps,
                                     track_every=1).train_losses)
  # Column k of the tracked losses is the loss after k steps (column 0: the start).
  steps = [next((k for k in range(frozen.shape[1]) if frozen[i, k] <= target[i]), None)
           for i in range(len(target))]
  reached = [s for s in steps if s is not None]
  row = result['rows']['0.1']
  assert row['reached_fraction'] == pytest.approx(len(reached) / len(steps))
  if reached:
    assert row['steps_to_reference'][0] == pytest.approx(np.mean(reached))
  assert 'steps to adamw final loss' in sweep.format_sweep(result)
  # A result stored before the key was renamed still prints.
  old = {**result, 'rows': {'0.1': {**{k: v for k, v in row.items()
                                       if k != 'steps_to_reference'},
                                    'steps_to_adam': row['steps_to_reference']}}}
  assert sweep.format_sweep(old) == sweep.format_sweep(result)
