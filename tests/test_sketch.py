"""Frequent-directions sketches of Shampoo's statistics: the update against a float64
numpy reference (an SVD of the stacked columns), the sketch never decreasing and
dominating the exact statistic, the root against a dense eigendecomposition, and the
sketched Shampoo direction of ``scale_by_kronecker_statistics``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamd_jax import blended, sketch, statistics


def _numpy_update(basis, escaped, columns):
  """Frequent directions in float64 numpy, by an SVD of ``[B, G]`` (not the Gram)."""
  rank = basis.shape[1]
  u, s, _ = np.linalg.svd(np.hstack([basis, columns]), full_matrices=False)
  w = s ** 2  # decreasing
  delta = w[rank] if len(w) > rank else 0.0
  kept = np.sqrt(np.maximum(w[:rank] - delta, 0))
  return u[:, :rank] * kept, escaped + delta


def _dense(state):
  basis = np.asarray(state.basis, np.float64)
  return basis @ basis.T + float(state.escaped) * np.eye(basis.shape[0])


def _dense_root(statistic, other_size, epsilon, relative_epsilon):
  """The damped inverse fourth root of ``statistic / other_size``, dense."""
  values, vectors = np.linalg.eigh(statistic / other_size)
  values = np.maximum(values, 0)
  floor = epsilon + relative_epsilon * values.max()
  return (vectors * (values + floor) ** -0.25) @ vectors.T


def _root_matrix(root):
  u = np.asarray(root.vectors, np.float64)
  return float(root.identity) * np.eye(u.shape[0]) + (u * np.asarray(root.weights)) @ u.T


def _stream(seed, steps, size, width, scales=None):
  rng = np.random.default_rng(seed)
  scales = np.ones(size) if scales is None else scales
  return [scales[:, None] * rng.standard_normal((size, width)) for _ in range(steps)]


def test_update_matches_an_svd_reference_never_decreases_and_dominates(x64):
  size, width, rank = 12, 3, 4
  # Decaying scales: the sketch keeps the large directions and drops mass into rho.
  stream = _stream(0, 8, size, width, scales=np.geomspace(3.0, 0.1, size))
  state = sketch.init(size, rank, jnp.float64)
  basis, escaped = np.zeros((size, rank)), 0.0
  exact, previous = np.zeros((size, size)), np.zeros((size, size))
  for columns in stream:
    state, vectors, values = sketch.update(state, jnp.asarray(columns))
    basis, escaped = _numpy_update(basis, escaped, columns)
    np.testing.assert_allclose(_dense(state), basis @ basis.T + escaped * np.eye(size),
                               rtol=1e-9, atol=1e-9)
    # The returned directions and eigenvalues describe the same sketch.
    u = np.asarray(vectors)
    np.testing.assert_allclose(u.T @ u, np.diag((np.asarray(values) > 0) * 1.0), atol=1e-9)
    np.testing.assert_allclose((u * np.asarray(values)) @ u.T, basis @ basis.T, atol=1e-9)
    exact += columns @ columns.T
    current = _dense(state)
    # hat L_t >= hat L_{t-1} + G G^T, and hat L_t >= L_t.
    assert np.linalg.eigvalsh(current - previous - columns @ columns.T).min() > -1e-9
    assert np.linalg.eigvalsh(current - exact).min() > -1e-9
    previous = current
  assert float(state.escaped) > 0  # the stream's rank (24) is over the sketch's (4)


def test_a_stream_within_the_rank_is_kept_exactly(x64):
  """Gradients in a fixed 3-dimensional subspace: a rank-4 sketch is the statistic."""
  size, width, rank = 10, 2, 4
  subspace = np.linalg.qr(np.random.default_rng(1).standard_normal((size, 3)))[0]
  state, exact = sketch.init(size, rank, jnp.float64), np.zeros((size, size))
  for columns in _stream(2, 6, 3, width):
    columns = subspace @ columns
    state, _, _ = sketch.update(state, jnp.asarray(columns))
    exact += columns @ columns.T
  assert float(state.escaped) < 1e-12
  np.testing.assert_allclose(_dense(state), exact, atol=1e-10)


@pytest.mark.parametrize('epsilon, relative_epsilon', [(1e-8, 1e-4), (0.1, 0.0), (1e-3, 0.5)])
def test_root_matches_a_dense_eigendecomposition(x64, epsilon, relative_epsilon):
  size, width, rank, other = 9, 2, 3, 5
  state = sketch.init(size, rank, jnp.float64)
  for columns in _stream(3, 4, size, width):
    state, vectors, values = sketch.update(state, jnp.asarray(columns))
  root = sketch.inverse_fourth_root(vectors, values, state.escaped, other, epsilon,
                                    relative_epsilon)
  dense = _dense_root(_dense(state), other, epsilon, relative_epsilon)
  np.testing.assert_allclose(_root_matrix(root), dense, rtol=1e-9, atol=1e-12)
  matrix = np.random.default_rng(4).standard_normal((size, 7))
  np.testing.assert_allclose(sketch.apply_root(root, jnp.asarray(matrix), 'left'),
                             dense @ matrix, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(sketch.apply_root(root, jnp.asarray(matrix.T), 'right'),
                             matrix.T @ dense, rtol=1e-9, atol=1e-12)


def test_the_first_update_drops_the_zero_directions(x64):
  """An empty rank-6 sketch meeting a rank-2 gradient keeps 2 directions, no zero noise."""
  columns = np.random.default_rng(5).standard_normal((8, 2))
  state, vectors, values = sketch.update(sketch.init(8, 6, jnp.float64), jnp.asarray(columns))
  assert int(np.sum(np.asarray(values) > 0)) == 2
  assert np.all(np.isfinite(np.asarray(vectors)))
  assert float(state.escaped) == 0.0
  np.testing.assert_allclose(_dense(state), columns @ columns.T, atol=1e-10)


def test_kronecker_statistics_with_a_sketch_against_a_numpy_reference(x64):
  """A 12 x 2 leaf with ``sketch_rank=3`` (12 > 3 + 2): its left side is sketched and its
  root fresh at every step, its right side and the bias whole on their schedule. Each
  direction is ``A_t G B_t`` with ``A_t`` the dense root of the numpy sketch and ``B_t``
  that of ``R`` at its last refresh, and ``K_t = A_t^{-1} ⊗ B_t^{-1}`` never decreases."""
  epsilon, relative_epsilon, refresh_every = 1e-6, 1e-4, 3
  optimizer = statistics.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=relative_epsilon, refresh_every=refresh_every, sketch_rank=3)
  params = {'w': jnp.zeros((12, 2)), 'b': jnp.zeros((2,))}
  state = optimizer.init(params)
  assert isinstance(state.left['w'], sketch.SketchState)
  assert state.left['w'].basis.shape == (12, 3) and state.right['w'].shape == (2, 2)
  assert state.left['b'].shape == (1, 1)  # a bias: one row, whole
  update = jax.jit(optimizer.update)
  rng = np.random.default_rng(6)
  basis, escaped, right = np.zeros((12, 3)), 0.0, np.zeros((2, 2))
  right_root, previous = None, None
  for t in range(1, 10):
    g = rng.standard_normal((12, 2)) * np.geomspace(2.0, 0.2, 12)[:, None]
    directions, state = update({'w': jnp.asarray(g), 'b': jnp.ones(2)}, state)
    basis, escaped = _numpy_update(basis, escaped, g)
    right += g.T @ g
    if t <= refresh_every or (t - 1) % refresh_every == 0:
      right_root = _dense_root(right, 12, epsilon, relative_epsilon)
    left_root = _dense_root(basis @ basis.T + escaped * np.eye(12), 2, epsilon,
                            relative_epsilon)
    np.testing.assert_allclose(directions['w'], left_root @ g @ right_root, rtol=1e-8,
                               atol=1e-10)
    metric = np.kron(np.linalg.inv(left_root), np.linalg.inv(right_root))
    if previous is not None:
      assert np.linalg.eigvalsh(metric - previous).min() > -1e-9 * np.abs(metric).max()
    previous = metric


def test_an_exact_sketch_gives_shampoo_s_direction():
  """Gradients of rank at most the sketch's: the sketched direction is the whole
  statistic's (every root fresh at every step: ``refresh_every=1``), in float32."""
  size, width, rank = 20, 2, 4
  subspace = np.linalg.qr(np.random.default_rng(7).standard_normal((size, 2)))[0]
  whole = statistics.scale_by_kronecker_statistics(refresh_every=1)
  sketched = statistics.scale_by_kronecker_statistics(refresh_every=1, sketch_rank=rank)
  params = {'w': jnp.zeros((size, width))}
  states = whole.init(params), sketched.init(params)
  for columns in _stream(8, 5, 2, width):
    grads = {'w': jnp.asarray(subspace @ columns, jnp.float32)}
    (a, state_a), (b, state_b) = (opt.update(grads, s) for opt, s in
                                  zip((whole, sketched), states))
    states = state_a, state_b
    np.testing.assert_allclose(b['w'], a['w'], rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize('sketch_rank, block_size, match', [
    (0, None, 'sketch_rank'), (2.5, None, 'sketch_rank'), (True, None, 'sketch_rank'),
    (4, 8, 'block_size')])
def test_bad_sketch_ranks_are_named(sketch_rank, block_size, match):
  with pytest.raises(ValueError, match=match):
    statistics.scale_by_kronecker_statistics(sketch_rank=sketch_rank, block_size=block_size)
  with pytest.raises(ValueError, match=match):
    blended.blended_metamd({}, None, 0.1, statistics='kronecker', sketch_rank=sketch_rank,
                           block_size=block_size)


@pytest.mark.parametrize('sketch_interval, refresh_growth', [(2, None), (3, None), (0, None),
                                                              (0, 0.3)])
def test_sketch_merged_every_few_steps_against_a_numpy_reference(x64, sketch_interval,
                                                                refresh_growth):
  """``sketch_interval=j`` merges ``sqrt(c) G`` at steps 1, 1 + j, ... (0: at the leaf's
  root refreshes), ``c`` the gradient mass since the last merge over ``||G||_F^2``, and
  keeps the last root in between; the numpy sketch does the same by an SVD. The metric
  ``K_t`` still never decreases."""
  epsilon, relative_epsilon, refresh_every = 1e-6, 1e-4, 3
  optimizer = statistics.scale_by_kronecker_statistics(
      epsilon, relative_epsilon=relative_epsilon, refresh_every=refresh_every, sketch_rank=3,
      sketch_interval=sketch_interval, refresh_growth=refresh_growth)
  params = {'w': jnp.zeros((12, 2)), 'b': jnp.zeros((2,))}
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  rng = np.random.default_rng(9)
  basis, escaped, right = np.zeros((12, 3)), 0.0, np.zeros((2, 2))
  mass = merged = refreshed = 0.0
  right_root = left_root = previous = None
  merges = 0
  for t in range(1, 14):
    # Growing gradients, so that refresh_growth refreshes off the schedule too.
    g = rng.standard_normal((12, 2)) * np.geomspace(2.0, 0.2, 12)[:, None] * 1.15 ** t
    directions, state = update({'w': jnp.asarray(g), 'b': jnp.ones(2)}, state)
    right += g.T @ g
    mass += float(np.sum(g ** 2))
    due = t <= refresh_every or (t - 1) % refresh_every == 0
    if refresh_growth is not None:
      due = due or mass > (1 + refresh_growth) * refreshed
    if due:
      right_root = _dense_root(right, 12, epsilon, relative_epsilon)
      refreshed = mass
    if (due if sketch_interval == 0 else (t - 1) % sketch_interval == 0):
      scale = np.sqrt((mass - merged) / np.sum(g ** 2))
      basis, escaped = _numpy_update(basis, escaped, scale * g)
      merged, merges = mass, merges + 1
      left_root = _dense_root(basis @ basis.T + escaped * np.eye(12), 2, epsilon,
                              relative_epsilon)
    np.testing.assert_allclose(directions['w'], left_root @ g @ right_root, rtol=1e-8,
                               atol=1e-10)
    np.testing.assert_allclose(float(state.merged[1]), merged, rtol=1e-12)  # leaves: b, w
    metric = np.kron(np.linalg.inv(left_root), np.linalg.inv(right_root))
    if previous is not None:
      assert np.linalg.eigvalsh(metric - previous).min() > -1e-9 * np.abs(metric).max()
    previous = metric
  assert 1 < merges < 13  # merged on some steps only


@pytest.mark.parametrize('sketch_interval', [1, 2, 4])
def test_a_repeated_gradient_merged_every_few_steps_is_the_whole_statistic(x64,
                                                                           sketch_interval):
  """The same gradient ``G`` (rank 2, within the sketch's rank 3) at every step: a merge at
  step ``t`` carries the mass of every step since the last, so the sketch is ``t G G^T``,
  the statistic itself, at each merge, and stays so until the next."""
  g = np.random.default_rng(10).standard_normal((12, 2))
  optimizer = statistics.scale_by_kronecker_statistics(sketch_rank=3,
                                                    sketch_interval=sketch_interval)
  state, update = optimizer.init({'w': jnp.zeros((12, 2))}), jax.jit(optimizer.update)
  last = 0
  for t in range(1, 10):
    _, state = update({'w': jnp.asarray(g)}, state)
    last = t if (t - 1) % sketch_interval == 0 else last
    np.testing.assert_allclose(_dense(state.left['w']), last * g @ g.T, rtol=1e-9,
                               atol=1e-9)


def test_a_zero_gradient_merges_nothing_and_its_mass_waits(x64):
  """A merge step with a zero gradient leaves the sketch as it was and keeps the mass
  since the last merge for the next one."""
  g = np.random.default_rng(11).standard_normal((12, 2))
  optimizer = statistics.scale_by_kronecker_statistics(sketch_rank=3, sketch_interval=2)
  state, update = optimizer.init({'w': jnp.zeros((12, 2))}), jax.jit(optimizer.update)
  for grad in (g, g, 0 * g, g, g):  # merges at steps 1, 3 (zero gradient) and 5
    _, state = update({'w': jnp.asarray(grad)}, state)
  assert np.all(np.isfinite(np.asarray(state.left['w'].basis)))
  np.testing.assert_allclose(_dense(state.left['w']), 4 * g @ g.T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('sketch_interval', [-1, True, 1.5, None])
def test_bad_sketch_intervals_are_named(sketch_interval):
  with pytest.raises(ValueError, match='sketch_interval'):
    statistics.scale_by_kronecker_statistics(sketch_rank=4, sketch_interval=sketch_interval)
  with pytest.raises(ValueError, match='sketch_interval'):
    blended.blended_metamd({}, None, 0.1, statistics='kronecker', sketch_rank=4,
                           sketch_interval=sketch_interval)
