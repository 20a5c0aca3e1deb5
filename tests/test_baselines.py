"""The optional Kronecker baselines (PSGD-Kron, Shampoo): optimisers, tuning, validation."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import QuadraticFamily, quadratic_task

from configs import tiny
from experiments import builders, kronecker_baselines, protocol
from metamd_jax import evaluation

OPTIONAL = tuple(kronecker_baselines.PACKAGES)


def _regression_loss():
  """A least-squares loss ``1/2 ||X W + b - Y||^2 / n`` with an exact solution (loss 0)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 5)), jnp.float32)
  y = x @ jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  return lambda params: 0.5 * jnp.mean(jnp.sum((x @ params['w'] + params['b'] - y) ** 2, -1))


@pytest.mark.parametrize('name', OPTIONAL)
def test_baseline_is_an_optax_optimiser_that_decreases_the_loss(name):
  optimizer = builders.BASELINES[name](0.03)
  assert isinstance(optimizer, optax.GradientTransformation)
  loss = _regression_loss()
  params = {'w': jnp.zeros((5, 3)), 'b': jnp.zeros(3)}

  @jax.jit
  def step(params, state):
    updates, state = optimizer.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = optimizer.init(params)
  initial = float(loss(params))
  for _ in range(20):
    params, state = step(params, state)
  final = float(loss(params))
  assert np.isfinite(final) and final < 0.5 * initial, (initial, final)


@pytest.mark.parametrize('name', OPTIONAL)
def test_tuning_vmaps_over_traced_learning_rates(name):
  """A 2-point grid tunes, and each rate's score is that of a run with a plain float rate."""
  family = QuadraticFamily(shape=(4, 3))
  task_params = family.sample_batch(jax.random.PRNGKey(0), 2)
  grid = (0.01, 0.1)
  best, scores = evaluation.tune_learning_rate(builders.BASELINES[name], grid, family,
                                               task_params, num_steps=20, window=5,
                                               score='train_loss')
  assert best in grid and set(scores) == set(grid)

  def final_loss(optimizer, one_task_params):
    task = family.task(one_task_params)
    params = task.init() if optimizer is None else evaluation.train(optimizer, task, 20)[0]
    return task.evaluate(params)['train_loss']

  assert scores[best] < np.mean(jax.vmap(lambda tp: final_loss(None, tp))(task_params))
  for learning_rate in grid:
    optimizer = builders.BASELINES[name](learning_rate)  # a Python float, not traced
    final = np.mean(jax.vmap(functools.partial(final_loss, optimizer))(task_params))
    np.testing.assert_allclose(scores[learning_rate], final, rtol=1e-4)


@pytest.mark.parametrize('name', OPTIONAL)
def test_config_naming_a_missing_package_fails_with_the_install_command(name, monkeypatch):
  module, distribution = kronecker_baselines.PACKAGES[name]
  monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
  config = tiny.get_config()
  config.eval.baselines = ('sgd', name)
  with pytest.raises(ValueError, match=r'config\.eval\.baselines') as error:
    builders.validate_config(config)
  assert distribution in str(error.value)
  assert "pip install -e '.[benchmark]'" in str(error.value)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[benchmark\]'"):
    builders.BASELINES[name](0.1)
  config.eval.baselines = ('sgd', 'adam')  # the other baselines do not need it
  builders.validate_config(config)
  assert kronecker_baselines.missing_package('adam') is None


@pytest.mark.parametrize('name', OPTIONAL)
def test_installed_package_passes_validation(name):
  config = tiny.get_config()
  config.eval.baselines = (name,)
  config.eval.reference = name  # the reference must be one of the baselines
  assert kronecker_baselines.missing_package(name) is None, kronecker_baselines.INSTALL
  builders.validate_config(config)  # raises, naming the install command, when it is missing


def test_psgd_kron_trains_in_runs_that_pass_the_loss():
  """psgdax types its chain for extra arguments but refuses them: the baseline takes the
  plain type, so the runs (which pass the loss as ``value``) train it as a plain loop does."""
  assert kronecker_baselines.missing_package('psgd_kron') is None, kronecker_baselines.INSTALL
  task = quadratic_task()
  optimizer = kronecker_baselines.psgd_kron(0.01)
  _, losses = evaluation.train(optimizer, task, 4)
  kron = kronecker_baselines._import('psgd_kron').kron(0.01)
  params, want = task.init(), []
  state = kron.init(params)
  for t in range(4):
    loss, grads = jax.value_and_grad(task.loss)(params, task.batch(t))
    updates, state = kron.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want.append(loss)
  np.testing.assert_allclose(losses, want, rtol=1e-5)


def test_shampoo_tunes_on_a_digits_mlp_without_crashing_xla():
  """Regression: vmapping Shampoo's grid and tasks together made XLA abort the process.

  On the digits MLP, XLA's CPU algebraic simplifier hit a RET_CHECK (a transpose vs the
  dot it folds in) and aborted; the grid now runs mapped (``SEQUENTIAL_GRID``). The
  package is in the test extra: a missing one fails here rather than skipping.
  """
  assert kronecker_baselines.missing_package('shampoo') is None, kronecker_baselines.INSTALL
  assert 'shampoo' in kronecker_baselines.SEQUENTIAL_GRID
  config = tiny.get_config()
  config.task.hidden_sizes = (32,)  # the digits_mlp family's model
  config.eval.num_tune_tasks = 2
  train_family, _ = builders.build_families(config)
  tasks = evaluation.tuning_tasks(train_family, config.seed, config.eval.num_tune_tasks)
  rates, scores = protocol.tune_baselines(('shampoo',), config.eval, train_family, tasks, 4)
  assert rates['shampoo'] in config.eval.learning_rates
  assert set(scores['shampoo']) == {f'{lr:g}' for lr in config.eval.learning_rates}
  assert all(s is not None and np.isfinite(s) for s in scores['shampoo'].values()), scores
