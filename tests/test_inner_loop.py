"""The streaming rollout against a direct computation over the stored trajectory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quadratic_task, well_conditioned

import metamd_jax
from metamd_jax import bound, inner_loop


def _setup(dtype=jnp.float64):
  task = quadratic_task(dtype=dtype)
  divergence = well_conditioned(metamd_jax.init_divergence(task.init(), 0.1, dtype=dtype),
                                seed=0, noise=0.3)
  divergence = jax.tree.map(lambda x: 2.0 * x, divergence)  # step sizes ~ 1/16
  return task, divergence


def test_streaming_bound_equals_python_loop(x64):
  task, divergence = _setup()
  num_steps = 7
  result = inner_loop.rollout(divergence, task, num_steps, return_trajectory=True)
  # Independent: re-run the steps in a Python loop with the public API.
  params = task.init()
  trajectory, step_terms, losses = [params], [], []
  for t in range(num_steps):
    loss, grads = jax.value_and_grad(task.loss)(params, task.batch(t))
    new = metamd_jax.mirror_step(divergence, params, grads)
    step_terms.append(metamd_jax.bregman_divergence(divergence, params, new))
    losses.append(loss)
    trajectory.append(new)
    params = new
  distance = metamd_jax.bregman_divergence(divergence, trajectory[-1], trajectory[0])
  expected = (distance + sum(step_terms)) / num_steps
  np.testing.assert_allclose(float(result.bound), float(expected), rtol=1e-12)
  np.testing.assert_allclose(result.losses, np.array(losses), rtol=1e-12)
  np.testing.assert_allclose(float(result.distance_term), float(distance), rtol=1e-12)
  for leaf, stored in zip(jax.tree.leaves(result.trajectory[0]),
                          zip(*[jax.tree.leaves(p) for p in trajectory])):
    np.testing.assert_allclose(leaf, np.stack(stored), rtol=1e-12)


def test_streaming_meta_gradient_equals_gradient_of_stored_bound(x64):
  task, divergence = _setup()
  num_steps = 6
  streamed = inner_loop.rollout(divergence, task, num_steps, meta_gradient=True)
  stored = inner_loop.rollout(divergence, task, num_steps, return_trajectory=True)
  value, grad = jax.value_and_grad(bound.regret_bound)(divergence, *stored.trajectory)
  np.testing.assert_allclose(float(streamed.bound), float(value), rtol=1e-12)
  for a, b in zip(jax.tree.leaves(streamed.meta_grad), jax.tree.leaves(grad)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_rollout_rejects_bad_horizon():
  task, divergence = _setup(jnp.float32)
  with pytest.raises(ValueError, match='num_steps'):
    inner_loop.rollout(divergence, task, 0)


def test_rollout_memory_does_not_store_the_trajectory():
  """Without return_trajectory, scan outputs are the (T,) losses only."""
  task, divergence = _setup(jnp.float32)
  jaxpr = jax.make_jaxpr(
      lambda d: inner_loop.rollout(d, task, 50, meta_gradient=True))(divergence)
  scan = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan'][0]
  stacked = [v.aval.shape for v in scan.outvars if v.aval.shape[:1] == (50,)]
  assert stacked == [(50,)]


@pytest.mark.parametrize('structure', ['kronecker', 'diagonal', 'scalar'])
def test_statistics_adjoint_equals_the_implicit_vjp(x64, structure):
  task = quadratic_task(dtype=jnp.float64)
  divergence = jax.tree.map(lambda x: 2.0 * x, well_conditioned(
      metamd_jax.init_divergence(task.init(), 0.1, dtype=jnp.float64, structure=structure,
                                 max_factor_size=3), seed=4, noise=0.3))
  implicit = inner_loop.rollout(divergence, task, 6, meta_gradient=True, adjoint='implicit')
  statistics = inner_loop.rollout(divergence, task, 6, meta_gradient=True, adjoint='statistics')
  np.testing.assert_allclose(float(statistics.bound), float(implicit.bound), rtol=1e-12)
  for a, b in zip(jax.tree.leaves(statistics.meta_grad), jax.tree.leaves(implicit.meta_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  with pytest.raises(ValueError, match='adjoint'):
    inner_loop.rollout(divergence, task, 2, meta_gradient=True, adjoint='reverse')


def _spy_terms(monkeypatch):
  """Record which step term :func:`bound.add_step` differentiates."""
  calls = []
  for name in ('step_term', 'statistics_term'):
    original = getattr(bound, name)
    monkeypatch.setattr(bound, name, lambda *a, name=name, original=original, **k:
                        calls.append(name) or original(*a, **k))
  return calls


def test_auto_adjoint_is_statistics_with_the_exact_solver(x64, monkeypatch):
  task, divergence = _setup()
  # Independent: the gradient of the stored trajectory's bound (implicit VJP, vmapped).
  stored = inner_loop.rollout(divergence, task, 6, return_trajectory=True)
  value, grad = jax.value_and_grad(bound.regret_bound)(divergence, *stored.trajectory)
  calls = _spy_terms(monkeypatch)
  results = {}
  for adjoint in ('auto', 'implicit', 'statistics'):
    del calls[:]
    results[adjoint] = inner_loop.rollout(divergence, task, 6, meta_gradient=True,
                                          adjoint=adjoint)
    # Traced once in the scan body.
    assert calls == ['step_term' if adjoint == 'implicit' else 'statistics_term'], adjoint
    np.testing.assert_allclose(float(results[adjoint].bound), float(value), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(results[adjoint].meta_grad), jax.tree.leaves(grad)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  # 'auto' is the statistics path itself, not merely close to it.
  for a, b in zip(jax.tree.leaves(results['auto'].meta_grad),
                  jax.tree.leaves(results['statistics'].meta_grad)):
    np.testing.assert_array_equal(a, b)


def test_auto_adjoint_is_implicit_with_a_matrix_free_solver(x64, monkeypatch):
  task, divergence = _setup()
  stored = inner_loop.rollout(divergence, task, 5, return_trajectory=True)
  _, grad = jax.value_and_grad(bound.regret_bound)(divergence, *stored.trajectory)
  calls = _spy_terms(monkeypatch)
  auto = inner_loop.rollout(divergence, task, 5, meta_gradient=True, solver='cg', tol=1e-12)
  assert calls == ['step_term']
  implicit = inner_loop.rollout(divergence, task, 5, meta_gradient=True, adjoint='implicit',
                                solver='cg', tol=1e-12)
  for a, b, c in zip(jax.tree.leaves(auto.meta_grad), jax.tree.leaves(implicit.meta_grad),
                     jax.tree.leaves(grad)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-8, atol=1e-12)  # cg against the exact inverse


@pytest.mark.parametrize('solver', ['cg', 'neumann', 'dense'])
def test_statistics_adjoint_with_another_solver_is_rejected(solver):
  task, divergence = _setup(jnp.float32)
  message = f"adjoint='statistics'.*solver='{solver}'"
  with pytest.raises(ValueError, match=message):
    inner_loop.rollout(divergence, task, 2, meta_gradient=True, adjoint='statistics',
                       solver=solver)
  with pytest.raises(ValueError, match=message):
    inner_loop.adaptive_rollout(divergence, task, 2, 0.5, meta_gradient=True,
                                adjoint='statistics', solver=solver)


def test_auto_adjoint_keeps_the_exact_solvers_check_of_options():
  task, divergence = _setup(jnp.float32)
  with pytest.raises(ValueError, match='exact solver takes no options'):
    inner_loop.rollout(divergence, task, 2, meta_gradient=True, tol=1e-6)


def test_rollout_checks_the_initial_params_without_computing(structure_checks):
  task, divergence = _setup(jnp.float32)
  calls = structure_checks
  inner_loop.rollout(divergence, task, 2)
  assert calls == ['params']
  other = dict(task.init(), w=jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match=re.escape(
      "params leaf ['w'] has shape (3, 4) but the divergence was built for shape (4, 3).")):
    inner_loop.rollout(divergence, task, 2, params=other)


@pytest.mark.parametrize('which', ['rollout', 'adaptive_rollout', 'unrolled_loss'])
def test_meta_training_runs_take_the_tasks_run_batches(which):
  """The rollouts and the unrolled objective ask ``run_batches`` once for the horizon and
  train on what it returns (other batches than ``batch``'s here, to tell them apart); the
  unrolled objective's final loss keeps ``batch(T)``."""
  import dataclasses

  task = quadratic_task()
  asked = []

  def run_batches(num_steps):
    asked.append(num_steps)
    return lambda step: task.batch(step + 1)

  with_run = dataclasses.replace(task, run_batches=run_batches)
  by_hand = dataclasses.replace(task, batch=lambda step: task.batch(step + 1))
  divergence = metamd_jax.init_divergence(task.init(), learning_rate=0.1)

  def losses(t):
    if which == 'rollout':
      return inner_loop.rollout(divergence, t, 5).losses
    if which == 'adaptive_rollout':
      return inner_loop.adaptive_rollout(divergence, t, 5, None).losses
    return metamd_jax.objectives.unrolled_loss(divergence, t, 5)[1]

  np.testing.assert_allclose(losses(with_run), losses(by_hand), rtol=1e-6)
  assert asked == [5]
  assert not np.allclose(losses(task), losses(by_hand))
