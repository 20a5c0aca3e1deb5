"""Adaptive MetaMD: the transform against optax and a numpy loop, the adaptive bound
against dense matrices, autodiff and finite differences, the rollout against the
transform, calibration, and robustness where frozen MetaMD diverges."""

import math

import chex
import helpers
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_block_metric, flat
from helpers import QuadraticFamily, ScaledLeastSquares, quadratic_task, well_conditioned

import metamd_jax
from metamd_jax import bound, evaluation, inner_loop, meta_train, objectives
from metamd_jax import divergence as divergence_lib

SHAPES, STRUCTURES = helpers.SHAPES, helpers.STRUCTURES
_tree, _divergence = helpers.random_tree, helpers.random_divergence


def _updates(optimizer, grads_list, params):
  """The updates of ``optimizer`` for a fixed gradient sequence, and its final state."""
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  out = []
  for grads in grads_list:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state


def _numpy_rule(metric, grads_list, reference_norm, decay):
  """Float64 reference of the rule: EMA, bias correction, running max, division."""
  average, scale, updates, scales = 0.0, 1.0, [], []
  for t, grads in enumerate(grads_list, start=1):
    g = flat(grads)
    direction = np.linalg.solve(metric, g)
    average = decay * average + (1 - decay) * (g @ direction)
    scale = max(scale, math.sqrt(average / (1 - decay ** t)) / reference_norm)
    updates.append(-direction / scale)
    scales.append(scale)
  return updates, np.array(scales), average


# ---------------------------------------------------------------------------
# The transform.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('reference_norm', [1e30, None, math.inf])
def test_never_adapting_is_metamd_and_sgd(reference_norm):
  params = _tree(1)
  grads_list = [_tree(10 + t, scale=3.0 ** t) for t in range(6)]
  divergence = _divergence(STRUCTURES[1], seed=1, dtype=jnp.float32)
  ours, state = _updates(metamd_jax.adaptive_metamd(divergence, reference_norm), grads_list,
                         params)
  reference, _ = _updates(metamd_jax.metamd(divergence), grads_list, params)
  for a, b in zip(ours, reference):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=0)
  assert float(state[0].scale) == 1.0
  sgd_divergence = metamd_jax.init_divergence(params, 0.05)
  ours, _ = _updates(metamd_jax.adaptive_metamd(sgd_divergence, reference_norm), grads_list,
                     params)
  reference, _ = _updates(optax.sgd(0.05), grads_list, params)
  for a, b in zip(ours, reference):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize('options', STRUCTURES)
@pytest.mark.parametrize('decay', [0.0, 0.9])
def test_updates_equal_a_numpy_loop_of_the_rule(x64, options, decay):
  divergence = _divergence(options, seed=2, dtype=jnp.float64)
  metric = dense_block_metric(divergence)
  params = _tree(1)
  grads_list = [_tree(20 + t, scale=1.6 ** t) for t in range(8)]  # growing gradients
  first = flat(grads_list[0])
  reference_norm = 3.0 * math.sqrt(first @ np.linalg.solve(metric, first))
  expected, scales, average = _numpy_rule(metric, grads_list, reference_norm, decay)
  assert scales[0] == 1.0 and scales[-1] > 2.0  # both regimes are exercised

  optimizer = metamd_jax.adaptive_metamd(divergence, reference_norm, decay=decay)
  state = optimizer.init(params)
  for t, grads in enumerate(grads_list):
    updates, state = optimizer.update(grads, state, params)
    # Float64 rounding of a dense solve against the Kronecker one: relative to the
    # update's largest entry (a small entry can lose digits to cancellation).
    np.testing.assert_allclose(flat(updates), expected[t], rtol=1e-12,
                               atol=1e-14 * np.abs(expected[t]).max())
    np.testing.assert_allclose(float(state[0].scale), scales[t], rtol=1e-13)
  assert int(state[0].count) == len(grads_list)
  np.testing.assert_allclose(float(state[0].norm_average), average, rtol=1e-12)


@pytest.mark.parametrize('decay', [0.0, 0.9, 0.99])
def test_scale_is_non_decreasing_and_at_least_one(decay):
  rng = np.random.default_rng(3)
  params = _tree(1)
  grads_list = [_tree(40 + t, scale=10.0 ** rng.uniform(-2, 2)) for t in range(40)]
  transform = metamd_jax.scale_by_adaptive_mirror_descent(_divergence(seed=3), 5.0,
                                                          decay=decay)
  state = transform.init(params)
  scales = []
  for grads in grads_list:
    _, state = transform.update(grads, state)
    scales.append(float(state.scale))
  scales = np.array(scales)
  assert np.all(scales >= 1.0)
  assert np.all(np.diff(scales) >= 0)
  assert scales[-1] > 1.0


def test_state_is_the_preconditioner_and_three_scalars():
  params = _tree(1)
  divergence = _divergence(STRUCTURES[1], seed=4)
  state = metamd_jax.scale_by_adaptive_mirror_descent(divergence, 1.0).init(params)
  frozen = metamd_jax.scale_by_mirror_descent(divergence).init(params)
  chex.assert_trees_all_equal(state.preconditioner, frozen.preconditioner)
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  assert state.norm_average.shape == () and float(state.norm_average) == 0.0
  assert state.scale.shape == () and float(state.scale) == 1.0
  assert state.scale.dtype == jax.tree.leaves(divergence)[0].dtype


def test_concrete_divergence_is_inverted_when_init_is_traced():
  """A jitted init holds a concrete divergence's inverse factors as constants (no
  Cholesky at run time) and equals the eager one; a traced divergence is still inverted."""
  params = _tree(1)
  divergence = _divergence(STRUCTURES[1], seed=4)
  optimizer = metamd_jax.scale_by_adaptive_mirror_descent(divergence, 1.0)
  assert 'cholesky' not in str(jax.make_jaxpr(optimizer.init)(params))
  chex.assert_trees_all_close(jax.jit(optimizer.init)(params), optimizer.init(params))
  traced = jax.make_jaxpr(
      lambda d: metamd_jax.scale_by_adaptive_mirror_descent(d, 1.0).init(params))(divergence)
  assert 'cholesky' in str(traced)


@pytest.mark.parametrize('value', [0.0, -1.0, float('nan'), -math.inf])
def test_bad_reference_norm_is_rejected(value):
  divergence = _divergence()
  task = quadratic_task()
  for build in (lambda: metamd_jax.adaptive_metamd(divergence, value),
                lambda: metamd_jax.scale_by_adaptive_mirror_descent(divergence, value),
                lambda: inner_loop.adaptive_rollout(
                    metamd_jax.init_divergence(task.init(), 0.1), task, 2, value),
                lambda: objectives.meta_gradient(
                    metamd_jax.init_divergence(task.init(), 0.1), task, 2,
                    objective='adaptive_bound', reference_norm=value)):
    with pytest.raises(ValueError, match='reference_norm must be positive and finite'):
      build()


@pytest.mark.parametrize('value', ['1.0', True, [1.0]])
def test_reference_norm_of_the_wrong_type_is_rejected(value):
  with pytest.raises(TypeError, match='reference_norm must be a positive float or None'):
    metamd_jax.adaptive_metamd(_divergence(), value)


@pytest.mark.parametrize('decay', [1.0, -0.1, 1.5])
def test_bad_decay_is_rejected(decay):
  with pytest.raises(ValueError, match=r'decay must be in \[0, 1\)'):
    metamd_jax.adaptive_metamd(_divergence(), 1.0, decay=decay)


def test_bad_learning_rate_is_rejected():
  with pytest.raises(ValueError, match='learning_rate'):
    metamd_jax.adaptive_metamd(_divergence(), 1.0, learning_rate=-0.1)


def test_jitted_update_does_not_recompile():
  params = _tree(1, scale=1.0)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  optimizer = metamd_jax.adaptive_metamd(_divergence(seed=5, dtype=jnp.float32), 0.1)
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)
    return optimizer.update(grads, state, params)

  state = optimizer.init(params)
  for t in range(3):
    grads = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(50 + t, scale=2.0 ** t))
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert len(traces) == 1
  assert float(state[0].scale) > 1.0


def test_inject_hyperparams_reference_norm_and_learning_rate():
  params = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(1))
  divergence = _divergence(seed=5, dtype=jnp.float32)
  grads_list = [jax.tree.map(lambda x: x.astype(jnp.float32), _tree(55 + t)) for t in range(2)]
  optimizer = optax.inject_hyperparams(metamd_jax.adaptive_metamd)(
      divergence=divergence, reference_norm=0.5, learning_rate=0.5)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  updates, state = update(grads_list[0], state, params)
  reference = metamd_jax.adaptive_metamd(divergence, 0.5, 0.5)
  expected, expected_state = _updates(reference, grads_list[:1], params)
  chex.assert_trees_all_close(updates, expected[0], rtol=1e-6)
  # A larger reference from the second step on: the scale keeps its running maximum.
  state.hyperparams['reference_norm'] = jnp.asarray(1e6)
  updates, state = update(grads_list[1], state, params)
  scale = float(expected_state[0].scale)
  np.testing.assert_allclose(float(state.inner_state[0].scale), scale, rtol=1e-6)
  assert scale > 1.0
  direction, _ = metamd_jax.scale_by_mirror_descent(divergence).update(
      grads_list[1], metamd_jax.scale_by_mirror_descent(divergence).init(params))
  chex.assert_trees_all_close(updates, jax.tree.map(lambda d: -0.5 * d / scale, direction),
                              rtol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_keeps_parameter_dtype(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), _tree(1))
  optimizer = metamd_jax.adaptive_metamd(_divergence(seed=5, dtype=jnp.float32), 0.1)
  grads = jax.tree.map(lambda x: x.astype(dtype), _tree(2))
  state = optimizer.init(params)
  updates, state = jax.jit(optimizer.update)(grads, state, params)
  for leaf in jax.tree.leaves(optax.apply_updates(params, updates)):
    assert leaf.dtype == dtype
  assert state[0].scale.dtype == jnp.float32 and float(state[0].scale) > 1.0


def test_clipped_gradients_never_exceed_the_reference():
  """With gradients clipped to norm G and the SGD(lr) divergence, ||g||_{M^{-1}} <=
  sqrt(lr) G: a reference of sqrt(lr) G keeps s_t = 1 (exactly clipped SGD), while the
  unclipped gradients are adapted to."""
  params = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(1))
  grads_list = [jax.tree.map(lambda x: x.astype(jnp.float32), _tree(60 + t, scale=2.0 ** t))
                for t in range(6)]
  lr, max_norm = 0.05, 0.5
  divergence = metamd_jax.init_divergence(params, lr)
  reference_norm = math.sqrt(lr) * max_norm * (1 + 1e-5)
  clipped = optax.chain(optax.clip_by_global_norm(max_norm),
                        metamd_jax.adaptive_metamd(divergence, reference_norm))
  ours, state = _updates(clipped, grads_list, params)
  expected, _ = _updates(optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(lr)),
                         grads_list, params)
  for a, b in zip(ours, expected):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=0)
  assert float(state[1][0].scale) == 1.0
  _, state = _updates(metamd_jax.adaptive_metamd(divergence, reference_norm), grads_list,
                      params)
  assert float(state[0].scale) > 10.0


def test_masked_leaves_pass_through_and_add_nothing(x64):
  params = _tree(1)
  divergence = _divergence(seed=6, dtype=jnp.float64)
  mask = {'w': True, 'b': False, 'conv': True}
  optimizer = optax.masked(metamd_jax.adaptive_metamd(divergence, 0.5), mask)
  grads_list = [_tree(70 + t) for t in range(3)]
  ours, _ = _updates(optimizer, grads_list, params)
  # Reference: the same rule on the unmasked leaves alone.
  sub = {'w': divergence['w'], 'conv': divergence['conv']}
  metric = dense_block_metric(sub)
  expected, _, _ = _numpy_rule(metric, [{'w': g['w'], 'conv': g['conv']} for g in grads_list],
                               0.5, 0.9)
  for t, updates in enumerate(ours):
    np.testing.assert_allclose(flat({'w': updates['w'], 'conv': updates['conv']}),
                               expected[t], rtol=1e-12)
    np.testing.assert_array_equal(updates['b'], grads_list[t]['b'])


# ---------------------------------------------------------------------------
# The adaptive bound.
# ---------------------------------------------------------------------------


def _scales(num_steps, seed):
  rng = np.random.default_rng(seed)
  return np.maximum.accumulate(1.0 + np.abs(rng.standard_normal(num_steps)))


def _adaptive_trajectory(divergence, scales, seed=10):
  """Adaptive iterates ``theta_{t+1} = theta_t - M^{-1} g_t / s_t`` for fixed gradients."""
  params = _tree(seed)
  grads = [_tree(seed + 1 + t) for t in range(len(scales))]
  iterates = [params]
  for g, s in zip(grads, scales):
    direction = divergence_lib.solve_metric(divergence, g)
    iterates.append(jax.tree.map(lambda p, d, s=s: p - d / s, iterates[-1], direction))
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return stack(iterates), stack(grads), iterates, grads


def _dense_adaptive_bound(metric, iterates, grads, scales):
  u = flat(iterates[-1])
  weights = np.diff(scales, prepend=0.0)
  distance = sum(0.5 * w * (u - flat(p)) @ metric @ (u - flat(p))
                 for w, p in zip(weights, iterates[:-1]))
  steps = sum(0.5 * flat(g) @ np.linalg.solve(metric, flat(g)) / s
              for g, s in zip(grads, scales))
  return (distance + steps) / len(grads), distance


def _plain_adaptive_bound(divergence, iterates, grads, scales):
  """Plain autodiff reference: Cholesky solves and products on the divergence itself."""
  u = jax.flatten_util.ravel_pytree(iterates[-1])[0]
  weights = np.diff(scales, prepend=0.0)
  total = 0.0
  for w, p, g, s in zip(weights, iterates[:-1], grads, scales):
    diff = jax.tree.map(lambda a, b: a - b, iterates[-1], p)
    moved = jax.flatten_util.ravel_pytree(divergence_lib.apply_metric(divergence, diff))[0]
    total = total + 0.5 * w * jnp.vdot(u - jax.flatten_util.ravel_pytree(p)[0], moved)
    direction = jax.flatten_util.ravel_pytree(divergence_lib.solve_metric(divergence, g))[0]
    total = total + 0.5 * jnp.vdot(jax.flatten_util.ravel_pytree(g)[0], direction) / s
  return total / len(grads)


def _stream(divergence, iterates, grads, scales, adjoint, meta_gradient=True):
  operators, pullback = jax.vjp(divergence_lib.operators, divergence)
  sums = bound.init_adaptive_sums(operators, iterates[0], meta_gradient=meta_gradient)
  for p, g, s in zip(iterates[:-1], grads, scales):
    sums = bound.add_adaptive_step(sums, operators, p, g, s, iterates[0], adjoint=adjoint)
  value, distance, grad = bound.finish_adaptive(sums, operators, iterates[-1], iterates[0],
                                                len(grads))
  return value, distance, (pullback(grad)[0] if meta_gradient else None)


@pytest.mark.parametrize('options', STRUCTURES)
@pytest.mark.parametrize('adjoint', ('implicit', 'statistics'))  # 'auto' is one of these
def test_streamed_adaptive_bound_equals_dense_matrices(x64, options, adjoint):
  divergence = _divergence(options, seed=7, dtype=jnp.float64)
  scales = _scales(5, seed=7)
  params_seq, grads_seq, iterates, grads = _adaptive_trajectory(divergence, scales)
  expected, expected_distance = _dense_adaptive_bound(dense_block_metric(divergence),
                                                      iterates, grads, scales)
  for meta_gradient in (True, False):
    value, distance, _ = _stream(divergence, iterates, grads, scales, adjoint, meta_gradient)
    np.testing.assert_allclose(float(value), expected, rtol=1e-12)
    np.testing.assert_allclose(float(distance), expected_distance, rtol=1e-11)
  stored = bound.adaptive_regret_bound(divergence, params_seq, grads_seq, scales,
                                       adjoint=adjoint)
  np.testing.assert_allclose(float(stored), expected, rtol=1e-12)
  assert bound.adaptive_regret_bound is metamd_jax.adaptive_regret_bound


@pytest.mark.parametrize('options', STRUCTURES)
@pytest.mark.parametrize('adjoint', ('implicit', 'statistics'))  # 'auto' is one of these
def test_streamed_meta_gradient_equals_plain_autodiff(x64, options, adjoint):
  divergence = _divergence(options, seed=8, dtype=jnp.float64)
  scales = _scales(5, seed=8)
  params_seq, grads_seq, iterates, grads = _adaptive_trajectory(divergence, scales)
  _, _, streamed = _stream(divergence, iterates, grads, scales, adjoint)
  expected = jax.grad(_plain_adaptive_bound)(divergence, iterates, grads, scales)
  stored = jax.grad(bound.adaptive_regret_bound)(divergence, params_seq, grads_seq, scales,
                                                 adjoint=adjoint)
  atol = 1e-12 * np.abs(flat(expected)).max()
  np.testing.assert_allclose(flat(streamed), flat(expected), rtol=1e-10, atol=atol)
  np.testing.assert_allclose(flat(stored), flat(expected), rtol=1e-10, atol=atol)


def test_adaptive_bound_gradient_equals_finite_differences(x64):
  divergence = _divergence(STRUCTURES[1], seed=9, dtype=jnp.float64)
  scales = _scales(4, seed=9)
  _, _, iterates, grads = _adaptive_trajectory(divergence, scales)
  flat_divergence, unravel = jax.flatten_util.ravel_pytree(divergence)
  gradient = flat(_stream(unravel(flat_divergence), iterates, grads, scales, 'implicit')[2])
  objective = jax.jit(lambda x: _stream(unravel(x), iterates, grads, scales, 'statistics',
                                        meta_gradient=False)[0])
  rng = np.random.default_rng(0)
  for _ in range(3):
    direction = rng.standard_normal(flat_divergence.shape)
    direction /= np.linalg.norm(direction)
    h = 1e-5
    fd = (objective(flat_divergence + h * direction)
          - objective(flat_divergence - h * direction)) / (2 * h)
    np.testing.assert_allclose(gradient @ direction, float(fd), rtol=1e-7, atol=1e-10)


def test_unit_scales_give_the_frozen_bound(x64):
  divergence = _divergence(STRUCTURES[0], seed=11, dtype=jnp.float64)
  scales = np.ones(4)
  params_seq, grads_seq, _, _ = _adaptive_trajectory(divergence, scales)
  value, grad = jax.value_and_grad(bound.adaptive_regret_bound)(divergence, params_seq,
                                                                grads_seq, scales)
  expected, expected_grad = jax.value_and_grad(bound.regret_bound)(divergence, params_seq,
                                                                   grads_seq)
  np.testing.assert_allclose(float(value), float(expected), rtol=1e-12)
  np.testing.assert_allclose(flat(grad), flat(expected_grad), rtol=1e-10, atol=1e-14)


def test_adaptive_bound_rejects_scales_of_the_wrong_length(x64):
  divergence = _divergence(STRUCTURES[0])
  params_seq, grads_seq, _, _ = _adaptive_trajectory(divergence, np.ones(3))
  with pytest.raises(ValueError, match=r'scales must have shape \(T,\) = \(3,\)'):
    bound.adaptive_regret_bound(divergence, params_seq, grads_seq, np.ones(4))


# ---------------------------------------------------------------------------
# The rollout and the objective.
# ---------------------------------------------------------------------------


def _task_setup(dtype=jnp.float64):
  task = quadratic_task(dtype=dtype)
  divergence = well_conditioned(metamd_jax.init_divergence(task.init(), 0.1, dtype=dtype),
                                seed=0, noise=0.3)
  return task, jax.tree.map(lambda x: 2.0 * x, divergence)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
def test_rollout_takes_the_steps_of_the_transform(x64, dtype):
  task, divergence = _task_setup(dtype)
  num_steps, reference_norm = 12, 0.2
  result = inner_loop.adaptive_rollout(divergence, task, num_steps, reference_norm, decay=0.8,
                                       return_trajectory=True)
  optimizer = metamd_jax.adaptive_metamd(divergence, reference_norm, decay=0.8)
  params, state = task.init(), optimizer.init(task.init())
  rtol = 1e-12 if dtype == jnp.float64 else 1e-5
  for t in range(num_steps):
    iterate = jax.tree.map(lambda x, t=t: x[t], result.trajectory[0])
    chex.assert_trees_all_close(iterate, params, rtol=rtol, atol=rtol * 1e-2)
    grads = jax.grad(task.loss)(params, task.batch(t))
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(result.scales[t], state[0].scale, rtol=rtol)
  chex.assert_trees_all_close(result.final_params, params, rtol=rtol, atol=rtol * 1e-2)
  assert float(result.scales[0]) > 1.0 and np.all(np.diff(result.scales) >= 0)
  assert np.any(np.diff(result.scales) > 0)


@pytest.mark.parametrize('adjoint', ('implicit', 'statistics'))  # 'auto' is one of these
def test_rollout_meta_gradient_equals_the_stored_bound(x64, adjoint):
  task, divergence = _task_setup()
  streamed = inner_loop.adaptive_rollout(divergence, task, 8, 0.2, meta_gradient=True,
                                         return_trajectory=True, adjoint=adjoint)
  value, grad = jax.value_and_grad(bound.adaptive_regret_bound)(
      divergence, *streamed.trajectory, streamed.scales)
  np.testing.assert_allclose(float(streamed.bound), float(value), rtol=1e-12)
  np.testing.assert_allclose(flat(streamed.meta_grad), flat(grad), rtol=1e-10, atol=1e-14)
  result = objectives.meta_gradient(divergence, task, 8, objective='adaptive_bound',
                                    reference_norm=0.2, adjoint=adjoint)
  np.testing.assert_allclose(float(result.loss), float(value), rtol=1e-12)
  np.testing.assert_allclose(flat(result.grad), flat(grad), rtol=1e-10, atol=1e-14)


def test_never_adapting_rollout_is_the_frozen_rollout(x64):
  task, divergence = _task_setup()
  adaptive_result = inner_loop.adaptive_rollout(divergence, task, 6, None, meta_gradient=True)
  frozen = inner_loop.rollout(divergence, task, 6, meta_gradient=True)
  np.testing.assert_array_equal(adaptive_result.scales, np.ones(6))
  np.testing.assert_allclose(flat(adaptive_result.final_params), flat(frozen.final_params),
                             rtol=1e-13)
  np.testing.assert_allclose(float(adaptive_result.bound), float(frozen.bound), rtol=1e-12)
  np.testing.assert_allclose(flat(adaptive_result.meta_grad), flat(frozen.meta_grad),
                             rtol=1e-10, atol=1e-14)


def test_adaptive_rollout_memory_does_not_store_the_trajectory():
  task, divergence = _task_setup(jnp.float32)
  jaxpr = jax.make_jaxpr(
      lambda d: inner_loop.adaptive_rollout(d, task, 50, 0.2, meta_gradient=True))(divergence)
  scan = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan'][0]
  stacked = [v.aval.shape for v in scan.outvars if v.aval.shape[:1] == (50,)]
  assert stacked == [(50,), (50,)]  # losses and scales


def test_reference_norm_belongs_to_the_adaptive_objective():
  task, divergence = _task_setup(jnp.float32)
  with pytest.raises(ValueError, match="option of objective='adaptive_bound'"):
    objectives.meta_gradient(divergence, task, 3, objective='bound', reference_norm=1.0)


def test_meta_step_takes_the_adaptive_objective_through_solver_options():
  family = QuadraticFamily()
  divergence = metamd_jax.init_divergence(family.init_params(), 0.2)
  optimizer = optax.adam(0.05)
  state = meta_train.init_state(divergence, optimizer)
  options = {'reference_norm': 0.5, 'decay': 0.8}
  step = jax.jit(meta_train.make_meta_step(family, optimizer, num_steps=5,
                                           objective='adaptive_bound',
                                           solver_options=options))
  task_params = meta_train.sample_tasks(family, jax.random.key(0), 0, 4)
  new_state, metrics = step(state, task_params)
  grads = [objectives.meta_gradient(divergence, family.task(jax.tree.map(lambda x, i=i: x[i],
                                                                         task_params)), 5,
                                    objective='adaptive_bound', **options).grad
           for i in range(4)]
  mean_grad = jax.tree.map(lambda *g: sum(g) / 4, *grads)
  updates, _ = optimizer.update(mean_grad, optimizer.init(divergence), divergence)
  expected = optax.apply_updates(divergence, updates)
  chex.assert_trees_all_close(new_state.divergence, expected, rtol=1e-5, atol=1e-7)
  assert np.isfinite(float(metrics['meta_loss']))


# ---------------------------------------------------------------------------
# Calibration and robustness.
# ---------------------------------------------------------------------------


def test_reference_gradient_norm_is_the_peak_level_over_tasks():
  family = ScaledLeastSquares()
  unit = well_conditioned(metamd_jax.init_divergence(family.init_params(), 1.0), seed=1,
                          noise=0.3)
  task_params = family.sample_batch(jax.random.key(1), 5)
  with pytest.raises(ValueError, match='diverges on 5 of 5 calibration tasks'):
    metamd_jax.reference_gradient_norm(unit, family, task_params, 100)  # steps ~ 1: diverge
  # A NaN factor is named as such, not as runs that diverge.
  with pytest.raises(ValueError, match='non-finite meta-parameters'):
    metamd_jax.reference_gradient_norm(jax.tree.map(lambda x: x * jnp.nan, unit), family,
                                       task_params, 100)
  divergence = divergence_lib.scale_steps(unit, 0.05)
  metric = dense_block_metric(divergence)
  decay, num_steps = 0.9, 20
  trajectory = jax.jit(lambda tp: inner_loop.rollout(
      divergence, family.task(tp), num_steps, return_trajectory=True).trajectory[1])
  peaks = []
  for i in range(5):
    grads_seq = trajectory(jax.tree.map(lambda x, i=i: x[i], task_params))
    average, peak = 0.0, 0.0
    for t in range(num_steps):
      g = flat(jax.tree.map(lambda x, t=t: x[t], grads_seq))
      average = decay * average + (1 - decay) * (g @ np.linalg.solve(metric, g))
      peak = max(peak, math.sqrt(average / (1 - decay ** (t + 1))))
    peaks.append(peak)
  values = {quantile: metamd_jax.reference_gradient_norm(
      divergence, family, task_params, num_steps, quantile=quantile, decay=decay)
            for quantile in (1.0, 0.5)}
  for quantile, value in values.items():
    np.testing.assert_allclose(value, np.quantile(peaks, quantile), rtol=1e-4)
  # With the largest peak, the adaptive optimiser is frozen MetaMD on every calibration task.
  reference_norm = values[1.0]
  scales = jax.jit(jax.vmap(lambda tp: inner_loop.adaptive_rollout(
      divergence, family.task(tp), num_steps, reference_norm * (1 + 1e-5)).scales))(task_params)
  np.testing.assert_array_equal(scales, np.ones((5, num_steps)))
  with pytest.raises(ValueError, match='quantile'):
    metamd_jax.reference_gradient_norm(divergence, family, task_params, 5, quantile=1.5)


def test_require_training_rejects_runs_that_end_above_their_start():
  """With ``require_training`` (the default) the levels are those of runs that train: the
  same value where each run's first-batch loss falls (checked here against the runs
  themselves), an error where a finite run ends above it."""
  family = ScaledLeastSquares()
  unit = well_conditioned(metamd_jax.init_divergence(family.init_params(), 1.0), seed=1,
                          noise=0.3)
  task_params = family.sample_batch(jax.random.key(1), 3)

  def first_batch_losses(divergence, num_steps):
    out = []
    for i in range(3):
      task = family.task(jax.tree.map(lambda x, i=i: x[i], task_params))
      final, _ = metamd_jax.evaluation.train(metamd_jax.metamd(divergence), task, num_steps)
      out.append((float(task.loss(task.init(), task.batch(0))),
                  float(task.loss(final, task.batch(0)))))
    return np.array(out)

  trains = divergence_lib.scale_steps(unit, 0.05)
  losses = first_batch_losses(trains, 10)
  assert np.all(losses[:, 1] < losses[:, 0])
  assert metamd_jax.reference_gradient_norm(trains, family, task_params, 10) == (
      metamd_jax.reference_gradient_norm(trains, family, task_params, 10,
                                         require_training=False))
  grows = divergence_lib.scale_steps(unit, 1.0)
  losses = first_batch_losses(grows, 10)
  above = int(np.sum(losses[:, 1] >= losses[:, 0]))
  assert above >= 1 and np.all(np.isfinite(losses))
  assert math.isfinite(metamd_jax.reference_gradient_norm(grows, family, task_params, 10,
                                                         require_training=False))
  with pytest.raises(ValueError, match=f'initial loss .* on {above} of 3 calibration tasks'):
    metamd_jax.reference_gradient_norm(grows, family, task_params, 10)  # the default
  with pytest.raises(TypeError, match='require_training'):
    metamd_jax.reference_gradient_norm(trains, family, task_params, 10, require_training=1)


def test_adaptive_step_survives_an_input_scale_where_frozen_metamd_diverges():
  """A divergence stable at input scale 1 diverges at scale 3 (curvature x 9); calibrated
  on scale-1 meta-training tasks only, the adaptive optimiser trains on a held-out task
  at scale 3."""
  num_steps = 100
  train_family, test_family = ScaledLeastSquares(1.0), ScaledLeastSquares(3.0)
  divergence = well_conditioned(metamd_jax.init_divergence(train_family.init_params(), 1.0),
                                seed=2, noise=0.1)
  # Set the steps so that eta * lambda_max(M^{-1} H) = 0.7 on the full data at scale 1.
  x, _ = train_family.data(train_family.sample(jax.random.key(0)))
  aug = np.concatenate([np.asarray(x, np.float64), np.ones((x.shape[0], 1))], axis=1)
  hessian_rows = aug.T @ aug / x.shape[0]  # over the rows of [W; b]
  eig = lambda m: np.max(np.linalg.eigvals(np.linalg.solve(
      dense_block_metric(m), _least_squares_hessian(hessian_rows))).real)
  divergence = divergence_lib.scale_steps(divergence, 0.7 / eig(divergence))
  assert eig(divergence) < 1.0

  reference_norm = metamd_jax.reference_gradient_norm(
      divergence, train_family, train_family.sample_batch(jax.random.key(1), 8), num_steps)
  held_out = train_family.sample(jax.random.key(99))

  def final_loss(family, optimizer):
    task = family.task(held_out)

    def step(carry, t):
      params, state = carry
      grads = jax.grad(task.loss)(params, task.batch(t))
      updates, state = optimizer.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    params = task.init()
    (params, state), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                      jnp.arange(num_steps))
    initial = task.evaluate(task.init())['train_loss']
    return float(initial), float(task.evaluate(params)['train_loss']), state

  initial, frozen, _ = final_loss(train_family, metamd_jax.metamd(divergence))
  assert frozen < 0.1 * initial  # stable in distribution
  initial, adapted, state = final_loss(train_family,
                                       metamd_jax.adaptive_metamd(divergence, reference_norm))
  assert adapted < 0.1 * initial and float(state[0].scale) < 1.5

  initial, frozen, _ = final_loss(test_family, metamd_jax.metamd(divergence))
  assert not (np.isfinite(frozen) and frozen < initial)  # frozen MetaMD diverges
  initial, adapted, state = final_loss(test_family,
                                       metamd_jax.adaptive_metamd(divergence, reference_norm))
  assert np.isfinite(adapted) and adapted < 0.1 * initial
  assert float(state[0].scale) > 2.0


def _least_squares_hessian(rows):
  """Hessian of ``1/2 mean ||[x, 1] [W; b] - y||^2`` over the leaves ``b``, ``w``
  flattened in the divergence's leaf order (``b`` then ``w``, row-major)."""
  d = rows.shape[0] - 1
  outputs = 4
  hessian_w = np.kron(rows[:d, :d], np.eye(outputs))
  hessian_b = rows[d, d] * np.eye(outputs)
  cross = np.kron(rows[d:, :d], np.eye(outputs))  # (outputs, d * outputs)
  return np.block([[hessian_b, cross], [cross.T, hessian_w]])


# ---------------------------------------------------------------------------
# One scale per leaf.
# ---------------------------------------------------------------------------


def _numpy_per_leaf_rule(metric, sizes, grads_list, levels, decay):
  """Float64 reference of the per-leaf rule: each leaf's block of the dense metric, its
  own EMA, bias correction, running maximum and division."""
  ends = np.cumsum(sizes)
  starts = ends - sizes
  average, scale = np.zeros(len(sizes)), np.ones(len(sizes))
  updates, scales = [], []
  for t, grads in enumerate(grads_list, start=1):
    g = flat(grads)
    direction = np.linalg.solve(metric, g)
    update = np.empty_like(g)
    for leaf, (a, b) in enumerate(zip(starts, ends)):
      norm = g[a:b] @ direction[a:b]  # the metric is block diagonal over the leaves
      average[leaf] = decay * average[leaf] + (1 - decay) * norm
      scale[leaf] = max(scale[leaf], math.sqrt(average[leaf] / (1 - decay ** t)) / levels[leaf])
      update[a:b] = -direction[a:b] / scale[leaf]
    updates.append(update)
    scales.append(scale.copy())
  return updates, np.array(scales), average


@pytest.mark.parametrize('options', [STRUCTURES[0], STRUCTURES[2]])
def test_per_leaf_updates_equal_a_numpy_loop_of_the_rule(x64, options):
  divergence = _divergence(options, seed=2, dtype=jnp.float64)
  metric = dense_block_metric(divergence)
  params = _tree(1)
  sizes = [x.size for x in jax.tree.leaves(params)]
  # Only the 'w' leaf's gradients grow: only its scale may move.
  grads_list = [{k: v * (1.8 ** t if k == 'w' else 1.0) for k, v in _tree(20 + t).items()}
                for t in range(8)]
  first = flat(grads_list[0])
  direction = np.linalg.solve(metric, first)
  ends = np.cumsum(sizes)
  levels = [2.0 * math.sqrt(first[e - n:e] @ direction[e - n:e]) for n, e in zip(sizes, ends)]
  expected, scales, average = _numpy_per_leaf_rule(metric, sizes, grads_list, levels, 0.9)
  w = [i for i, k in enumerate(sorted(SHAPES)) if k == 'w'][0]  # leaves in key order
  assert scales[-1][w] > 2.0 and np.all(np.delete(scales[-1], w) == 1.0)

  optimizer = metamd_jax.adaptive_metamd(divergence, levels, decay=0.9, per_leaf=True)
  state = optimizer.init(params)
  for t, grads in enumerate(grads_list):
    updates, state = optimizer.update(grads, state, params)
    # Float64 rounding of a dense solve against the Kronecker one: relative to the
    # update's largest entry (a small entry can lose digits to cancellation).
    np.testing.assert_allclose(flat(updates), expected[t], rtol=1e-12,
                               atol=1e-14 * np.abs(expected[t]).max())
    np.testing.assert_allclose(np.asarray(state[0].scale), scales[t], rtol=1e-13)
  np.testing.assert_allclose(np.asarray(state[0].norm_average), average, rtol=1e-12)
  # The global scale, with the same gradients, shortens every leaf's step.
  global_state = metamd_jax.adaptive_metamd(divergence, float(np.sqrt(np.sum(
      np.square(levels)))), decay=0.9)
  _, global_final = _updates(global_state, grads_list, params)
  assert float(global_final[0].scale) > 1.0


def test_per_leaf_with_one_level_for_all_and_never_adapting():
  params = _tree(1)
  grads_list = [_tree(10 + t, scale=3.0 ** t) for t in range(6)]
  divergence = _divergence(STRUCTURES[1], seed=1, dtype=jnp.float32)
  reference, _ = _updates(metamd_jax.metamd(divergence), grads_list, params)
  for levels in (None, math.inf, (math.inf,) * len(SHAPES), 1e30):
    ours, state = _updates(metamd_jax.adaptive_metamd(divergence, levels, per_leaf=True),
                           grads_list, params)
    for a, b in zip(ours, reference):
      chex.assert_trees_all_close(a, b, rtol=1e-6, atol=0)
    assert state[0].scale.shape == (len(SHAPES),) and np.all(np.asarray(state[0].scale) == 1)
  # One number: the same level for every leaf.
  one, state_one = _updates(metamd_jax.adaptive_metamd(divergence, 0.5, per_leaf=True),
                            grads_list, params)
  many, state_many = _updates(metamd_jax.adaptive_metamd(
      divergence, (0.5,) * len(SHAPES), per_leaf=True), grads_list, params)
  for a, b in zip(one, many):
    chex.assert_trees_all_equal(a, b)
  assert np.all(np.asarray(state_one[0].scale) > 1)


@pytest.mark.parametrize('levels, error, match', [
    ((1.0, 0.0, 1.0), ValueError, r'entries \[1\] are not positive'),
    ((1.0, float('nan'), 1.0), ValueError, r'entries \[1\] are not positive'),
    (np.ones((3, 1)), ValueError, 'non-empty 1-D'),
    ((), ValueError, 'non-empty 1-D'),
    (('a', 1.0, 1.0), TypeError, 'one positive float per leaf'),
])
def test_bad_per_leaf_levels_are_named(levels, error, match):
  with pytest.raises(error, match=match):
    metamd_jax.adaptive_metamd(_divergence(), levels, per_leaf=True)


def test_per_leaf_levels_must_match_the_leaves():
  optimizer = metamd_jax.adaptive_metamd(_divergence(), (1.0, 2.0), per_leaf=True)
  with pytest.raises(ValueError, match='2 levels for 3 parameter leaves'):
    optimizer.init(_tree(1))
  with pytest.raises(TypeError, match='per_leaf must be True or False'):
    metamd_jax.adaptive_metamd(_divergence(), 1.0, per_leaf=1)


def test_per_leaf_reference_is_each_leafs_peak_level():
  family = ScaledLeastSquares()
  divergence = divergence_lib.scale_steps(well_conditioned(
      metamd_jax.init_divergence(family.init_params(), 1.0), seed=1, noise=0.3), 0.05)
  metric = dense_block_metric(divergence)
  task_params = family.sample_batch(jax.random.key(1), 3)
  decay, num_steps = 0.9, 20
  trajectory = jax.jit(lambda tp: inner_loop.rollout(
      divergence, family.task(tp), num_steps, return_trajectory=True).trajectory[1])
  sizes = [x.size for x in jax.tree.leaves(family.init_params())]
  ends = np.cumsum(sizes)
  peaks = []
  for i in range(3):
    grads_seq = trajectory(jax.tree.map(lambda x, i=i: x[i], task_params))
    average, peak = np.zeros(len(sizes)), np.zeros(len(sizes))
    for t in range(num_steps):
      g = flat(jax.tree.map(lambda x, t=t: x[t], grads_seq))
      direction = np.linalg.solve(metric, g)
      norms = np.array([g[e - n:e] @ direction[e - n:e] for n, e in zip(sizes, ends)])
      average = decay * average + (1 - decay) * norms
      peak = np.maximum(peak, np.sqrt(average / (1 - decay ** (t + 1))))
    peaks.append(peak)
  levels = metamd_jax.reference_gradient_norm(divergence, family, task_params, num_steps,
                                              decay=decay, per_leaf=True)
  assert isinstance(levels, tuple) and len(levels) == len(sizes)
  np.testing.assert_allclose(levels, np.max(peaks, axis=0), rtol=1e-4)
  # Calibrated on its own tasks, no leaf adapts there: exactly frozen MetaMD.
  optimizer = metamd_jax.adaptive_metamd(divergence, tuple(c * (1 + 1e-5) for c in levels),
                                         decay=decay, per_leaf=True)
  curves = evaluation.run(optimizer, family, task_params, num_steps)
  frozen = evaluation.run(metamd_jax.metamd(divergence), family, task_params, num_steps)
  np.testing.assert_allclose(curves.losses, frozen.losses, rtol=1e-6)
