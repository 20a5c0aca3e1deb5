"""The selection experiment (experiments/selection.py) on the tiny config."""

import jax
import numpy as np
import optax

from configs import tiny
from experiments import builders, selection
from experiments.evaluate import TEST_KEY_OFFSET
from metamd_jax import evaluation, meta_train


def test_compare_reports_initial_best_and_last(tmp_path):
  config = tiny.get_config()
  config.meta.horizon = 10  # a multiple of the 10 T tracking interval
  result = selection.compare(config, tmp_path)
  assert set(result['optimizers']) == {'adam', 'initial', 'best', 'last'}
  assert result['num_meta_steps'] == config.meta.num_meta_steps
  assert 1 <= result['best_meta_step'] <= config.meta.num_meta_steps
  assert result['best_score'] <= result['last_score']
  # The initial divergence is SGD with meta.init_learning_rate: check against optax.sgd.
  _, test_family = builders.build_families(config)
  tasks = meta_train.sample_tasks(test_family, jax.random.key(config.seed + TEST_KEY_OFFSET), 0,
                                  config.eval.num_tasks)
  sgd = evaluation.run(optax.sgd(config.meta.init_learning_rate), test_family, tasks,
                       config.meta.horizon, track_every=1)
  np.testing.assert_allclose(result['optimizers']['initial']['final_train_loss'],
                             sgd.train_losses[:, -1], rtol=1e-4)
  # Adam reaches its own final loss; every row has one entry per held-out task.
  assert result['optimizers']['adam']['reached_fraction'] == 1.0
  for row in result['optimizers'].values():
    assert len(row['final_train_loss']) == len(row['final_train_loss_at_10T'])
    assert len(row['final_train_loss']) == config.eval.num_tasks
  table = selection.format_table(result)
  assert table.count('\n| ') == 6 and '| best |' in table
