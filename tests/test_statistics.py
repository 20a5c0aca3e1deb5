"""Online statistics of the gradients: Shampoo's Kronecker statistics and their roots
against a float64 numpy reference, their prior, and the diagonal statistics' checks."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flat
from statistics_reference import (
  inverse_fourth_root,
  kronecker_inverse,
  kronecker_roots,
  random_divergence,
  tree,
)

import metamd_jax
from metamd_jax import statistics


@pytest.mark.parametrize('max_dimension, block_size', [(1024, None), (3, None), (1024, 3)])
def test_kronecker_statistics_equal_a_numpy_reference(x64, max_dimension, block_size):
  """Steps 1 and 2 refresh, then every second step: stale roots at steps 4 and 6; with
  ``max_dimension=3`` the 4- and 8-row sides keep their diagonals; with ``block_size=3``
  they keep diagonal blocks (8 rows: blocks of 3, 3 and 2; 4 rows: 2 and 2)."""
  grads_list = [tree(30 + t, scale=1.5 ** t) for t in range(6)]
  epsilon, rho, refresh_every = 1e-6, 1e-3, 2
  transformation = statistics.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=rho, refresh_every=refresh_every, max_dimension=max_dimension,
      block_size=block_size)
  state = transformation.init(tree(1))
  expected = kronecker_roots(grads_list, refresh_every, epsilon, rho, max_dimension,
                              block_size)
  if block_size is not None:  # the blocks differ from the whole side's root
    whole = kronecker_roots(grads_list, refresh_every, epsilon, rho)
    assert not np.allclose(expected[-1][1][0], whole[-1][1][0])
  conv = [roots[1][1] for roots in expected]  # the conv leaf's right root, per step
  assert not np.allclose(conv[2], conv[1]) and np.array_equal(conv[3], conv[2])  # 3: refresh
  update = jax.jit(transformation.update)
  for t, grads in enumerate(grads_list):
    directions, state = update(grads, state)
    want = kronecker_inverse(expected[t]) @ flat(grads)
    np.testing.assert_allclose(flat(directions), want, rtol=1e-9, atol=1e-12)
  shapes = [(x.shape, y.shape) for x, y in zip(jax.tree.leaves(state.left),
                                               jax.tree.leaves(state.right))]
  # Leaves in order b (1 x 3), conv (8 x 3), scalar (1 x 1), w (4 x 3).
  if max_dimension == 3:
    assert shapes == [((1, 1), (3, 3)), ((8,), (3, 3)), ((1, 1), (1, 1)), ((4,), (3, 3))]
  elif block_size == 3:
    assert shapes == [((1, 1), (3, 3)), ((3, 3, 3), (3, 3)), ((1, 1), (1, 1)),
                      ((2, 2, 2), (3, 3))]
  else:
    assert shapes == [((1, 1), (3, 3)), ((8, 8), (3, 3)), ((1, 1), (1, 1)), ((4, 4), (3, 3))]
  assert int(state.count) == len(grads_list)


@pytest.mark.parametrize('max_dimension, block_size', [(1024, None), (3, None), (1024, 3)])
def test_a_statistics_prior_starts_shampoo_from_an_isotropic_statistic(
    x64, max_dimension, block_size):
  """``statistics_prior`` with masses ``mu``: ``L_0 = mu / m I`` and ``R_0 = mu / n I``
  (``tr = mu``), on whole, diagonal and blocked sides; the directions then equal the numpy
  reference started from those statistics, refreshes on growth counting the prior's mass."""
  grads_list = [tree(50 + t, scale=1.5 ** t) for t in range(5)]
  params = tree(1)
  prior = [20.0, 50.0, 3.0, 30.0]  # leaves b, conv, scalar, w
  transformation = statistics.scale_by_kronecker_statistics(
      1e-6, relative_epsilon=1e-3, refresh_every=2, max_dimension=max_dimension,
      block_size=block_size, refresh_growth=0.5)
  state = statistics.statistics_prior(transformation.init(params), params, jnp.asarray(prior))
  for mu, left, right in zip(prior, jax.tree.leaves(state.left), jax.tree.leaves(state.right)):
    for side in (left, right):
      side = np.asarray(side)
      trace = side.sum() if side.ndim == 1 else np.trace(side, axis1=-2, axis2=-1).sum()
      np.testing.assert_allclose(trace, mu, rtol=1e-12)
  expected = kronecker_roots(grads_list, 2, 1e-6, 1e-3, max_dimension, block_size,
                              refresh_growth=0.5, prior=prior)
  without = kronecker_roots(grads_list, 2, 1e-6, 1e-3, max_dimension, block_size,
                             refresh_growth=0.5)
  assert not np.allclose(kronecker_inverse(expected[0]), kronecker_inverse(without[0]))
  update = jax.jit(transformation.update)
  for t, grads in enumerate(grads_list):
    directions, state = update(grads, state)
    want = kronecker_inverse(expected[t]) @ flat(grads)
    np.testing.assert_allclose(flat(directions), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('sketch_interval', [1, 0])
def test_a_statistics_prior_on_a_sketched_side_is_its_escaped_mass(x64, sketch_interval):
  """A sketched side starts at ``hat L_0 = mu / m I`` (escaped mass ``mu / m``); a rank-2
  gradient then fits the empty rank-3 sketch, so the first direction is the whole
  statistic's, ``mu / m I + G G^T``. With merges at refreshes (``sketch_interval=0``) the
  first merge carries the gradient's own mass only, not the prior's again."""
  epsilon, rho = 1e-6, 1e-4
  optimizer = statistics.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=rho, sketch_rank=3, sketch_interval=sketch_interval)
  params = {'w': jnp.zeros((12, 2)), 'b': jnp.zeros((2,))}
  state = statistics.statistics_prior(optimizer.init(params), params, jnp.asarray([4.0, 30.0]))
  assert float(state.left['w'].escaped) == pytest.approx(30.0 / 12)
  np.testing.assert_allclose(state.merged, [0.0, 30.0])  # b whole, w sketched
  g = np.random.default_rng(3).standard_normal((12, 2))
  b = np.ones(2)
  directions, _ = optimizer.update({'w': jnp.asarray(g), 'b': jnp.asarray(b)}, state)
  left = inverse_fourth_root(30.0 / 12 * np.eye(12) + g @ g.T, 2, epsilon, rho)
  right = inverse_fourth_root(30.0 / 2 * np.eye(2) + g.T @ g, 12, epsilon, rho)
  np.testing.assert_allclose(directions['w'], left @ g @ right, rtol=1e-8, atol=1e-10)
  b_left = inverse_fourth_root(np.array([[4.0 + 2.0]]), 2, epsilon, rho)
  b_right = inverse_fourth_root(4.0 / 2 * np.eye(2) + np.outer(b, b), 1, epsilon, rho)
  np.testing.assert_allclose(directions['b'], (b_left @ b[None] @ b_right)[0], rtol=1e-8)


def test_a_statistics_prior_reaches_the_statistics_inside_an_optimiser():
  """Behind ``optax.chain`` and doubling restarts, the blended optimiser's Shampoo
  statistics get the prior and nothing else changes; a state without Shampoo statistics,
  or masses of the wrong length, are refused by name."""
  params = tree(1, dtype=jnp.float32)
  blend = metamd_jax.blended_metamd(random_divergence(dtype=jnp.float32), 1.0, 0.1,
                                    statistics='kronecker')
  optimizer = optax.chain(optax.clip(10.0), metamd_jax.doubling_restarts(blend, 5))
  state = optimizer.init(params)
  masses = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  started = statistics.statistics_prior(state, params, masses)
  is_statistics = lambda x: isinstance(x, statistics.KroneckerStatisticsState)  # noqa: E731
  found = [x for x in jax.tree.leaves(started, is_leaf=is_statistics) if is_statistics(x)]
  assert len(found) == 1
  sizes = [(1, 3), (8, 3), (1, 1), (4, 3)]  # b, conv, scalar, w as m x n
  for (m, n), mu, left, right in zip(sizes, masses, jax.tree.leaves(found[0].left),
                                     jax.tree.leaves(found[0].right)):
    np.testing.assert_allclose(left, mu / m * np.eye(m), rtol=1e-6)
    np.testing.assert_allclose(right, mu / n * np.eye(n), rtol=1e-6)
  untouched = lambda tree: [x for x in jax.tree.leaves(tree, is_leaf=is_statistics)  # noqa: E731
                            if not is_statistics(x)]
  chex.assert_trees_all_equal(untouched(started), untouched(state))
  with pytest.raises(ValueError, match='no Shampoo statistics'):
    statistics.statistics_prior(optax.adam(0.1).init(params), params, masses)
  with pytest.raises(ValueError, match='one gradient mass per parameter leaf'):
    statistics.statistics_prior(state, params, masses[:3])
  for bad in (-1.0, np.nan):
    with pytest.raises(ValueError, match='finite and >= 0'):
      statistics.statistics_prior(state, params, masses.at[0].set(bad))


@pytest.mark.parametrize('refresh_growth', [0.0, 0.5, 50.0])
def test_kronecker_roots_refresh_on_growth_as_a_numpy_reference(x64, refresh_growth):
  """Roots refreshed on the schedule (every third step after the third) and, per leaf,
  when its gradient mass has grown by ``refresh_growth``: gradients of one size, then a
  burst of ten times that size at step 5 in the ``w`` leaf alone. ``0`` refreshes every
  step; ``0.5`` refreshes ``w`` at the burst (a stale step for the schedule; its mass
  grows about 26-fold) and leaves the other leaves' roots stale there."""
  grads_list = [tree(60 + t) for t in range(9)]
  grads_list[4] = {**grads_list[4], 'w': 10.0 * grads_list[4]['w']}
  epsilon, rho, refresh_every = 1e-6, 1e-3, 3
  transformation = statistics.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=rho, refresh_every=refresh_every,
      refresh_growth=refresh_growth)
  expected = kronecker_roots(grads_list, refresh_every, epsilon, rho,
                              refresh_growth=refresh_growth)
  scheduled = kronecker_roots(grads_list, refresh_every, epsilon, rho)
  # Leaves in order b, conv, scalar, w; step 5 (index 4) is not on the schedule.
  w_at_burst = expected[4][3][0]
  assert np.array_equal(scheduled[4][3][0], scheduled[3][3][0])
  if refresh_growth < 50:
    assert not np.allclose(w_at_burst, scheduled[4][3][0])  # refreshed at the burst
  else:
    assert np.array_equal(w_at_burst, scheduled[4][3][0])  # a burst of about 26x is under 51x
  if refresh_growth == 0.5:
    assert np.array_equal(expected[4][1][0], expected[3][1][0])  # conv: still stale
  if refresh_growth == 0:
    every = kronecker_roots(grads_list, 1, epsilon, rho)
    for mine, theirs in zip(expected, every):
      for (a, b), (c, d) in zip(mine, theirs):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
  state = transformation.init(tree(1))
  update = jax.jit(transformation.update)
  for t, grads in enumerate(grads_list):
    directions, state = update(grads, state)
    want = kronecker_inverse(expected[t]) @ flat(grads)
    np.testing.assert_allclose(flat(directions), want, rtol=1e-9, atol=1e-12)
  masses = [sum(float(np.sum(np.asarray(g[k], np.float64) ** 2)) for g in grads_list)
            for k in ('b', 'conv', 'scalar', 'w')]
  if refresh_growth == 0:  # refreshed at the last step: the mass of every step
    np.testing.assert_allclose(np.asarray(state.refreshed), masses, rtol=1e-6)


def test_an_infinite_refresh_growth_is_the_schedule_alone():
  grads_list = [tree(70 + t, scale=3.0 ** t) for t in range(6)]
  alone = statistics.scale_by_kronecker_statistics(refresh_every=2)
  infinite = statistics.scale_by_kronecker_statistics(refresh_every=2,
                                                   refresh_growth=float('inf'))
  growth = statistics.scale_by_kronecker_statistics(refresh_every=2, refresh_growth=0.1)
  states = [t.init(tree(1)) for t in (alone, infinite, growth)]
  updates = [jax.jit(t.update) for t in (alone, infinite, growth)]
  differs = False
  for grads in grads_list:
    outs = []
    for index, update in enumerate(updates):
      out, states[index] = update(grads, states[index])
      outs.append(out)
    chex.assert_trees_all_equal(outs[0], outs[1])
    differs |= not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(outs[0]),
                                                          jax.tree.leaves(outs[2])))
  assert differs  # the growing gradients refresh stale steps with 0.1


def test_kronecker_statistics_of_isotropic_gradients_are_adagrad_sized():
  """Gradients with independent entries of size gamma: ``K_t ~ gamma sqrt(t)``, so the
  direction's entries are about ``g / (gamma sqrt(t))``, as AdaGrad's."""
  transformation = statistics.scale_by_kronecker_statistics(refresh_every=1)
  rng = np.random.default_rng(0)
  state = transformation.init({'w': jnp.zeros((256, 128))})
  gamma = 0.01
  for t in range(1, 5):
    grads = {'w': jnp.asarray(gamma * rng.standard_normal((256, 128)), jnp.float32)}
    directions, state = transformation.update(grads, state)
    ratio = float(jnp.std(directions['w']) * math.sqrt(t))
    assert 0.7 < ratio < 1.5, (t, ratio)


@pytest.mark.parametrize('value', [0.0, -1e-8, float('nan'), True])
def test_bad_epsilon_is_named(value):
  with pytest.raises(ValueError, match='epsilon'):
    statistics.scale_by_factored_statistics(value)


@pytest.mark.parametrize('block_size, refresh_growth', [(None, None), (3, None), (None, 0.3)])
def test_kronecker_statistics_under_vmap_equal_one_task_at_a_time(block_size, refresh_growth):
  """A vmapped update (tasks stacked; the roots' eigendecompositions then run one matrix
  at a time) equals the update of each task alone, with blocked sides too, and with
  refreshes on growth (then per task and per leaf)."""
  transformation = statistics.scale_by_kronecker_statistics(refresh_every=2,
                                                         block_size=block_size,
                                                         refresh_growth=refresh_growth)
  params = tree(1, dtype=jnp.float32)
  # Task 1 has a burst at step 4 (a stale step for the schedule).
  steps = [[tree(40 + 3 * t + task, scale=4.0 if (task, t) == (1, 3) else 1.0,
                  dtype=jnp.float32) for task in range(3)]
           for t in range(5)]
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
  batched_state = jax.vmap(transformation.init)(stack([params] * 3))
  states = [transformation.init(params) for _ in range(3)]
  for grads in steps:
    batched, batched_state = jax.jit(jax.vmap(transformation.update))(stack(grads),
                                                                      batched_state)
    for task in range(3):
      alone, states[task] = jax.jit(transformation.update)(grads[task], states[task])
      chex.assert_trees_all_close(jax.tree.map(lambda x, i=task: x[i], batched), alone,
                                  rtol=1e-5, atol=1e-6)


def test_kronecker_direction_differentiates_with_the_roots_held_constant():
  """``d sum(A G B) / dG = A 1 B`` with the roots of the state after the update."""
  transformation = statistics.scale_by_kronecker_statistics(refresh_every=1)
  params = {'w': jnp.zeros((4, 3))}
  state = transformation.init(params)
  grads = {'w': jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}

  def total(g):
    return jnp.sum(transformation.update({'w': g}, state)[0]['w'])

  derivative = jax.grad(total)(grads['w'])
  _, new_state = transformation.update(grads, state)
  a, b = new_state.left_root['w'], new_state.right_root['w']
  np.testing.assert_allclose(derivative, a @ jnp.ones((4, 3)) @ b, rtol=1e-5)
