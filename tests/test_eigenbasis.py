"""Eigenbasis MetaMD: never adapting is MetaMD, the steps are those of the dense metric the
scales define (float64 numpy, from the factors' own eigendecompositions), that metric never
decreases, calibrated levels keep frozen MetaMD's steps on the calibration tasks, vmap,
the blend, and bad arguments."""

import math

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_factor, flat
from helpers import ScaledLeastSquares, well_conditioned

import metamd_jax
from metamd_jax import divergence as divergence_lib
from metamd_jax import eigenbasis

SHAPES, STRUCTURES = helpers.SHAPES, helpers.STRUCTURES
_tree, _divergence = helpers.random_tree, helpers.random_divergence


def _never(divergence, rank=None):
  bases, _ = eigenbasis.leaf_bases(divergence, rank)
  return [tuple(np.full(size, math.inf) for size in eigenbasis.share_sizes(b))
          if b.inverse_values is None else (math.inf,) for b in bases]


def _run(optimizer, grads_list, params):
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  updates, states = [], []
  for grads in grads_list:
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
    states.append(state)
  return updates, states


@pytest.mark.parametrize('options, rank', [*[(options, None) for options in STRUCTURES],
                                           (STRUCTURES[0], 2), (STRUCTURES[1], 1)])
def test_never_adapting_is_metamd(options, rank):
  params = _tree(1)
  grads_list = [_tree(10 + t, scale=3.0 ** t) for t in range(5)]
  divergence = _divergence(options, seed=1, dtype=jnp.float32)
  ours, states = _run(eigenbasis.eigenbasis_metamd(divergence, _never(divergence, rank),
                                                   rank=rank),
                      grads_list, params)
  reference, _ = _run(metamd_jax.metamd(divergence), grads_list, params)
  for a, b in zip(ours, reference):
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-4)  # values up to ~150
  assert all(np.all(np.asarray(s) == 1) for leaf in states[-1][0].scales for s in leaf)


def _dense_inverse_factors(metric):
  """``P = L^{-1}``, ``Q = R^{-1}`` of a Kronecker metric in float64, from its raw factors."""
  left = np.linalg.inv(dense_factor(metric.left, metric.eps))
  right = np.linalg.inv(dense_factor(metric.right, metric.eps))
  return left, right


def _eigh(inverse, raw):
  """``(eigenvalues, eigenvectors)`` of an inverse factor; a diagonal factor (1-D raw) keeps
  its own order (its eigenbasis is the identity)."""
  if np.ndim(raw) == 1:
    return np.diag(inverse), np.eye(len(inverse))
  return np.linalg.eigh(inverse)


def _kept(basis):
  """Per side, how many eigendirections a ranked side keeps (``None``: a full side)."""
  return tuple(None if dense is None else len(values) for dense, values in
               ((basis.left_inverse, basis.left_values),
                (basis.right_inverse, basis.right_values)))


def _per_direction(scales, size, kept):
  """A side's scales, one per eigendirection (ascending eigenvalues): a ranked side's
  ``kept + 1`` scales are its ``kept`` largest directions' and the rest's, repeated."""
  scales = np.asarray(scales, np.float64)
  if kept is None:
    return scales
  return np.concatenate([np.full(size - kept, scales[-1]), scales[:-1]])


def _grouped(shares, kept):
  """Per-direction shares (ascending eigenvalues) summed as a ranked side groups them."""
  if kept is None:
    return shares
  return np.concatenate([shares[-kept:], [shares[:-kept].sum()]])


def _rotated(inverse, raw, scales, kept=None):
  """``U diag(eigvals / scales) U^T`` for ``inverse = U diag(eigvals) U^T``."""
  values, vectors = _eigh(inverse, raw)
  scales = _per_direction(scales, len(values), kept)
  return vectors @ np.diag(values / scales) @ vectors.T


def _leaf_inverse_metric(metric, scales, kept=(None, None)):
  """The dense ``M_t^{-1}`` of one leaf on its row-major flattening (float64)."""
  size = int(np.prod(metric.shape))
  if not isinstance(metric, divergence_lib.KroneckerMetric):
    values = np.asarray(metric.scale, np.float64).ravel() ** 2 + metric.eps
    return np.diag(np.broadcast_to(1 / values, (size,)) / float(scales[0]))
  left, right = _dense_inverse_factors(metric)
  dense = np.kron(_rotated(left, metric.left, scales[0], kept[0]),
                  _rotated(right, metric.right, scales[1], kept[1]))
  perm = tuple(metric.rows) + tuple(metric.cols)
  idx = np.arange(size).reshape(metric.shape).transpose(perm).ravel()
  full = np.zeros((size, size))
  full[np.ix_(idx, idx)] = dense
  return full


def _numpy_shares(metric, g, kept=(None, None)):
  """A leaf's shares of ``||g||^2_{M^{-1}}`` in float64: per row and column of the learned
  eigenbasis for a Kronecker leaf (a ranked side's rest grouped), the whole sum for an
  elementwise one."""
  g = np.asarray(g, np.float64)
  if isinstance(metric, divergence_lib.KroneckerMetric):
    left, right = _dense_inverse_factors(metric)
    (p, u), (q, v) = _eigh(left, metric.left), _eigh(right, metric.right)
    perm = tuple(metric.rows) + tuple(metric.cols)
    gm = g.transpose(perm).reshape(len(p), len(q))
    w = p[:, None] * (u.T @ gm @ v) ** 2 * q[None, :]
    return _grouped(w.sum(1), kept[0]), _grouped(w.sum(0), kept[1])
  values = np.asarray(metric.scale, np.float64).ravel() ** 2 + metric.eps
  return (np.sum(g.ravel() ** 2 / np.broadcast_to(values, (g.size,))),)


def _inverse_metric(divergence, scales, bases):
  blocks = [_leaf_inverse_metric(m, s, _kept(b)) for m, s, b in zip(
      jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric), scales, bases)]
  size = sum(len(b) for b in blocks)
  full, offset = np.zeros((size, size)), 0
  for b in blocks:
    full[offset:offset + len(b), offset:offset + len(b)] = b
    offset += len(b)
  return full


@pytest.mark.parametrize('options, rank', [
    *[(options, None) for options in STRUCTURES[:3]],
    (STRUCTURES[0], 2), (STRUCTURES[0], 3), (STRUCTURES[1], 2)])
def test_steps_are_the_dense_metric_of_the_scales_which_never_decreases(x64, options, rank):
  """Every update is ``-M_t^{-1} g_t`` for ``M_t`` built in numpy from the factors' own
  eigendecompositions and the state's scales; the scales follow a numpy loop of the rule
  (moving average, bias correction, running maximum), and ``M_t`` never decreases. With
  ``rank``, a ranked side's remaining directions share one share and one scale (rank 2
  ranks both sides of the ``(4, 3)`` and the convolution's leaves, rank 3 their left
  sides only)."""
  params = _tree(1)
  divergence = _divergence(options, seed=2)
  bases, _ = eigenbasis.leaf_bases(divergence, rank)
  assert (rank is not None) == any(b.left_inverse is not None for b in bases)
  rng = np.random.default_rng(3)
  # Low levels, different per direction: most scales grow, by different amounts.
  levels = [tuple(rng.uniform(0.05, 0.5, size) for size in eigenbasis.share_sizes(b))
            if b.inverse_values is None else (0.2,) for b in bases]
  decay = 0.8
  grads_list = [_tree(20 + t, scale=1.0 + t) for t in range(6)]
  updates, states = _run(eigenbasis.eigenbasis_metamd(divergence, levels, decay=decay,
                                                      rank=rank),
                         grads_list, params)
  metrics = jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)
  averages = [[np.zeros(np.shape(x)) for x in level] for level in levels]
  expected = [[np.ones(np.shape(x)) for x in level] for level in levels]
  previous = None
  for t, (grads, update, state) in enumerate(zip(grads_list, updates, states), start=1):
    state = state[0]  # the chain's first transformation
    for i, (metric, g) in enumerate(zip(metrics, jax.tree.leaves(grads))):
      shares = _numpy_shares(metric, g, _kept(bases[i]))
      for side, share in enumerate(shares):
        averages[i][side] = decay * averages[i][side] + (1 - decay) * share
        level = np.sqrt(averages[i][side] / (1 - decay ** t)) / levels[i][side]
        expected[i][side] = np.maximum(expected[i][side], level)
        np.testing.assert_allclose(state.scales[i][side], expected[i][side], rtol=1e-9)
    assert any(np.any(np.asarray(s) > 1) for leaf in state.scales for s in leaf)
    inverse = _inverse_metric(divergence, expected, bases)
    np.testing.assert_allclose(flat(update), -inverse @ flat(grads), rtol=1e-8, atol=1e-12)
    if previous is not None:  # M_t - M_{t-1} >= 0, i.e. M_{t-1}^{-1} - M_t^{-1} >= 0
      gap = np.linalg.eigvalsh(previous - inverse)
      assert gap.min() >= -1e-10 * np.abs(gap).max()
    previous = inverse


@pytest.mark.parametrize('options', STRUCTURES[:3])
def test_lengthened_first_steps_are_the_dense_metric_of_the_starting_scales(x64, options):
  """With ``lengthen_below=q``, each leaf's scales (and its per-leaf scale) start at
  ``clip(rho / q, min_scale, 1)``, ``rho`` its first gradient's norm in the learned geometry
  over its reference norm, then follow the running maximum: every update is ``-M_t^{-1}
  g_t`` for ``M_t`` built in numpy from those scales, ``M_t`` never decreases, and leaves
  with ``rho >= q`` step as without the option."""
  params = _tree(1)
  divergence = _divergence(options, seed=2)
  bases, _ = eigenbasis.leaf_bases(divergence)
  rng = np.random.default_rng(4)
  levels = [tuple(rng.uniform(0.5, 5.0, size) for size in eigenbasis.share_sizes(b))
            if b.inverse_values is None else (2.0,) for b in bases]
  grads_list = [_tree(30 + t, scale=1.0 + t) for t in range(5)]
  first = jax.tree.leaves(grads_list[0])
  solved = jax.tree.leaves(divergence_lib.solve_metric(divergence, grads_list[0]))
  norms = np.array([np.sqrt(np.sum(np.asarray(g) * np.asarray(m))) for g, m in
                    zip(first, solved)])
  # Per leaf rho = 0.01, 0.06, 3.0: starts clip(rho / 0.2, 0.1, 1) = 0.1, 0.3, 1.
  rho = np.array([0.01, 0.06, 3.0])[:len(norms)]
  reference = norms / rho
  below, floor, decay = 0.2, 0.1, 0.8
  starts = np.clip(rho / below, floor, 1.0)
  np.testing.assert_allclose(starts, [0.1, 0.3, 1.0][:len(norms)], rtol=1e-12)
  optimizer = eigenbasis.scale_by_eigenbasis_mirror_descent(
      divergence, levels, reference, decay=decay, lengthen_below=below, min_scale=floor)
  updates, states = _run(optimizer, grads_list, params)
  plain, plain_states = _run(eigenbasis.scale_by_eigenbasis_mirror_descent(
      divergence, levels, reference, decay=decay), grads_list, params)
  metrics = jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)
  averages = [[np.zeros(np.shape(x)) for x in level] for level in levels]
  expected = [[np.full(np.shape(x), start) for x in level]
              for level, start in zip(levels, starts)]
  leaf_average, leaf_scale = np.zeros(len(norms)), starts.copy()
  previous = None
  for t, (grads, update, state) in enumerate(zip(grads_list, updates, states), start=1):
    squared = np.zeros(len(norms))
    for i, (metric, g) in enumerate(zip(metrics, jax.tree.leaves(grads))):
      shares = _numpy_shares(metric, g)
      squared[i] = np.sum(shares[0])
      for side, share in enumerate(shares):
        averages[i][side] = decay * averages[i][side] + (1 - decay) * share
        level = np.sqrt(averages[i][side] / (1 - decay ** t)) / levels[i][side]
        expected[i][side] = np.maximum(expected[i][side], level)
        np.testing.assert_allclose(state.scales[i][side], expected[i][side], rtol=1e-9)
    leaf_average = decay * leaf_average + (1 - decay) * squared
    leaf_scale = np.maximum(leaf_scale, np.sqrt(leaf_average / (1 - decay ** t)) / reference)
    np.testing.assert_allclose(state.scale, leaf_scale, rtol=1e-9)
    inverse = _inverse_metric(divergence, expected, bases)
    np.testing.assert_allclose(flat(update), inverse @ flat(grads), rtol=1e-8, atol=1e-12)
    if previous is not None:  # M_t - M_{t-1} >= 0
      gap = np.linalg.eigvalsh(previous - inverse)
      assert gap.min() >= -1e-10 * np.abs(gap).max()
    previous = inverse
  # The first step: longer than the learned one on the first two leaves, as without the
  # option on the last (rho above q).
  ours, theirs = jax.tree.leaves(updates[0]), jax.tree.leaves(plain[0])
  assert np.linalg.norm(ours[0]) > 1.5 * np.linalg.norm(theirs[0])
  np.testing.assert_allclose(ours[-1], theirs[-1], rtol=1e-12)
  assert np.all(np.asarray(plain_states[0].scale) >= 1)


def test_lengthen_arguments_are_checked():
  divergence = _divergence(STRUCTURES[0], seed=8, dtype=jnp.float32)
  levels = _never(divergence)
  for value in (0, 1.5, -0.1, True, '0.1', math.nan):
    with pytest.raises(ValueError, match='lengthen_below must be a number in'):
      eigenbasis.scale_by_eigenbasis_mirror_descent(divergence, levels, 1.0,
                                                    lengthen_below=value)
    with pytest.raises(ValueError, match='min_scale must be a number in'):
      eigenbasis.scale_by_eigenbasis_mirror_descent(divergence, levels, 1.0,
                                                    lengthen_below=0.1, min_scale=value)
  with pytest.raises(ValueError, match='pass reference_norm'):
    eigenbasis.scale_by_eigenbasis_mirror_descent(divergence, levels, lengthen_below=0.1)
  with pytest.raises(ValueError, match='eigenbasis learned half is off'):
    metamd_jax.blended_metamd(divergence, 1.0, 0.1, eigenbasis_lengthen_below=0.1)
  # A leaf whose reference norm is inf never adapts, and never lengthens either.
  params = _tree(9)
  ours, _ = _run(eigenbasis.scale_by_eigenbasis_mirror_descent(
      divergence, levels, [math.inf] * 3, lengthen_below=1.0), [_tree(50)], params)
  theirs, _ = _run(metamd_jax.metamd(divergence), [_tree(50)], params)
  chex.assert_trees_all_close(ours[0], jax.tree.map(lambda x: -x, theirs[0]), rtol=2e-5,
                              atol=1e-6)


@pytest.mark.parametrize('rank', [None, 3])
def test_calibrated_levels_keep_frozen_steps_on_the_calibration_tasks(rank):
  family = ScaledLeastSquares()
  unit = well_conditioned(metamd_jax.init_divergence(family.init_params(), 1.0), seed=1,
                          noise=0.3)
  divergence = divergence_lib.scale_steps(unit, 0.05)
  task_params = family.sample_batch(jax.random.key(1), 4)
  num_steps = 20
  levels = eigenbasis.eigenbasis_levels(divergence, family, task_params, num_steps,
                                        rank=rank)
  # The bias (4,) and the weight (8, 4); rank 3 ranks the sides of 4 and 8.
  assert [[len(x) for x in leaf] for leaf in levels] == (
      [[4, 1], [8, 4]] if rank is None else [[4, 1], [4, 4]])

  def run(levels):
    optimizer = eigenbasis.eigenbasis_metamd(divergence, levels, rank=rank)
    return jax.jit(jax.vmap(lambda tp: one(optimizer, tp)))(task_params)

  def one(optimizer, tp):
    task = family.task(tp)

    def body(carry, step):
      params, state, frozen = carry
      updates, state = optimizer.update(jax.grad(task.loss)(params, task.batch(step)), state)
      frozen = jax.tree.map(lambda p, d: p - d, frozen, divergence_lib.solve_metric(
          divergence, jax.grad(task.loss)(frozen, task.batch(step))))
      return (optax.apply_updates(params, updates), state, frozen), None

    params = task.init()
    (params, state, frozen), _ = jax.lax.scan(body, (params, optimizer.init(params), params),
                                              jnp.arange(num_steps))
    return params, frozen, state[0].scales

  params, frozen, scales = run([tuple(x * (1 + 1e-5) for x in leaf) for leaf in levels])
  chex.assert_trees_all_close(params, frozen, rtol=1e-4, atol=1e-6)
  assert all(np.all(np.asarray(s) == 1) for leaf in scales for s in leaf)
  # The peak of each share is reached on some task: a lower level adapts there.
  _, _, scales = run([tuple(x * 0.5 for x in leaf) for leaf in levels])
  assert any(np.any(np.asarray(s) > 1) for leaf in scales for s in leaf)
  with pytest.raises(ValueError, match='quantile'):
    eigenbasis.eigenbasis_levels(divergence, family, task_params, 5, quantile=2.0)
  with pytest.raises(ValueError, match='diverges on 4 calibration task'):
    eigenbasis.eigenbasis_levels(unit, family, task_params, 100)


def test_levels_of_runs_that_do_not_train_are_refused():
  """Steps 20 times too long: finite runs that end above their start (as
  ``reference_gradient_norm`` finds on the same runs); their levels only without
  ``require_training``."""
  family = ScaledLeastSquares()
  unit = well_conditioned(metamd_jax.init_divergence(family.init_params(), 1.0), seed=1,
                          noise=0.3)
  task_params = family.sample_batch(jax.random.key(1), 2)
  grows = divergence_lib.scale_steps(unit, 1.0)
  with pytest.raises(ValueError, match='initial loss .* on 2 of 2') as error:
    eigenbasis.eigenbasis_levels(grows, family, task_params, 10)
  with pytest.raises(ValueError, match='initial loss .* on 2 of 2') as theirs:
    metamd_jax.reference_gradient_norm(grows, family, task_params, 10)
  assert 'diverges' not in str(error.value) and 'diverges' not in str(theirs.value)
  levels = eigenbasis.eigenbasis_levels(grows, family, task_params, 10,
                                        require_training=False)
  assert all(np.all(np.isfinite(x)) for leaf in levels for x in leaf)
  with pytest.raises(TypeError, match='require_training'):
    eigenbasis.eigenbasis_levels(grows, family, task_params, 10, require_training='no')


def test_under_vmap_equals_one_task_at_a_time():
  divergence = _divergence(STRUCTURES[0], seed=4, dtype=jnp.float32)
  bases, _ = eigenbasis.leaf_bases(divergence)
  levels = [(np.full(len(b.left_values), 0.3), np.full(len(b.right_values), 0.3))
            if b.inverse_values is None else (0.3,) for b in bases]
  optimizer = eigenbasis.eigenbasis_metamd(divergence, levels)
  params = _tree(5)
  grads = jax.tree.map(lambda *x: jnp.stack(x), *[_tree(30 + i, 2.0) for i in range(3)])

  def one(g):
    return optimizer.update(g, optimizer.init(params), params)[0]

  batched = jax.jit(jax.vmap(one))(grads)
  for i in range(3):
    single = jax.jit(one)(jax.tree.map(lambda x, i=i: x[i], grads))
    chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], batched), single,
                                rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('rank', [None, 2])
def test_as_the_learned_half_of_blended_metamd(rank):
  divergence = _divergence(STRUCTURES[0], seed=6, dtype=jnp.float32)
  params = _tree(7)
  grads_list = [_tree(40 + t, scale=2.0 ** t) for t in range(4)]
  bases, _ = eigenbasis.leaf_bases(divergence, rank)
  levels = [tuple(np.full(size, 0.2) for size in eigenbasis.share_sizes(b))
            if b.inverse_values is None else (0.2,) for b in bases]
  leaf_levels = [0.5] * len(bases)
  blended = metamd_jax.blended_metamd(divergence, leaf_levels, 0.3, per_leaf=True,
                                      eigenbasis_levels=levels, eigenbasis_rank=rank)
  learned = eigenbasis.scale_by_eigenbasis_mirror_descent(divergence, levels, leaf_levels,
                                                          rank=rank)
  online = metamd_jax.statistics.scale_by_factored_statistics(1e-8)
  ours, states = _run(blended, grads_list, params)
  learned_state, online_state = learned.init(params), online.init(params)
  for grads, update, state in zip(grads_list, ours, states):
    a, learned_state = learned.update(grads, learned_state)
    b, online_state = online.update(grads, online_state)
    leaves = jax.tree.leaves(b)
    scaled = jax.tree.unflatten(jax.tree.structure(b), [
        x / learned_state.scale[i] for i, x in enumerate(leaves)])
    expected = jax.tree.map(lambda x, y: -(x + 0.3 * y), a, scaled)
    chex.assert_trees_all_close(update, expected, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(state[0].adaptive.scale, learned_state.scale)
  assert np.all(np.asarray(learned_state.scale) > 1)  # leaf levels 0.5: every leaf adapted
  with pytest.raises(ValueError, match='per_leaf=True'):
    metamd_jax.blended_metamd(divergence, 0.5, 0.3, eigenbasis_levels=levels)
  with pytest.raises(ValueError, match='eigenbasis_rank=2 ranks'):
    metamd_jax.blended_metamd(divergence, 0.5, 0.3, eigenbasis_rank=2)
  with pytest.raises(ValueError, match='rank must be None'):
    metamd_jax.blended_metamd(divergence, leaf_levels, 0.3, per_leaf=True,
                              eigenbasis_levels=levels, eigenbasis_rank=0)


def test_bad_levels_and_a_traced_divergence_are_named():
  divergence = _divergence(STRUCTURES[0], seed=8, dtype=jnp.float32)
  levels = _never(divergence)
  with pytest.raises(ValueError, match='one entry per parameter leaf'):
    eigenbasis.eigenbasis_metamd(divergence, levels[:-1])
  with pytest.raises(ValueError, match='one entry per parameter leaf'):
    eigenbasis.eigenbasis_metamd(divergence, None)
  with pytest.raises(ValueError, match=r'a list with one entry per parameter leaf .*got 1\.0'):
    eigenbasis.eigenbasis_metamd(divergence, 1.0)  # before: "float has no len()"
  kronecker = next(i for i, x in enumerate(levels) if len(x) == 2)
  bad = list(levels)
  bad[kronecker] = (levels[kronecker][0][:-1], levels[kronecker][1])
  with pytest.raises(ValueError, match=rf'levels\[{kronecker}\]\[0\] has shape'):
    eigenbasis.eigenbasis_metamd(divergence, bad)
  bad[kronecker] = (-levels[kronecker][0], levels[kronecker][1])
  with pytest.raises(ValueError, match='not positive'):
    eigenbasis.eigenbasis_metamd(divergence, bad)
  bad[kronecker] = (levels[kronecker][0] * np.nan, levels[kronecker][1])
  with pytest.raises(ValueError, match='not positive'):
    eigenbasis.eigenbasis_metamd(divergence, bad)
  bad[kronecker] = (levels[kronecker][0],)
  with pytest.raises(ValueError, match='must hold 2 arrays'):
    eigenbasis.eigenbasis_metamd(divergence, bad)
  # JSON writes inf as null: read back as never adapting.
  as_json = [[[None] * len(x) if np.ndim(x) else None for x in leaf] for leaf in levels]
  params = _tree(9)
  ours, _ = _run(eigenbasis.eigenbasis_metamd(divergence, as_json), [_tree(50)], params)
  theirs, _ = _run(metamd_jax.metamd(divergence), [_tree(50)], params)
  chex.assert_trees_all_close(ours[0], theirs[0], rtol=2e-5, atol=1e-6)
  with pytest.raises(TypeError, match='concrete divergence'):
    jax.jit(lambda d: eigenbasis.eigenbasis_metamd(d, levels).init(params))(divergence)
  # A concrete divergence closed over, the optimiser built inside the traced function: its
  # eigendecompositions are made then (before, "needs a concrete divergence").
  finite = [tuple(np.ones_like(x) for x in leaf) for leaf in levels]

  def first_update(p):
    optimizer = eigenbasis.eigenbasis_metamd(divergence, finite)
    return optimizer.update(_tree(50), optimizer.init(p), p)[0]

  chex.assert_trees_all_close(jax.jit(first_update)(params), first_update(params),
                              rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='decay'):
    eigenbasis.eigenbasis_metamd(divergence, levels, decay=1.0)
  for rank in (0, -1, 2.0, True, '2'):
    with pytest.raises(ValueError, match='rank must be None'):
      eigenbasis.eigenbasis_metamd(divergence, levels, rank=rank)
  # Levels of the full sides given to ranked ones: named by leaf and side.
  with pytest.raises(ValueError, match=r'levels\[\d\]\[0\] has shape'):
    eigenbasis.eigenbasis_metamd(divergence, levels, rank=2)
