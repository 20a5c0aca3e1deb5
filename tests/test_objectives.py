"""Meta-objectives: unrolled gradients, the objective switch, learned geometry.

The bound's own tests (its terms and analytic minimisers) are in test_bound.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import quadratic_task, well_conditioned

import metamd_jax
from metamd_jax import bound, inner_loop, objectives
from metamd_jax import divergence as divergence_lib
from metamd_jax.tasks.base import Task


def _plain_unrolled_loss(divergence, task, num_steps):
  """Reference: the unroll written with the closed form and plain autodiff."""
  params = task.init()
  for t in range(num_steps):
    grads = jax.grad(task.loss)(params, task.batch(t))
    direction = divergence_lib.solve_metric(divergence, grads)
    params = jax.tree.map(jnp.subtract, params, direction)
  return task.loss(params, task.batch(num_steps))


def test_unrolled_meta_gradient_equals_plain_autodiff(x64):
  task = quadratic_task(dtype=jnp.float64)
  divergence = jax.tree.map(lambda x: 2.0 * x, well_conditioned(
      metamd_jax.init_divergence(task.init(), 0.1, dtype=jnp.float64), seed=1, noise=0.3))
  result = objectives.meta_gradient(divergence, task, 5, objective='unrolled')
  value, grad = jax.value_and_grad(_plain_unrolled_loss)(divergence, task, 5)
  np.testing.assert_allclose(float(result.loss), float(value), rtol=1e-12)
  for a, b in zip(jax.tree.leaves(result.grad), jax.tree.leaves(grad)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize('objective', objectives.OBJECTIVES)
def test_one_argument_switches_the_objective(objective):
  task = quadratic_task()
  divergence = metamd_jax.init_divergence(task.init(), 0.1)
  result = jax.jit(lambda d: objectives.meta_gradient(d, task, 4, objective=objective))(
      divergence)
  assert jax.tree.structure(result.grad) == jax.tree.structure(divergence)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(result.grad))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(result.grad))
  if objective == 'bound':
    expected = inner_loop.rollout(divergence, task, 4).bound
    np.testing.assert_allclose(result.loss, expected, rtol=1e-5)


def _bound_setup():
  task = quadratic_task(dtype=jnp.float64)
  divergence = jax.tree.map(lambda x: 2.0 * x, well_conditioned(
      metamd_jax.init_divergence(task.init(), 0.1, dtype=jnp.float64), seed=2, noise=0.3))
  return task, divergence


def _stored_bound_gradient(divergence, task, num_steps):
  """Independent: the stored trajectory's bound, differentiated through the implicit VJP."""
  stored = inner_loop.rollout(divergence, task, num_steps, return_trajectory=True)
  return jax.value_and_grad(bound.regret_bound)(divergence, *stored.trajectory)


def test_auto_meta_gradient_equals_implicit_and_statistics_with_the_exact_solver(x64):
  task, divergence = _bound_setup()
  value, grad = _stored_bound_gradient(divergence, task, 6)
  results = {adjoint: objectives.meta_gradient(divergence, task, 6, adjoint=adjoint)
             for adjoint in ('auto', 'implicit', 'statistics')}
  results['default'] = objectives.meta_gradient(divergence, task, 6)
  for adjoint, result in results.items():
    np.testing.assert_allclose(float(result.loss), float(value), rtol=1e-12, err_msg=adjoint)
    for a, b in zip(jax.tree.leaves(result.grad), jax.tree.leaves(grad)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=adjoint)
  for a, b, c in zip(jax.tree.leaves(results['auto'].grad),
                     jax.tree.leaves(results['implicit'].grad),
                     jax.tree.leaves(results['statistics'].grad)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(a, c)  # 'auto' runs the statistics path itself


def test_auto_meta_gradient_with_cg_is_the_implicit_one(x64):
  task, divergence = _bound_setup()
  _, grad = _stored_bound_gradient(divergence, task, 5)
  auto = objectives.meta_gradient(divergence, task, 5, solver='cg', tol=1e-12)
  implicit = objectives.meta_gradient(divergence, task, 5, adjoint='implicit', solver='cg',
                                      tol=1e-12)
  for a, b, c in zip(jax.tree.leaves(auto.grad), jax.tree.leaves(implicit.grad),
                     jax.tree.leaves(grad)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize('objective', objectives.OBJECTIVES)
def test_statistics_adjoint_with_cg_is_rejected_naming_both(objective):
  task = quadratic_task()
  divergence = metamd_jax.init_divergence(task.init(), 0.1)
  with pytest.raises(ValueError, match="adjoint='statistics'.*solver='cg'"):
    objectives.meta_gradient(divergence, task, 3, objective=objective, adjoint='statistics',
                             solver='cg')


def test_a_horizon_that_is_not_a_positive_integer_is_named():
  """Every objective; before, the unrolled one failed with an ``IndexError`` at 0 and
  rounded 2.5 up to 3 steps."""
  task = quadratic_task()
  divergence = metamd_jax.init_divergence(task.init(), 0.1)
  for num_steps in (0, 2.5, True, '3', None):
    for objective in objectives.OBJECTIVES:
      with pytest.raises(ValueError,
                         match=f'num_steps must be a positive integer, got {num_steps!r}'):
        objectives.meta_gradient(divergence, task, num_steps, objective=objective)
    with pytest.raises(ValueError, match='num_steps must be a positive integer'):
      objectives.unrolled_loss(divergence, task, num_steps)
  # A whole float is a horizon: the same run as the int.
  np.testing.assert_array_equal(objectives.unrolled_loss(divergence, task, 3.0)[1],
                                objectives.unrolled_loss(divergence, task, 3)[1])


def test_unknown_objective_is_rejected():
  task = quadratic_task()
  divergence = metamd_jax.init_divergence(task.init(), 0.1)
  with pytest.raises(ValueError, match='unknown objective'):
    objectives.meta_gradient(divergence, task, 3, objective='validation')


def _spd(rng, dim, condition):
  q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  return (q * np.geomspace(1.0, condition, dim)) @ q.T


def test_bound_meta_training_learns_the_kronecker_geometry():
  """Least squares with Hessian A (x) B, condition number 100: the learned metric
  preconditions it to condition number <= 2."""
  rng = np.random.default_rng(0)
  m, n = 4, 3
  left = jnp.asarray(_spd(rng, m, 10.0), jnp.float32)
  right = jnp.asarray(_spd(rng, n, 10.0), jnp.float32)

  def make_task(key):
    target = jax.random.normal(key, (m, n))

    def loss(params, batch):
      diff = params['w'] - target
      return 0.5 * jnp.sum(diff * (left @ diff @ right))

    return Task(init=lambda: {'w': jnp.zeros((m, n))}, loss=loss, batch=lambda step: None)

  def preconditioned_condition(divergence):
    lf, rf = divergence['w'].factors()
    eig_left = np.linalg.eigvals(np.linalg.solve(lf, left)).real
    eig_right = np.linalg.eigvals(np.linalg.solve(rf, right)).real
    spectrum = np.outer(eig_left, eig_right)
    return spectrum.max() / spectrum.min()

  divergence = metamd_jax.init_divergence({'w': jnp.zeros((m, n))}, 0.01)
  assert preconditioned_condition(divergence) >= 99
  optimizer = optax.adam(0.03)
  state = optimizer.init(divergence)

  @jax.jit
  def meta_step(divergence, state, key):
    results = jax.vmap(lambda k: objectives.meta_gradient(divergence, make_task(k), 10))(
        jax.random.split(key, 16))
    grad = jax.tree.map(lambda g: g.mean(0), results.grad)
    updates, state = optimizer.update(grad, state, divergence)
    return optax.apply_updates(divergence, updates), state

  key = jax.random.key(1)
  for _ in range(200):
    key, subkey = jax.random.split(key)
    divergence, state = meta_step(divergence, state, subkey)
  assert preconditioned_condition(divergence) <= 2.0
