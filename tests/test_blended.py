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

import metamd_jax
from metamd_jax import blended

SHAPES = {'w': (4, 3), 'b': (3,), 'conv': (2, 2, 2, 3), 'scalar': ()}


def _tree(seed, scale=1.0, dtype=None):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


def _divergence(seed=0, dtype=None, structure='kronecker'):
  divergence = metamd_jax.init_divergence(_tree(0), 0.1, dtype=dtype, structure=structure)
  return well_conditioned(divergence, seed=seed, noise=0.3)


def _factored_statistics(grads_list):
  """Per leaf (jax.tree.leaves order), numpy float64: r_t and c_t from the definition.

  A leaf is a matrix with rows indexed by every axis but the last; ``r_i`` sums the
  squares of row ``i`` over its columns and over the steps so far, ``c_j`` column ``j``'s.
  """
  rows, columns = None, None
  for grads in grads_list:
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    new_rows, new_columns = [], []
    for g in leaves:
      if g.ndim == 0:
        new_rows.append(g ** 2)
        new_columns.append(g ** 2)
        continue
      matrix = g.reshape(-1, g.shape[-1])
      new_rows.append(np.array([row @ row for row in matrix]).reshape(g.shape[:-1]))
      new_columns.append(np.array([col @ col for col in matrix.T]))
    rows = new_rows if rows is None else [a + b for a, b in zip(rows, new_rows)]
    columns = new_columns if columns is None else [a + b for a, b in zip(columns, new_columns)]
  return rows, columns


def _peak_statistics(grads_list, decay):
  """``'peak_average'`` from the definition: per leaf, the running maximum over the steps
  of the bias-corrected moving averages of the row and of the column sums of ``g^2``."""
  averages, peaks = None, None
  for t, grads in enumerate(grads_list, start=1):
    rows, columns = _factored_statistics([grads])
    new = rows + columns
    averages = ([(1 - decay) * x for x in new] if averages is None
                else [decay * a + (1 - decay) * x for a, x in zip(averages, new)])
    corrected = [a / (1 - decay ** t) for a in averages]
    peaks = corrected if peaks is None else [np.maximum(p, c) for p, c in zip(peaks, corrected)]
  half = len(peaks) // 2
  return peaks[:half], peaks[half:]


def _sizes(rows, columns):
  """Per leaf: ``(m, n)``, its numbers of rows and columns."""
  return [(max(np.size(r), 1), np.shape(c)[-1] if np.ndim(c) else 1)
          for r, c in zip(rows, columns)]


def _denominator(rows, columns, epsilon):
  """``K_t``'s diagonal, ``((r_i / n) (c_j / m))^{1/4} + delta``, flattened like
  :func:`conftest.flat`."""
  parts = []
  for r, c, (m, n) in zip(rows, columns, _sizes(rows, columns)):
    product = r * c if np.ndim(r) == 0 else np.asarray(r)[..., None] * np.asarray(c)
    parts.append(np.ravel((product / (m * n)) ** 0.25 + epsilon))
  return np.concatenate(parts)


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
    denominator = _denominator(*_factored_statistics(grads_list[:t]), epsilon)
    updates.append(-(learned + blend_rate * g / denominator) / scale)
    scales.append(scale)
    denominators.append(denominator)
  return updates, np.array(scales), denominators


def _inverse_fourth_root(statistic, other_size, epsilon, rho):
  """Numpy float64: ``(S / k + (epsilon + rho lambda_max) I)^{-1/4}``, full or diagonal."""
  mean = np.asarray(statistic, np.float64) / other_size
  if mean.ndim == 1:
    return (mean + epsilon + rho * mean.max()) ** -0.25
  values, vectors = np.linalg.eigh(mean)
  values = np.maximum(values, 0)
  return (vectors * (values + epsilon + rho * values.max()) ** -0.25) @ vectors.T


def _block_root(statistic, other_size, epsilon, rho, block_size):
  """The root of a side: one root of the whole statistic, or, for a side longer than
  ``block_size``, the dense block-diagonal matrix of the roots of its diagonal blocks
  (``k = ceil(m / block_size)`` blocks of ``ceil(m / k)`` consecutive indices, the last
  shorter), each damped by its own largest eigenvalue."""
  size = statistic.shape[0]
  if statistic.ndim == 1 or block_size is None or size <= block_size:
    return _inverse_fourth_root(statistic, other_size, epsilon, rho)
  count = -(-size // block_size)
  width = -(-size // count)
  root = np.zeros((size, size))
  for start in range(0, size, width):
    block = slice(start, min(start + width, size))
    root[block, block] = _inverse_fourth_root(statistic[block, block], other_size, epsilon,
                                              rho)
  return root


def _kronecker_roots(grads_list, refresh_every, epsilon, rho, max_dimension=1024,
                     block_size=None, refresh_growth=None, prior=None):
  """Per step, per leaf (``jax.tree.leaves`` order): the roots ``(A_t, B_t)`` in use,
  from the definition: ``L = sum G G^T``, ``R = sum G^T G`` (a leaf as an ``m x n``
  matrix, rows every axis but the last; a side over ``max_dimension`` keeps the diagonal,
  one over ``block_size`` its diagonal blocks), recomputed at steps ``1..k`` and
  ``1 + j k``, kept in between; with ``refresh_growth`` a leaf's are also recomputed at
  a step where ``sum ||G||^2`` exceeds ``1 + refresh_growth`` times its value at the
  leaf's last refresh. ``prior``: per leaf a mass ``mu``, the statistics started at
  ``mu / m I`` and ``mu / n I`` (their diagonals on a diagonal side) and the masses at
  ``mu``."""
  roots, current, lefts, rights, masses, refreshed = [], None, None, None, None, None
  if prior is not None:
    sizes = [(g.size // g.shape[-1], g.shape[-1]) if g.ndim else (1, 1)
             for g in jax.tree.leaves(grads_list[0])]
    start = lambda size, mu: (mu / size) * (  # noqa: E731
        np.ones(size) if size > max_dimension else np.eye(size))
    lefts = [start(m, mu) for (m, _), mu in zip(sizes, prior)]
    rights = [start(n, mu) for (_, n), mu in zip(sizes, prior)]
    masses = list(prior)
  for t, grads in enumerate(grads_list, start=1):
    matrices = [np.asarray(g, np.float64).reshape(-1, g.shape[-1] if g.ndim else 1)
                for g in jax.tree.leaves(grads)]
    new_lefts = [np.diag(m @ m.T) if m.shape[0] > max_dimension else m @ m.T
                 for m in matrices]
    new_rights = [np.diag(m.T @ m) if m.shape[1] > max_dimension else m.T @ m
                  for m in matrices]
    lefts = new_lefts if lefts is None else [a + b for a, b in zip(lefts, new_lefts)]
    rights = new_rights if rights is None else [a + b for a, b in zip(rights, new_rights)]
    step_masses = [float(np.sum(m ** 2)) for m in matrices]
    masses = step_masses if masses is None else [a + b for a, b in zip(masses, step_masses)]
    refreshed = [0.0] * len(matrices) if refreshed is None else refreshed
    scheduled = t <= refresh_every or (t - 1) % refresh_every == 0
    due = [scheduled or (refresh_growth is not None
                         and mass > (1 + refresh_growth) * before)
           for mass, before in zip(masses, refreshed)]
    fresh = [(_block_root(left, m.shape[1], epsilon, rho, block_size),
              _block_root(right, m.shape[0], epsilon, rho, block_size))
             for left, right, m in zip(lefts, rights, matrices)]
    current = [new if leaf_due else old for new, old, leaf_due
               in zip(fresh, current or fresh, due)]
    refreshed = [mass if leaf_due else before
                 for mass, before, leaf_due in zip(masses, refreshed, due)]
    roots.append(current)
  return roots


def _dense(root):
  return root if root.ndim == 2 else np.diag(root)


def _kronecker_inverse(roots):
  """``K_t^{-1} = A_t ⊗ B_t`` per leaf, block diagonal over the leaves, in the order of
  :func:`conftest.flat` (a leaf's row-major ``vec``: ``vec(A G B) = (A ⊗ B) vec(G)``
  for symmetric ``B``)."""
  blocks = [np.kron(_dense(a), _dense(b)) for a, b in roots]
  size = sum(b.shape[0] for b in blocks)
  full, offset = np.zeros((size, size)), 0
  for b in blocks:
    full[offset:offset + len(b), offset:offset + len(b)] = b
    offset += len(b)
  return full


@pytest.mark.parametrize('max_dimension, block_size', [(1024, None), (3, None), (1024, 3)])
def test_kronecker_statistics_equal_a_numpy_reference(x64, max_dimension, block_size):
  """Steps 1 and 2 refresh, then every second step: stale roots at steps 4 and 6; with
  ``max_dimension=3`` the 4- and 8-row sides keep their diagonals; with ``block_size=3``
  they keep diagonal blocks (8 rows: blocks of 3, 3 and 2; 4 rows: 2 and 2)."""
  grads_list = [_tree(30 + t, scale=1.5 ** t) for t in range(6)]
  epsilon, rho, refresh_every = 1e-6, 1e-3, 2
  transformation = blended.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=rho, refresh_every=refresh_every, max_dimension=max_dimension,
      block_size=block_size)
  state = transformation.init(_tree(1))
  expected = _kronecker_roots(grads_list, refresh_every, epsilon, rho, max_dimension,
                              block_size)
  if block_size is not None:  # the blocks differ from the whole side's root
    whole = _kronecker_roots(grads_list, refresh_every, epsilon, rho)
    assert not np.allclose(expected[-1][1][0], whole[-1][1][0])
  conv = [roots[1][1] for roots in expected]  # the conv leaf's right root, per step
  assert not np.allclose(conv[2], conv[1]) and np.array_equal(conv[3], conv[2])  # 3: refresh
  update = jax.jit(transformation.update)
  for t, grads in enumerate(grads_list):
    directions, state = update(grads, state)
    want = _kronecker_inverse(expected[t]) @ flat(grads)
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
  grads_list = [_tree(50 + t, scale=1.5 ** t) for t in range(5)]
  params = _tree(1)
  prior = [20.0, 50.0, 3.0, 30.0]  # leaves b, conv, scalar, w
  transformation = blended.scale_by_kronecker_statistics(
      1e-6, relative_epsilon=1e-3, refresh_every=2, max_dimension=max_dimension,
      block_size=block_size, refresh_growth=0.5)
  state = blended.statistics_prior(transformation.init(params), params, jnp.asarray(prior))
  for mu, left, right in zip(prior, jax.tree.leaves(state.left), jax.tree.leaves(state.right)):
    for side in (left, right):
      side = np.asarray(side)
      trace = side.sum() if side.ndim == 1 else np.trace(side, axis1=-2, axis2=-1).sum()
      np.testing.assert_allclose(trace, mu, rtol=1e-12)
  expected = _kronecker_roots(grads_list, 2, 1e-6, 1e-3, max_dimension, block_size,
                              refresh_growth=0.5, prior=prior)
  without = _kronecker_roots(grads_list, 2, 1e-6, 1e-3, max_dimension, block_size,
                             refresh_growth=0.5)
  assert not np.allclose(_kronecker_inverse(expected[0]), _kronecker_inverse(without[0]))
  update = jax.jit(transformation.update)
  for t, grads in enumerate(grads_list):
    directions, state = update(grads, state)
    want = _kronecker_inverse(expected[t]) @ flat(grads)
    np.testing.assert_allclose(flat(directions), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('sketch_interval', [1, 0])
def test_a_statistics_prior_on_a_sketched_side_is_its_escaped_mass(x64, sketch_interval):
  """A sketched side starts at ``hat L_0 = mu / m I`` (escaped mass ``mu / m``); a rank-2
  gradient then fits the empty rank-3 sketch, so the first direction is the whole
  statistic's, ``mu / m I + G G^T``. With merges at refreshes (``sketch_interval=0``) the
  first merge carries the gradient's own mass only, not the prior's again."""
  epsilon, rho = 1e-6, 1e-4
  optimizer = blended.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=rho, sketch_rank=3, sketch_interval=sketch_interval)
  params = {'w': jnp.zeros((12, 2)), 'b': jnp.zeros((2,))}
  state = blended.statistics_prior(optimizer.init(params), params, jnp.asarray([4.0, 30.0]))
  assert float(state.left['w'].escaped) == pytest.approx(30.0 / 12)
  np.testing.assert_allclose(state.merged, [0.0, 30.0])  # b whole, w sketched
  g = np.random.default_rng(3).standard_normal((12, 2))
  b = np.ones(2)
  directions, _ = optimizer.update({'w': jnp.asarray(g), 'b': jnp.asarray(b)}, state)
  left = _inverse_fourth_root(30.0 / 12 * np.eye(12) + g @ g.T, 2, epsilon, rho)
  right = _inverse_fourth_root(30.0 / 2 * np.eye(2) + g.T @ g, 12, epsilon, rho)
  np.testing.assert_allclose(directions['w'], left @ g @ right, rtol=1e-8, atol=1e-10)
  b_left = _inverse_fourth_root(np.array([[4.0 + 2.0]]), 2, epsilon, rho)
  b_right = _inverse_fourth_root(4.0 / 2 * np.eye(2) + np.outer(b, b), 1, epsilon, rho)
  np.testing.assert_allclose(directions['b'], (b_left @ b[None] @ b_right)[0], rtol=1e-8)


def test_a_statistics_prior_reaches_the_statistics_inside_an_optimiser():
  """Behind ``optax.chain`` and doubling restarts, the blended optimiser's Shampoo
  statistics get the prior and nothing else changes; a state without Shampoo statistics,
  or masses of the wrong length, are refused by name."""
  params = _tree(1, dtype=jnp.float32)
  blend = metamd_jax.blended_metamd(_divergence(dtype=jnp.float32), 1.0, 0.1,
                                    statistics='kronecker')
  optimizer = optax.chain(optax.clip(10.0), metamd_jax.doubling_restarts(blend, 5))
  state = optimizer.init(params)
  masses = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  started = blended.statistics_prior(state, params, masses)
  is_statistics = lambda x: isinstance(x, blended.KroneckerStatisticsState)  # noqa: E731
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
    blended.statistics_prior(optax.adam(0.1).init(params), params, masses)
  with pytest.raises(ValueError, match='one gradient mass per parameter leaf'):
    blended.statistics_prior(state, params, masses[:3])
  for bad in (-1.0, np.nan):
    with pytest.raises(ValueError, match='finite and >= 0'):
      blended.statistics_prior(state, params, masses.at[0].set(bad))


@pytest.mark.parametrize('refresh_growth', [0.0, 0.5, 50.0])
def test_kronecker_roots_refresh_on_growth_as_a_numpy_reference(x64, refresh_growth):
  """Roots refreshed on the schedule (every third step after the third) and, per leaf,
  when its gradient mass has grown by ``refresh_growth``: gradients of one size, then a
  burst of ten times that size at step 5 in the ``w`` leaf alone. ``0`` refreshes every
  step; ``0.5`` refreshes ``w`` at the burst (a stale step for the schedule; its mass
  grows about 26-fold) and leaves the other leaves' roots stale there."""
  grads_list = [_tree(60 + t) for t in range(9)]
  grads_list[4] = {**grads_list[4], 'w': 10.0 * grads_list[4]['w']}
  epsilon, rho, refresh_every = 1e-6, 1e-3, 3
  transformation = blended.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=rho, refresh_every=refresh_every,
      refresh_growth=refresh_growth)
  expected = _kronecker_roots(grads_list, refresh_every, epsilon, rho,
                              refresh_growth=refresh_growth)
  scheduled = _kronecker_roots(grads_list, refresh_every, epsilon, rho)
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
    every = _kronecker_roots(grads_list, 1, epsilon, rho)
    for mine, theirs in zip(expected, every):
      for (a, b), (c, d) in zip(mine, theirs):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
  state = transformation.init(_tree(1))
  update = jax.jit(transformation.update)
  for t, grads in enumerate(grads_list):
    directions, state = update(grads, state)
    want = _kronecker_inverse(expected[t]) @ flat(grads)
    np.testing.assert_allclose(flat(directions), want, rtol=1e-9, atol=1e-12)
  masses = [sum(float(np.sum(np.asarray(g[k], np.float64) ** 2)) for g in grads_list)
            for k in ('b', 'conv', 'scalar', 'w')]
  if refresh_growth == 0:  # refreshed at the last step: the mass of every step
    np.testing.assert_allclose(np.asarray(state.refreshed), masses, rtol=1e-6)


def test_an_infinite_refresh_growth_is_the_schedule_alone():
  grads_list = [_tree(70 + t, scale=3.0 ** t) for t in range(6)]
  alone = blended.scale_by_kronecker_statistics(refresh_every=2)
  infinite = blended.scale_by_kronecker_statistics(refresh_every=2,
                                                   refresh_growth=float('inf'))
  growth = blended.scale_by_kronecker_statistics(refresh_every=2, refresh_growth=0.1)
  states = [t.init(_tree(1)) for t in (alone, infinite, growth)]
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
  transformation = blended.scale_by_kronecker_statistics(refresh_every=1)
  rng = np.random.default_rng(0)
  state = transformation.init({'w': jnp.zeros((256, 128))})
  gamma = 0.01
  for t in range(1, 5):
    grads = {'w': jnp.asarray(gamma * rng.standard_normal((256, 128)), jnp.float32)}
    directions, state = transformation.update(grads, state)
    ratio = float(jnp.std(directions['w']) * math.sqrt(t))
    assert 0.7 < ratio < 1.5, (t, ratio)


def test_zero_blend_rate_is_adaptive_metamd():
  params = _tree(1, dtype=jnp.float32)
  grads_list = [_tree(10 + t, scale=2.0 ** t, dtype=jnp.float32) for t in range(5)]
  divergence = _divergence(seed=1, dtype=jnp.float32)
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
  divergence = _divergence(seed=2, dtype=jnp.float64, structure=structure)
  metric = dense_block_metric(divergence)
  params = _tree(1)
  grads_list = [_tree(20 + t, scale=1.6 ** t) for t in range(8)]  # growing gradients
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
  rows, columns = _factored_statistics(grads_list)
  for ours, want in zip(jax.tree.leaves(state[0].statistics.rows), rows):
    np.testing.assert_allclose(ours, want, rtol=1e-12)
  for ours, want in zip(jax.tree.leaves(state[0].statistics.columns), columns):
    np.testing.assert_allclose(ours, want, rtol=1e-12)
  w = np.asarray(grads_list[0]['w'], np.float64)
  np.testing.assert_allclose(np.diag(w @ w.T), _factored_statistics(grads_list[:1])[0][3])


def test_state_is_the_adaptive_state_and_one_row_and_column_per_leaf():
  params = _tree(1, dtype=jnp.float32)
  state = metamd_jax.scale_by_blended_mirror_descent(_divergence(), 1.0, 0.1).init(params)
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
  roots = _kronecker_roots(grads_list, refresh_every, epsilon, 1e-4, block_size=block_size,
                           refresh_growth=refresh_growth)
  if refresh_growth is not None:  # some refreshes were off the schedule
    scheduled = _kronecker_roots(grads_list, refresh_every, epsilon, 1e-4)
    assert any(not np.array_equal(a[0][0], b[0][0]) for a, b in zip(roots, scheduled))
  for t in range(num_steps):
    if statistics == 'kronecker':
      online = _kronecker_inverse(roots[t])
    else:
      rows, columns = (_factored_statistics(grads_list[:t + 1]) if statistics == 'sum'
                       else _peak_statistics(grads_list[:t + 1], 0.99))
      online = np.diag(1 / _denominator(rows, columns, epsilon))
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
  divergence = _divergence(seed=2, dtype=jnp.float64)
  metric = dense_block_metric(divergence)
  inverse = np.linalg.inv(metric)
  params = _tree(1)
  rng = np.random.default_rng(5)
  grads_list = []
  for t in range(8):
    grads = _tree(30 + t)
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
  params = _tree(1, dtype=jnp.float32)
  divergence = _divergence(seed=1, dtype=jnp.float32)
  grads_list = [_tree(40 + t) for t in range(4)]
  grads_list = [g if t % 2 == 0 else jax.tree.map(lambda x: -x, g)
                for t, g in enumerate(grads_list)]
  checked = metamd_jax.blended_metamd(divergence, None, 0.3, overshoot_decay=0.0)
  learned_only = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.0)
  online_only = blended.scale_by_factored_statistics()
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
    metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, overshoot_decay=value)


@pytest.mark.parametrize('value, error', [(0.5, ValueError), (0.0, ValueError),
                                          (float('nan'), ValueError), (True, TypeError),
                                          ('2', TypeError)])
def test_bad_overshoot_cap_is_named(value, error):
  with pytest.raises(error, match='overshoot_cap'):
    metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, overshoot_decay=0.5,
                              overshoot_cap=value)


def test_overshoot_cap_without_the_check_is_refused():
  with pytest.raises(ValueError, match='overshoot_cap=3.0 caps the overshoot check'):
    metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, overshoot_cap=3.0)
  metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, overshoot_cap=math.inf)  # no cap: fine


def test_overshoot_cap_of_one_is_no_check_and_inf_is_no_cap():
  """A cap of 1 keeps ``sigma = 1``: the steps of the blend without the check. ``inf``:
  the check uncapped (``None``), and it does shorten the learned half here."""
  divergence = _divergence(seed=2)
  params = _tree(1)
  grads_list = []
  for t in range(6):
    grads = _tree(40 + t)
    if t % 2:  # partly flipped back along the last gradient: the steps pass the minimum
      grads = jax.tree.map(lambda g, h: g - 2.0 * h, grads, grads_list[-1])
    grads_list.append(grads)

  def run(**kwargs):
    optimizer = metamd_jax.blended_metamd(divergence, 1.0, 0.1, per_leaf=True,
                                          statistics='kronecker', **kwargs)
    state, steps = optimizer.init(params), []
    for grads in grads_list:
      updates, state = optimizer.update(grads, state, params)
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


@pytest.mark.parametrize('value, error', [
    (-0.1, ValueError), (float('nan'), ValueError), (math.inf, ValueError),
    (True, TypeError), ('0.1', TypeError), (None, TypeError)])
def test_bad_blend_rate_is_named(value, error):
  with pytest.raises(error, match='blend_rate'):
    metamd_jax.blended_metamd(_divergence(), 1.0, value)


@pytest.mark.parametrize('value', [0.0, -1e-8, float('nan'), True])
def test_bad_epsilon_is_named(value):
  with pytest.raises(ValueError, match='epsilon'):
    blended.scale_by_factored_statistics(value)


def test_bad_statistics_and_decay_are_named():
  with pytest.raises(ValueError, match='statistics'):
    metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, statistics='mean')
  with pytest.raises(ValueError, match='decay'):
    blended.scale_by_factored_statistics(statistics='peak_average', decay=1.0)


@pytest.mark.parametrize('value, error', [(-0.5, ValueError), (1.5, ValueError),
                                          (float('nan'), ValueError), (True, TypeError),
                                          ('1', TypeError)])
def test_bad_online_power_is_named(value, error):
  with pytest.raises(error, match='online_power'):
    metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, online_power=value)


def test_bad_levels_and_learning_rate_are_named():
  with pytest.raises(ValueError, match='reference_norm'):
    metamd_jax.blended_metamd(_divergence(), -1.0, 0.1)
  with pytest.raises(ValueError, match='learning_rate'):
    metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, learning_rate=-1.0)


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
    blended.scale_by_kronecker_statistics(**{name: value})
  if name in ('refresh_every', 'max_dimension', 'block_size', 'refresh_growth'):
    with pytest.raises(ValueError, match=name):
      metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, statistics='kronecker',
                                **{name: value})
  if name in ('max_dimension', 'block_size'):  # checked whatever the statistics
    with pytest.raises(ValueError, match=name):
      metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, **{name: value})


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


@pytest.mark.parametrize('block_size, refresh_growth', [(None, None), (3, None), (None, 0.3)])
def test_kronecker_statistics_under_vmap_equal_one_task_at_a_time(block_size, refresh_growth):
  """A vmapped update (tasks stacked; the roots' eigendecompositions then run one matrix
  at a time) equals the update of each task alone, with blocked sides too, and with
  refreshes on growth (then per task and per leaf)."""
  transformation = blended.scale_by_kronecker_statistics(refresh_every=2,
                                                         block_size=block_size,
                                                         refresh_growth=refresh_growth)
  params = _tree(1, dtype=jnp.float32)
  # Task 1 has a burst at step 4 (a stale step for the schedule).
  steps = [[_tree(40 + 3 * t + task, scale=4.0 if (task, t) == (1, 3) else 1.0,
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
  transformation = blended.scale_by_kronecker_statistics(refresh_every=1)
  params = {'w': jnp.zeros((4, 3))}
  state = transformation.init(params)
  grads = {'w': jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}

  def total(g):
    return jnp.sum(transformation.update({'w': g}, state)[0]['w'])

  derivative = jax.grad(total)(grads['w'])
  _, new_state = transformation.update(grads, state)
  a, b = new_state.left_root['w'], new_state.right_root['w']
  np.testing.assert_allclose(derivative, a @ jnp.ones((4, 3)) @ b, rtol=1e-5)


def test_overshoot_check_on_the_whole_step_equals_a_numpy_loop(x64):
  """``overshoot_scope='step'``: the check's ``rho`` and ``sigma`` follow the blended
  direction ``M^{-1} g_t + eta c_t`` (``c_t``: the online half, run on its own), and both
  halves are divided by ``sigma_t``; against a float64 numpy loop."""
  divergence = _divergence(seed=2, dtype=jnp.float64)
  inverse = np.linalg.inv(dense_block_metric(divergence))
  params = _tree(1)
  grads_list = []
  for t in range(8):
    grads = _tree(50 + t)
    if t % 2:  # partly flipped back along the last gradient
      grads = jax.tree.map(lambda g, h: g - 2.0 * h, grads, grads_list[-1])
    grads_list.append(grads)
  decay, eta, cap = 0.5, 0.3, 2.5
  online = blended.scale_by_factored_statistics()
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
  divergence = _divergence(seed=3)
  params = _tree(1)
  a = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.5,
                                overshoot_scope='step')
  b = metamd_jax.blended_metamd(divergence, None, 0.0, overshoot_decay=0.5)
  states = [a.init(params), b.init(params)]
  for t in range(5):
    grads = _tree(60 + t, scale=(-1.0) ** t)
    x, states[0] = a.update(grads, states[0], params)
    y, states[1] = b.update(grads, states[1], params)
    chex.assert_trees_all_close(x, y, rtol=1e-6)
  assert float(jnp.max(states[0][0].overshoot.scale)) > 1.0


def test_bad_overshoot_scope_is_named():
  with pytest.raises(ValueError, match="overshoot_scope must be one of \\('learned', 'step'\\)"):
    metamd_jax.blended_metamd(_divergence(), 1.0, 0.1, overshoot_decay=0.5,
                              overshoot_scope='online')
