"""The shared meta-testing protocol (experiments/protocol.py) against numpy."""

import ml_collections
import numpy as np
import optax
import pytest
from helpers import QuadraticFamily

from experiments import protocol
from metamd_jax import evaluation


def _curves():
  train_losses = np.array([[4.0, 3.0, 2.0, 1.0, 1.0],
                           [4.0, 3.5, 3.0, 2.5, 2.0],
                           [4.0, 5.0, np.nan, np.nan, np.nan]])
  return evaluation.Curves(losses=np.ones((3, 8)), metrics={'accuracy': np.array([0.5, 0.7,
                                                                                   np.nan])},
                           train_losses=train_losses, every=2)


def test_summarize_and_reach_against_numpy():
  curves = _curves()
  target = np.array([2.0, 2.0, 2.0])
  entry = protocol.summarize(curves, target, 'ref', seconds_per_step=np.array([0.1, 0.2, 0.3]))
  # Final whole-set loss: the diverged task is left out of the mean.
  assert entry['final_train_loss'] == pytest.approx([1.5, 0.5])
  # First entry at or below 2.0: index 2 and 4, every 2 steps; the third task never.
  assert entry['steps_to_ref_final_loss'] == pytest.approx([6.0, 2.0])
  assert entry['seconds_to_ref_final_loss'] == pytest.approx(
      [np.mean([0.4, 1.6]), np.std([0.4, 1.6])])
  assert entry['reached_fraction'] == pytest.approx(2 / 3)
  assert entry['accuracy'] == pytest.approx([0.6, 0.1])
  assert protocol.reach(curves, target)['steps_per_task'] == [4.0, 8.0, None]
  assert 'seconds' not in protocol.reach(curves, target)
  assert set(protocol.summarize(curves)) == {'final_train_loss', 'accuracy'}
  summary = protocol.curves_summary(curves)
  assert summary['curve_every'] == 2
  np.testing.assert_allclose(summary['mean_curve'][:2], [4.0, np.mean([3.0, 3.5, 5.0])])
  np.testing.assert_allclose(summary['std_curve'][2:], [0.5, 0.75, 0.5])


def test_tune_baselines_leaves_out_a_baseline_that_always_diverged(caplog):
  family = QuadraticFamily()
  tasks = evaluation.tuning_tasks(family, 0, 2)
  eval_config = ml_collections.ConfigDict({'learning_rates': (1e-3, 0.3, 10.0), 'window': 3})
  learning_rates, scores = protocol.tune_baselines(('sgd',), eval_config, family, tasks, 20)
  best, expected = evaluation.tune_learning_rate(optax.sgd, (1e-3, 0.3, 10.0), family, tasks,
                                                 20, 3, score='train_loss')
  assert learning_rates['sgd'] == best == 0.3
  assert scores['sgd'] == {'0.001': expected[1e-3], '0.3': expected[0.3], '10': None}
  eval_config.learning_rates = (10.0, 100.0)
  learning_rates, scores = protocol.tune_baselines(('sgd',), eval_config, family, tasks, 20)
  assert learning_rates == {'sgd': None} and scores == {'sgd': {}}
  assert 'diverged' in caplog.text
