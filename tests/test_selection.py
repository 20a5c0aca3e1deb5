"""The selection experiment (experiments/selection.py) on the tiny config."""

import json

import numpy as np
import optax
import pytest

from configs import tiny
from experiments import builders, report, selection
from metamd_jax import evaluation


@pytest.mark.heavy
def test_compare_reports_initial_best_and_last(tmp_path):
  config = tiny.get_config()  # the meta-step of the tiny pipeline test: compiled once
  result = selection.compare(config, tmp_path)
  assert set(result['optimizers']) == {'adam', 'initial', 'best', 'last'}
  assert result['num_meta_steps'] == config.meta.num_meta_steps
  assert 1 <= result['best_meta_step'] <= config.meta.num_meta_steps
  assert result['best_score'] <= result['last_score']
  # The kept meta-step is the first one whose logged selection score is the best score.
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  scores = [r['score'] for r in records]
  assert result['best_meta_step'] == records[int(np.argmin(scores))]['step']
  np.testing.assert_allclose(result['best_score'], min(scores), rtol=1e-6)
  np.testing.assert_allclose(result['last_score'], scores[-1], rtol=1e-6)
  # The initial divergence is SGD with meta.init_learning_rate: check against optax.sgd.
  _, test_family = builders.build_families(config)
  tasks = evaluation.held_out_tasks(test_family, config.seed, config.eval.num_tasks)
  sgd = evaluation.run(optax.sgd(config.meta.init_learning_rate), test_family, tasks,
                       config.meta.horizon, track_every=1)
  np.testing.assert_allclose(result['optimizers']['initial']['final_train_loss'],
                             sgd.train_losses[:, -1], rtol=1e-4)
  # Adam reaches its own final loss; every row has one entry per held-out task.
  assert result['optimizers']['adam']['reached_fraction'] == 1.0
  for row in result['optimizers'].values():
    assert len(row['final_train_loss']) == len(row['final_train_loss_at_10T'])
    assert len(row['final_train_loss']) == config.eval.num_tasks
  table = report.format_selection(result)
  assert table.count('\n| ') == 6 and '| best |' in table
