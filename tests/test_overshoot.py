"""The overshoot check (:mod:`metamd_jax.overshoot`) in blended MetaMD: against float64
numpy loops of its rule, on a quadratic, and its settings' errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_block_metric, flat
from statistics_reference import (
  SHAPES,
  random_divergence,
  tree,
)

import metamd_jax
from metamd_jax import statistics


def test_overshoot_check_lands_on_the_minimum_of_a_quadratic():
  """``f = 1/2 sum_l h_l ||theta_l||^2`` with learned steps ``1.9 g``: on the leaf with
  ``h = 1`` the first step passes the minimum (``theta_2 = -0.9 theta_1``), the secant
  gives ``rho = -0.9`` and ``sigma = 1.9``, and the second step lands on it; on the leaf
  with ``h = 0.5`` the steps stop short (``rho = 0.05``) and are never lengthened."""
  curvature = {'a': 1.0, 'b': 0.5}
  params = {'a': jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), 'b': jnp.asarray([2.0, -1.0, 4.0])}
  divergence = metamd_jax.init_divergence(params, 1.9)
  optimizer = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.0)
  state = optimizer.init(params)
  theta = params
  for _ in range(2):
    grads = {k: curvature[k] * v for k, v in theta.items()}
    updates, state = optimizer.update(grads, state, theta)
    theta = optax.apply_updates(theta, updates)
  np.testing.assert_allclose(state[0].overshoot.scale, [1.9, 1.0], rtol=1e-6)
  np.testing.assert_allclose(theta['a'], 0.0, atol=1e-6)
  np.testing.assert_allclose(theta['b'], 0.05 ** 2 * params['b'], rtol=1e-5)


def _numpy_overshoot_loop(raw_directions, grads_list, decay, cap):
  """The overshoot check in float64 numpy: per step the directions ``-raw_t / sigma_t`` and
  ``sigma_t``, with ``rho_t`` from the moving averages of ``<g_t, d_{t-1}>`` and
  ``<g_{t-1}, d_{t-1}>`` per leaf (a leaf whose last direction had no slope keeps sigma),
  ``sigma_t = min(cap, sigma_{t-1} max(1, 1 - rho_t))`` (no cap: ``cap=None``)."""
  # Coordinates in the order of flat(): leaves sorted by name, as jax.tree.leaves.
  sizes = [int(np.prod(SHAPES[k])) for k in sorted(SHAPES)]
  parts = [slice(a, b) for a, b in zip(np.cumsum([0, *sizes]), np.cumsum(sizes))]
  sigma, after, before = np.ones(4), np.zeros(4), np.zeros(4)
  previous, slope, expected, sigmas = np.zeros(sum(sizes)), np.zeros(4), [], []
  for t, (raw, grads) in enumerate(zip(raw_directions, grads_list)):
    g = flat(grads)
    for leaf, part in enumerate(parts):
      if t:
        after[leaf] = decay * after[leaf] + (1 - decay) * g[part] @ previous[part]
        before[leaf] = decay * before[leaf] + (1 - decay) * slope[leaf]
        usable = before[leaf] > 0 and slope[leaf] > 0  # no slope: sigma kept
        rho = after[leaf] / before[leaf] if usable else 0.0
        sigma[leaf] *= max(1.0, 1.0 - rho)
        if cap is not None:
          sigma[leaf] = min(cap, sigma[leaf])
    direction = np.asarray(raw) / np.repeat(sigma, sizes)
    slope = np.array([g[part] @ direction[part] for part in parts])
    previous = direction
    expected.append(-direction)
    sigmas.append(sigma.copy())
  return expected, sigmas


@pytest.mark.parametrize('cap', [None, 1.3])
def test_overshoot_check_equals_a_numpy_loop(x64, cap):
  """The learned half with the check against a float64 numpy loop of ``rho``, ``sigma``
  and ``d_t = M^{-1} g_t / sigma_t`` (the learned half never adapts: no levels), on
  gradients that flip sign, shrink and vanish on one leaf; with a cap,
  ``sigma_t = min(cap, sigma_{t-1} max(1, 1 - rho_t))``."""
  divergence = random_divergence(seed=2, dtype=jnp.float64)
  metric = dense_block_metric(divergence)
  inverse = np.linalg.inv(metric)
  params = tree(1)
  rng = np.random.default_rng(5)
  grads_list = []
  for t in range(8):
    grads = tree(30 + t)
    if t % 2:  # partly flipped back along the last gradient
      grads = jax.tree.map(lambda g, h: g - 2.0 * h, grads, grads_list[-1])
    grads['scalar'] = jnp.zeros(()) if t >= 3 else grads['scalar']
    grads_list.append(jax.tree.map(lambda g: g * rng.uniform(0.5, 1.5), grads))
  decay = 0.5
  expected, sigmas = _numpy_overshoot_loop([inverse @ flat(g) for g in grads_list],
                                           grads_list, decay, cap)
  scalar = sorted(SHAPES).index('scalar')
  assert sigmas[-1][scalar] == sigmas[3][scalar]
  if cap is None:
    assert sigmas[-1].max() > 1.5
  else:  # the cap binds on some leaf, and not on every leaf from the start
    assert sigmas[-1].max() == cap and min(s.min() for s in sigmas) < cap

  optimizer = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=decay,
                                        overshoot_cap=cap)
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for t, grads in enumerate(grads_list):
    updates, state = update(grads, state, params)
    # The check's averages and sigma are float32 (one number per leaf).
    np.testing.assert_allclose(flat(updates), expected[t], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(state[0].overshoot.scale, sigmas[t], rtol=1e-5)


def test_overshoot_check_keeps_the_online_half_and_the_dtype():
  """With the check, the online half is added unchanged (the check divides the learned
  half alone), a bfloat16 leaf stays bfloat16 and its check accumulates in float32."""
  params = tree(1, dtype=jnp.float32)
  divergence = random_divergence(seed=1, dtype=jnp.float32)
  grads_list = [tree(40 + t) for t in range(4)]
  grads_list = [g if t % 2 == 0 else jax.tree.map(lambda x: -x, g)
                for t, g in enumerate(grads_list)]
  checked = metamd_jax.blended_metamd(divergence, None, 0.3, overshoot_decay=0.0)
  learned_only = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.0)
  online_only = statistics.scale_by_factored_statistics()
  states = [checked.init(params), learned_only.init(params), online_only.init(params)]
  for grads in grads_list:
    a, states[0] = checked.update(grads, states[0], params)
    b, states[1] = learned_only.update(grads, states[1], params)
    c, states[2] = online_only.update(grads, states[2], params)
    chex.assert_trees_all_close(a, jax.tree.map(lambda x, y: x - 0.3 * y, b, c), rtol=1e-5,
                                atol=1e-7)
  assert float(jnp.max(states[0][0].overshoot.scale)) > 1.5

  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  optimizer = metamd_jax.blended_metamd(
      metamd_jax.init_divergence(half, 0.1), None, 0.1, overshoot_decay=0.5)
  state = optimizer.init(half)
  for grads in grads_list:
    updates, state = optimizer.update(jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads),
                                      state, half)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].overshoot.previous))
  assert state[0].overshoot.scale.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(state[0].overshoot.scale)))


def test_a_non_finite_gradient_leaves_the_check_as_it_was():
  """A NaN gradient gives a NaN step, but the check's averages and sigma stay as they
  were, also at the next step (whose last direction is NaN). The other halves keep a
  non-finite gradient in their statistics: ``optax.apply_if_finite`` keeps it out."""
  params = {'w': jnp.ones((3, 2))}
  divergence = metamd_jax.init_divergence(params, 1.9)
  optimizer = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.5)
  grads = [{'w': jnp.full((3, 2), v)} for v in (1.0, -0.5, 0.25)]
  state = optimizer.init(params)
  _, state = optimizer.update(grads[0], state, params)
  _, state = optimizer.update(grads[1], state, params)
  before = state
  updates, state = optimizer.update({'w': jnp.full((3, 2), jnp.nan)}, state, params)
  assert bool(jnp.all(jnp.isnan(updates['w'])))
  for field in ('after', 'before', 'scale'):
    np.testing.assert_array_equal(getattr(state[0].overshoot, field),
                                  getattr(before[0].overshoot, field))
  assert float(state[0].overshoot.slope[0]) == 0.0  # no slope: the next step keeps sigma
  _, state = optimizer.update(grads[2], state, params)
  np.testing.assert_array_equal(state[0].overshoot.scale, before[0].overshoot.scale)


@pytest.mark.parametrize('value, error', [(-0.1, ValueError), (1.0, ValueError),
                                          (float('nan'), ValueError), (True, TypeError),
                                          ('0.5', TypeError)])
def test_bad_overshoot_decay_is_named(value, error):
  with pytest.raises(error, match='overshoot_decay'):
    metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, overshoot_decay=value)


@pytest.mark.parametrize('value, error', [(0.5, ValueError), (0.0, ValueError),
                                          (float('nan'), ValueError), (True, TypeError),
                                          ('2', TypeError)])
def test_bad_overshoot_cap_is_named(value, error):
  with pytest.raises(error, match='overshoot_cap'):
    metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, overshoot_decay=0.5,
                              overshoot_cap=value)


def test_overshoot_cap_without_the_check_is_refused():
  with pytest.raises(ValueError, match='overshoot_cap=3.0 caps the overshoot check'):
    metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, overshoot_cap=3.0)
  metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, overshoot_cap=math.inf)  # no cap: fine


def test_overshoot_cap_of_one_is_no_check_and_inf_is_no_cap():
  """A cap of 1 keeps ``sigma = 1``: the steps of the blend without the check. ``inf``:
  the check uncapped (``None``), and it does shorten the learned half here."""
  divergence = random_divergence(seed=2)
  params = tree(1)
  grads_list = []
  for t in range(6):
    grads = tree(40 + t)
    if t % 2:  # partly flipped back along the last gradient: the steps pass the minimum
      grads = jax.tree.map(lambda g, h: g - 2.0 * h, grads, grads_list[-1])
    grads_list.append(grads)

  def run(**kwargs):
    optimizer = metamd_jax.blended_metamd(divergence, 1.0, 0.1, per_leaf=True,
                                          statistics='kronecker', **kwargs)
    state, steps, update = optimizer.init(params), [], jax.jit(optimizer.update)
    for grads in grads_list:
      updates, state = update(grads, state, params)
      steps.append(flat(updates))
    return np.stack(steps), state

  plain, _ = run()
  capped, state = run(overshoot_decay=0.5, overshoot_cap=1.0)
  np.testing.assert_array_equal(state[0].overshoot.scale, np.ones(4))
  np.testing.assert_allclose(capped, plain, rtol=1e-6, atol=1e-9)
  uncapped, state = run(overshoot_decay=0.5)
  infinite, state_inf = run(overshoot_decay=0.5, overshoot_cap=math.inf)
  np.testing.assert_array_equal(infinite, uncapped)
  assert float(np.max(state_inf[0].overshoot.scale)) > 1.0
  assert not np.allclose(uncapped, plain)


def test_overshoot_check_on_the_whole_step_equals_a_numpy_loop(x64):
  """``overshoot_scope='step'``: the check's ``rho`` and ``sigma`` follow the blended
  direction ``M^{-1} g_t + eta c_t`` (``c_t``: the online half, run on its own), and both
  halves are divided by ``sigma_t``; against a float64 numpy loop."""
  divergence = random_divergence(seed=2, dtype=jnp.float64)
  inverse = np.linalg.inv(dense_block_metric(divergence))
  params = tree(1)
  grads_list = []
  for t in range(8):
    grads = tree(50 + t)
    if t % 2:  # partly flipped back along the last gradient
      grads = jax.tree.map(lambda g, h: g - 2.0 * h, grads, grads_list[-1])
    grads_list.append(grads)
  decay, eta, cap = 0.5, 0.3, 2.5
  online = statistics.scale_by_factored_statistics()
  online_state, raw_directions = online.init(params), []
  for grads in grads_list:
    c, online_state = online.update(grads, online_state, params)
    raw_directions.append(inverse @ flat(grads) + eta * flat(c))
  expected, sigmas = _numpy_overshoot_loop(raw_directions, grads_list, decay, cap)
  # The check acts: the cap binds on some leaf, and not on every leaf from the start.
  assert sigmas[-1].max() == cap and min(x.min() for x in sigmas) < cap
  assert np.all(np.diff(np.stack(sigmas), axis=0) >= 0)  # non-decreasing: the guarantee

  optimizer = metamd_jax.blended_metamd(divergence, None, eta, overshoot_decay=decay,
                                        overshoot_cap=cap, overshoot_scope='step')
  learned_scope = metamd_jax.blended_metamd(divergence, None, eta, overshoot_decay=decay,
                                            overshoot_cap=cap)
  state, other = optimizer.init(params), learned_scope.init(params)
  update = jax.jit(optimizer.update)
  differs = False
  for t, grads in enumerate(grads_list):
    updates, state = update(grads, state, params)
    np.testing.assert_allclose(flat(updates), expected[t], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(state[0].overshoot.scale, sigmas[t], rtol=1e-5)
    others, other = learned_scope.update(grads, other, params)
    differs |= not np.allclose(flat(others), expected[t], rtol=1e-3)
  assert differs  # the learned half's check alone is another optimiser


def test_overshoot_check_on_the_whole_step_without_an_online_half_is_the_learned_one():
  """With ``blend_rate=0`` the whole step is the learned half: the two scopes agree."""
  divergence = random_divergence(seed=3)
  params = tree(1)
  a = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.5,
                                overshoot_scope='step')
  b = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.5)
  states = [a.init(params), b.init(params)]
  for t in range(5):
    grads = tree(60 + t, scale=(-1.0) ** t)
    x, states[0] = a.update(grads, states[0], params)
    y, states[1] = b.update(grads, states[1], params)
    chex.assert_trees_all_close(x, y, rtol=1e-6)
  assert float(jnp.max(states[0][0].overshoot.scale)) > 1.0


def test_bad_overshoot_scope_is_named():
  with pytest.raises(ValueError, match="overshoot_scope must be one of \\('learned', 'step'\\)"):
    metamd_jax.blended_metamd(random_divergence(), 1.0, 0.1, overshoot_decay=0.5,
                              overshoot_scope='online')
