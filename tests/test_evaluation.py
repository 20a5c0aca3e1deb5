"""Meta-testing helpers against plain Python references."""

import jax
import numpy as np
import optax
import pytest
from helpers import QuadraticFamily, quadratic_task

from metamd_jax import evaluation, meta_train


def test_train_equals_a_python_optax_loop():
  task = quadratic_task()
  optimizer = optax.adam(0.05)
  params, losses = jax.jit(lambda: evaluation.train(optimizer, task, 6))()
  reference = task.init()
  state = optimizer.init(reference)
  expected = []
  for t in range(6):
    loss, grads = jax.value_and_grad(task.loss)(reference, task.batch(t))
    updates, state = optimizer.update(grads, state, reference)
    reference = optax.apply_updates(reference, updates)
    expected.append(loss)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_smooth_and_steps_to_reach():
  losses = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
  smoothed = evaluation.smooth(losses, 2)
  expected = np.array([[5.0, 4.5, 3.5, 2.5, 1.5, 1.0], [9.0] * 6])
  np.testing.assert_allclose(smoothed, expected)
  steps = evaluation.steps_to_reach(losses, np.array([2.5, 1.0]), window=2)
  assert steps[0] == 4 and np.isnan(steps[1])
  np.testing.assert_allclose(evaluation.final_loss(losses, 2), [1.0, 9.0])
  assert evaluation.final_loss(np.array([[1.0, np.nan]]), 2)[0] == np.inf


def test_tune_learning_rate_picks_the_lowest_final_loss():
  family = QuadraticFamily()
  tasks = meta_train.sample_tasks(family, jax.random.key(0), 0, 2)
  best, scores = evaluation.tune_learning_rate(optax.sgd, [1e-3, 0.3, 10.0], family, tasks,
                                               20, window=3)
  assert best == 0.3
  assert scores[10.0] == np.inf and scores[1e-3] > scores[0.3]
  with pytest.raises(ValueError, match='diverged'):
    evaluation.tune_learning_rate(optax.sgd, [10.0, 100.0], family, tasks, 20, window=3)


def test_a_run_reaches_its_own_final_loss():
  losses = np.random.default_rng(0).uniform(0.1, 2.0, size=(50, 37)).astype(np.float32)
  steps = evaluation.steps_to_reach(losses, evaluation.final_loss(losses, 7), window=7)
  assert np.all(np.isfinite(steps)) and np.all(steps <= 37)
