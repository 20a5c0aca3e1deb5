"""Blended MetaMD: the rule against a float64 numpy loop, the metric's monotonicity and
the regret bound against dense matrices, and what the online half adds."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_block_metric, flat
from helpers import quadratic_task, well_conditioned
from statistics_reference import (
  factored_denominator,
  factored_statistics,
  kronecker_inverse,
  kronecker_roots,
  peak_statistics,
  random_divergence,
  tree,
)

import metamd_jax
from metamd_jax import statistics


def _numpy_run(metric, grads_list, reference_norm, decay, blend_rate, epsilon):
  """Float64 reference: adaptive scale (EMA, bias correction, running max) plus the online
  direction; returns the updates, the scales and the diagonals of ``K_t``."""
  average, scale, updates, scales, denominators = 0.0, 1.0, [], [], []
  inverse = np.linalg.inv(metric)
  for t, grads in enumerate(grads_list, start=1):
    g = flat(grads)
    learned = inverse @ g
    average = decay * average + (1 - decay) * (g @ learned)
    scale = max(scale, math.sqrt(average / (1 - decay ** t)) / reference_norm)
    denominator = factored_denominator(*factored_statistics(grads_list[:t]), epsilon)
    updates.append(-(learned + blend_rate * g / denominator) / scale)
    scales.append(scale)
    denominators.append(denominator)
  return updates, np.array(scales), denominators


def test_zero_blend_rate_is_adaptive_metamd():
  params = tree(1, dtype=jnp.float32)
  grads_list = [tree(10 + t, scale=2.0 ** t, dtype=jnp.float32) for t in range(5)]
  divergence = random_divergence(seed=1, dtype=jnp.float32)
  levels = (1.0, 2.0, 3.0, 4.0)
  ours = metamd_jax.blended_metamd(divergence, levels, 0.0, 0.5, per_leaf=True)
  reference = metamd_jax.adaptive_metamd(divergence, levels, 0.5, per_leaf=True)
  ours_state, reference_state = ours.init(params), reference.init(params)
  for grads in grads_list:
    a, ours_state = jax.jit(ours.update)(grads, ours_state, params)
    b, reference_state = jax.jit(reference.update)(grads, reference_state, params)
    chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(ours_state[0].adaptive, reference_state[0])
  # No online statistics are kept at rate 0 (they would not move the step).
  assert isinstance(ours_state[0].statistics, optax.EmptyState)


@pytest.mark.parametrize('structure', ['kronecker', 'diagonal'])
def test_updates_equal_a_numpy_loop_of_the_rule(x64, structure):
  divergence = random_divergence(seed=2, dtype=jnp.float64, structure=structure)
  metric = dense_block_metric(divergence)
  params = tree(1)
  grads_list = [tree(20 + t, scale=1.6 ** t) for t in range(8)]  # growing gradients
  first = flat(grads_list[0])
  reference_norm = 3.0 * math.sqrt(first @ np.linalg.solve(metric, first))
  blend_rate, epsilon, decay = 0.3, 1e-3, 0.9
  expected, scales, _ = _numpy_run(metric, grads_list, reference_norm, decay, blend_rate,
                                   epsilon)
  assert scales[0] == 1.0 and scales[-1] > 2.0  # the learned half adapts along the way

  optimizer = metamd_jax.blended_metamd(divergence, reference_norm, blend_rate, decay=decay,
                                        epsilon=epsilon)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for t, grads in enumerate(grads_list):
    updates, state = update(grads, state, params)
    # float64; a sum of two directions that may nearly cancel: rtol 1e-10.
    np.testing.assert_allclose(flat(updates), expected[t], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(float(state[0].adaptive.scale), scales[t], rtol=1e-13)
  # The statistics are the diagonals of Shampoo's sum G G^T and sum G^T G (leaf as matrix).
  rows, columns = factored_statistics(grads_list)
  for ours, want in zip(jax.tree.leaves(state[0].statistics.rows), rows):
    np.testing.assert_allclose(ours, want, rtol=1e-12)
  for ours, want in zip(jax.tree.leaves(state[0].statistics.columns), columns):
    np.testing.assert_allclose(ours, want, rtol=1e-12)
  w = np.asarray(grads_list[0]['w'], np.float64)
  np.testing.assert_allclose(np.diag(w @ w.T), factored_statistics(grads_list[:1])[0][3])


def test_state_is_the_adaptive_state_and_one_row_and_column_per_leaf():
  params = tree(1, dtype=jnp.float32)
  state = metamd_jax.scale_by_blended_mirror_descent(random_divergence(), 1.0, 0.1).init(params)
  assert isinstance(state, metamd_jax.ScaleByBlendedMirrorDescentState)
  shapes = {k: (v.shape, state.statistics.columns[k].shape)
            for k, v in state.statistics.rows.items()}
  assert shapes == {'w': ((4,), (3,)), 'b': ((), (3,)), 'conv': ((2, 2, 2), (3,)),
                    'scalar': ((), ())}
  assert all(float(jnp.sum(x)) == 0 for x in jax.tree.leaves(state.statistics))


@pytest.mark.parametrize(
    'per_leaf, statistics, online_power, block_size, overshoot, refresh_growth, cap', [
        (False, 'sum', 1.0, None, None, None, None), (True, 'sum', 1.0, None, None, None, None),
        (True, 'peak_average', 1.0, None, None, None, None),
        (True, 'kronecker', 1.0, None, None, None, None),
        (True, 'kronecker', 0.5, None, None, None, None),
        (True, 'sum', 0.0, None, None, None, None), (True, 'kronecker', 0.5, 2, None, None, None),
        (True, 'kronecker', 0.5, None, 0.5, None, None),
        (True, 'sum', 1.0, None, 0.0, None, None),
        (True, 'kronecker', 0.5, None, 0.5, 0.05, None),
        (True, 'kronecker', 0.5, None, 0.5, None, 1.2)])
def test_metric_never_decreases_and_the_regret_bound_holds(x64, per_leaf, statistics,
                                                           online_power, block_size,
                                                           overshoot, refresh_growth, cap):
  """Least squares (convex), dense ``M_t = s_t (M^{-1} + eta K_t^{-1})^{-1}`` (per leaf:
  block by block): each ``M_t - M_{t-1}`` is positive semi-definite, and the regret
  against the minimiser is below the adaptive-mirror-descent bound, itself below the
  closed-form bound (AdaGrad's, for running diagonal sums); with Shampoo's statistics the
  online half is dense and its roots partly stale. With ``online_power = p`` the online
  half is divided by ``s_t^p``: ``M_t = (M^{-1} / s_t + eta K_t^{-1} / s_t^p)^{-1}``;
  with ``block_size=2`` the 4-row side of ``w`` keeps two diagonal blocks. With the
  overshoot check (learned steps three times as long, so that they pass the minimum) the
  learned half is divided by ``sigma_t`` per leaf too:
  ``M_t = (M^{-1} / (s_t sigma_t) + eta K_t^{-1} / s_t^p)^{-1}``. With ``refresh_growth``
  the roots are also refreshed off the schedule, leaf by leaf. With ``overshoot_cap``
  ``sigma_t`` stops at the cap."""
  task = quadratic_task(dims=(4, 3), seed=3, dtype=jnp.float64)
  params = task.init()
  learning_rate = 0.2 if overshoot is None else 0.6
  divergence = well_conditioned(
      metamd_jax.init_divergence(params, learning_rate, dtype=jnp.float64), seed=3, noise=0.3)
  metric = dense_block_metric(divergence)
  inverse = np.linalg.inv(metric)
  blend_rate, epsilon, num_steps = 0.05, 1e-8, 40
  grad0 = flat(jax.grad(task.loss)(params, task.batch(jnp.asarray(0))))
  reference_norm = 0.3 * math.sqrt(grad0 @ inverse @ grad0)  # adapts from the first step
  refresh_every = 3  # 'kronecker': stale roots at steps 5, 6, 8, 9, ...
  optimizer = metamd_jax.blended_metamd(divergence, reference_norm, blend_rate, epsilon=epsilon,
                                        per_leaf=per_leaf, statistics=statistics,
                                        refresh_every=refresh_every,
                                        online_power=online_power, block_size=block_size,
                                        overshoot_decay=overshoot,
                                        refresh_growth=refresh_growth, overshoot_cap=cap)
  sizes = [3, 12]  # leaves b, then w: a scale per leaf repeats over its coordinates
  state = optimizer.init(params)
  update, gradient = jax.jit(optimizer.update), jax.jit(jax.grad(task.loss))
  thetas, grads_list, scales, sigmas = [], [], [], []
  for t in range(num_steps):
    grads = gradient(params, task.batch(jnp.asarray(t)))
    thetas.append(flat(params))
    grads_list.append(grads)
    updates, state = update(grads, state, params)
    scales.append(np.repeat(np.broadcast_to(np.asarray(state[0].adaptive.scale), 2), sizes))
    sigmas.append(np.ones(15) if overshoot is None
                  else np.repeat(np.asarray(state[0].overshoot.scale, np.float64), sizes))
    params = optax.apply_updates(params, updates)
  assert scales[-1].max() > 1.5  # the learned half adapted
  if overshoot is not None:
    if cap is None:
      assert sigmas[-1].max() > 1.5  # the check shortened it
    else:  # the check reached its cap and stayed there
      assert sigmas[-1].max() == pytest.approx(cap) and np.all(sigmas[-1] <= cap * (1 + 1e-7))
    assert all(np.all(b >= a) for a, b in zip(sigmas, sigmas[1:]))

  # The comparator u: the least-squares minimiser of the losses seen (the batches cycle
  # through the task's 32 rows with period 4), in numpy; leaves in order: b, then w.
  x, y = (np.concatenate(parts) for parts in zip(*(
      [np.asarray(a, np.float64) for a in task.batch(jnp.asarray(t))] for t in range(4))))
  solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
  u = np.concatenate([solution[-1], solution[:-1].ravel()])

  thetas.append(flat(params))
  metrics, inverses, regret = [], [], 0.0
  roots = kronecker_roots(grads_list, refresh_every, epsilon, 1e-4, block_size=block_size,
                           refresh_growth=refresh_growth)
  if refresh_growth is not None:  # some refreshes were off the schedule
    scheduled = kronecker_roots(grads_list, refresh_every, epsilon, 1e-4)
    assert any(not np.array_equal(a[0][0], b[0][0]) for a, b in zip(roots, scheduled))
  for t in range(num_steps):
    if statistics == 'kronecker':
      online = kronecker_inverse(roots[t])
    else:
      rows, columns = (factored_statistics(grads_list[:t + 1]) if statistics == 'sum'
                       else peak_statistics(grads_list[:t + 1], 0.99))
      online = np.diag(1 / factored_denominator(rows, columns, epsilon))
    inverse_t = (inverse / (scales[t] * sigmas[t])[:, None]  # block diagonal
                 + blend_rate * online / scales[t][:, None] ** online_power)
    # The step is mirror descent with the metric M_t.
    np.testing.assert_allclose(thetas[t + 1] - thetas[t], -inverse_t @ flat(grads_list[t]),
                               rtol=1e-10, atol=1e-14)
    inverses.append(inverse_t)
    metrics.append(np.linalg.inv(inverse_t))
    regret += flat(grads_list[t]) @ (thetas[t] - u)
  for before, after in zip(metrics, metrics[1:]):
    assert np.linalg.eigvalsh(after - before).min() > -1e-9 * np.abs(after).max()

  d = [thetas[t] - u for t in range(num_steps)]
  adaptive_bound = 0.5 * d[0] @ metrics[0] @ d[0]
  adaptive_bound += 0.5 * sum(d[t] @ (metrics[t] - metrics[t - 1]) @ d[t]
                              for t in range(1, num_steps))
  adaptive_bound += 0.5 * sum(flat(g) @ m @ flat(g) for g, m in zip(grads_list, inverses))
  assert regret <= adaptive_bound
  if statistics != 'sum' or online_power != 1 or overshoot is not None:
    return

  adagrad = np.sqrt(sum(flat(g) ** 2 for g in grads_list)) + epsilon
  # (m n)^(1/4) per coordinate: leaves b (one row of 3) and w (4 x 3).
  leaf_factor = np.concatenate([np.full(3, 3 ** 0.25), np.full(12, 12 ** 0.25)])
  diameter = max(np.sum(x ** 2) for x in d)
  closed_form = (0.5 * scales[-1].max() * np.trace(metric) * diameter
                 + 0.5 * sum(flat(g) @ (inverse / s[:, None]) @ flat(g)
                             for g, s in zip(grads_list, scales))
                 + blend_rate * np.sum(leaf_factor * adagrad))
  assert adaptive_bound <= closed_form


def test_online_half_trains_where_the_learned_steps_are_too_short():
  task = quadratic_task(dims=(4, 3), seed=4)
  params = task.init()
  too_short = metamd_jax.init_divergence(params, 1e-6)

  def final_loss(optimizer, num_steps=60):
    def body(carry, step):
      p, s = carry
      updates, s = optimizer.update(jax.grad(task.loss)(p, task.batch(step)), s, p)
      return (optax.apply_updates(p, updates), s), None

    (p, _), _ = jax.lax.scan(body, (params, optimizer.init(params)), jnp.arange(num_steps))
    return float(sum(task.loss(p, task.batch(jnp.asarray(t))) for t in range(4)))

  initial = final_loss(optax.sgd(0.0))
  best = final_loss(optax.sgd(0.1), num_steps=600)  # about the minimum
  frozen = final_loss(metamd_jax.metamd(too_short))
  blend = final_loss(metamd_jax.blended_metamd(too_short, None, blend_rate=0.1))
  assert frozen - best > 0.99 * (initial - best)
  assert blend - best < 0.1 * (initial - best)


@pytest.mark.parametrize('value, error', [
    (-0.1, ValueError), (float('nan'), ValueError), (math.inf, ValueError),
    (True, TypeError), ('0.1', TypeError), (None, TypeError)])
def test_bad_blend_rate_is_named(value, error):
  with pytest.raises(error, match='blend_rate'):
    metamd_jax.blended_metamd(random_divergence(), 1.0, value)


def test_bad_statistics_and_decay_are_named():
  with pytest.raises(ValueError, match='statistics'):
    metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, statistics='mean')
  with pytest.raises(ValueError, match='decay'):
    statistics.scale_by_factored_statistics(statistics='peak_average', decay=1.0)


@pytest.mark.parametrize('value, error', [(-0.5, ValueError), (1.5, ValueError),
                                          (float('nan'), ValueError), (True, TypeError),
                                          ('1', TypeError)])
def test_bad_online_power_is_named(value, error):
  with pytest.raises(error, match='online_power'):
    metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, online_power=value)


def test_bad_levels_and_learning_rate_are_named():
  with pytest.raises(ValueError, match='reference_norm'):
    metamd_jax.blended_metamd(random_divergence(), -1.0, 0.1)
  with pytest.raises(ValueError, match='learning_rate'):
    metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, learning_rate=-1.0)


def test_keeps_the_parameter_dtype_and_accumulates_in_float32():
  params = {'w': jnp.ones((4, 3), jnp.bfloat16), 'b': jnp.ones((3,), jnp.bfloat16)}
  divergence = metamd_jax.init_divergence(params, 0.1)
  optimizer = metamd_jax.blended_metamd(divergence, (1.0, 1.0), 0.1, per_leaf=True)
  state = optimizer.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, state = jax.jit(optimizer.update)(grads, state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  statistics = state[0].statistics
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      (statistics.rows, statistics.columns, statistics.row_peaks, statistics.column_peaks)))
  assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('name, value', [
    ('refresh_every', 0), ('refresh_every', 2.0), ('max_dimension', 0),
    ('relative_epsilon', -1.0), ('relative_epsilon', float('nan')), ('block_size', 0),
    ('block_size', 2.0), ('block_size', True), ('refresh_growth', -0.1),
    ('refresh_growth', float('nan')), ('refresh_growth', True), ('refresh_growth', '1')])
def test_bad_kronecker_settings_are_named(name, value):
  with pytest.raises(ValueError, match=name):
    statistics.scale_by_kronecker_statistics(**{name: value})
  if name in ('refresh_every', 'max_dimension', 'block_size', 'refresh_growth'):
    with pytest.raises(ValueError, match=name):
      metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, statistics='kronecker',
                                **{name: value})
  if name in ('max_dimension', 'block_size'):  # checked whatever the statistics
    with pytest.raises(ValueError, match=name):
      metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, **{name: value})


def test_kronecker_half_keeps_the_parameter_dtype_and_accumulates_in_float32():
  params = {'w': jnp.ones((4, 3), jnp.bfloat16), 'b': jnp.ones((3,), jnp.bfloat16)}
  divergence = metamd_jax.init_divergence(params, 0.1)
  optimizer = metamd_jax.blended_metamd(divergence, (1.0, 1.0), 0.1, per_leaf=True,
                                        statistics='kronecker')
  state = optimizer.init(params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    updates, state = jax.jit(optimizer.update)(grads, state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].statistics[:4]))
  assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('statistics', ['sum', 'kronecker'])
def test_a_zero_size_leaf_leaves_the_others_updates_as_they_are(statistics):
  """A ``(0, 5)`` leaf: its update is empty and every other leaf's is the one it gets
  without it (before, Shampoo's statistics failed on the empty leaf's maximum)."""
  params = {'dense': jnp.ones((7, 3)), 'empty': jnp.zeros((0, 5))}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.1), params)
  dense = {'dense': params['dense']}

  def updates(params, grads):
    optimizer = metamd_jax.blended_metamd(metamd_jax.init_divergence(params, 0.1), 1.0, 0.1,
                                          statistics=statistics)
    state = optimizer.init(params)
    for _ in range(3):
      out, state = optimizer.update(grads, state, params)
    return out

  got = updates(params, grads)
  assert got['empty'].shape == (0, 5)
  np.testing.assert_array_equal(got['dense'], updates(dense, {'dense': grads['dense']})['dense'])

