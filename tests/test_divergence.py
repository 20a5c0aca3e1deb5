"""Divergences against dense-matrix references (float64)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_block_metric, dense_metric, flat, randomize
from helpers import well_conditioned

import metamd_jax
from metamd_jax import divergence as divergence_lib

SHAPES = {
    'dense': (5, 3),
    'conv': (2, 2, 3, 4),
    'bias': (4,),
    'scalar': (),
}


def _params(seed=0, dtype=None):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


STRUCTURE_CASES = [
    dict(structure='kronecker'),
    dict(structure='kronecker', max_factor_size=3),  # some factors diagonal
    dict(structure='kronecker',
         dimension_numbers=lambda path, leaf: (metamd_jax.KroneckerAxes(rows=(3, 0), cols=(2, 1))
                                               if len(leaf.shape) == 4 else None)),
    dict(structure='diagonal'),
    dict(structure='scalar'),
]


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_mirror_step_is_the_dense_argmin(x64, options):
  params, grads = _params(0), _params(1)
  # Random meta-parameters, conditioned so that float64 solves agree to 1e-10.
  divergence = well_conditioned(
      metamd_jax.init_divergence(params, 0.1, dtype=jnp.float64, **options), seed=2, noise=0.5)
  new = metamd_jax.mirror_step(divergence, params, grads)
  metric = dense_block_metric(divergence)
  # argmin_x <g, x> + 1/2 (x - theta)^T M (x - theta)  <=>  M (x - theta) = -g
  expected = flat(params) + np.linalg.solve(metric, -flat(grads))
  np.testing.assert_allclose(flat(new), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_transform_direction_is_the_dense_preconditioner(x64, options):
  params, grads = _params(0), _params(1)
  divergence = well_conditioned(
      metamd_jax.init_divergence(params, 0.1, dtype=jnp.float64, **options), seed=3, noise=0.5)
  tx = metamd_jax.scale_by_mirror_descent(divergence)
  direction, _ = tx.update(grads, tx.init(params))
  expected = np.linalg.solve(dense_block_metric(divergence), flat(grads))
  np.testing.assert_allclose(flat(direction), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_bregman_matches_dense_quadratic_form(x64, options):
  x, y = _params(4), _params(5)
  divergence = randomize(metamd_jax.init_divergence(x, 0.1, dtype=jnp.float64, **options),
                         seed=6)
  diff = flat(x) - flat(y)
  expected = 0.5 * diff @ dense_block_metric(divergence) @ diff
  value = metamd_jax.bregman_divergence(divergence, x, y)
  np.testing.assert_allclose(float(value), expected, rtol=1e-10)
  assert float(value) > 0
  assert float(metamd_jax.bregman_divergence(divergence, x, x)) == 0.0


def test_bregman_is_positive_for_random_pairs(x64):
  divergence = randomize(metamd_jax.init_divergence(_params(), 0.1, dtype=jnp.float64), seed=7)
  for seed in range(10):
    value = metamd_jax.bregman_divergence(divergence, _params(seed), _params(seed + 100))
    assert float(value) > 0


def test_bregman_names_a_point_of_other_shapes():
  """A ``(3,)`` leaf where the params have ``(5, 3)`` would broadcast in ``x - y``."""
  divergence = metamd_jax.init_divergence(_params(), 0.1)
  short = {**_params(1), 'dense': jnp.zeros(3)}
  for x, y, name in ((short, _params(2), 'x'), (_params(2), short, 'y')):
    with pytest.raises(ValueError, match=rf"{name}.*\['dense'\].*\(3,\)"):
      metamd_jax.bregman_divergence(divergence, x, y)
  with pytest.raises(ValueError, match='y'):
    metamd_jax.bregman_divergence(divergence, _params(1), {'dense': _params(2)['dense']})


@pytest.mark.parametrize('case', ['random', 'huge', 'tiny', 'zero', 'rank_one', 'negative'])
def test_eigenvalue_floor_holds(x64, case):
  params = _params()
  eps = 1e-2
  divergence = metamd_jax.init_divergence(params, 0.1, eps=eps, dtype=jnp.float64)
  if case == 'random':
    divergence = randomize(divergence, seed=8)
  elif case == 'huge':
    divergence = randomize(divergence, seed=8, scale=1e6)
  elif case == 'tiny':
    divergence = randomize(divergence, seed=8, scale=1e-9)
  elif case == 'zero':
    divergence = jax.tree.map(jnp.zeros_like, divergence)
  elif case == 'rank_one':
    divergence = jax.tree.map(
        lambda a: jnp.outer(jnp.arange(a.shape[0]), jnp.ones(a.shape[1])) if a.ndim == 2 else a,
        divergence)
  elif case == 'negative':
    divergence = jax.tree.map(lambda a: -jnp.abs(a) * 5, divergence)
  for metric in jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric):
    eigenvalues = np.linalg.eigvalsh(dense_metric(metric))
    assert eigenvalues.min() >= metric.floor() * (1 - 1e-6)
  sigma, floor = metamd_jax.strong_convexity(divergence)
  assert floor == eps ** 2
  assert float(sigma) >= floor * (1 - 1e-6)


def test_init_reproduces_sgd_learning_rate():
  params = _params(dtype=np.float32)
  grads = _params(1, dtype=np.float32)
  for structure in ('kronecker', 'diagonal', 'scalar'):
    divergence = metamd_jax.init_divergence(params, 0.03, structure=structure)
    new = metamd_jax.mirror_step(divergence, params, grads)
    expected = jax.tree.map(lambda p, g: p - 0.03 * g, params, grads)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_init_from_shapes_equals_init_from_arrays(options):
  """``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``) give the divergence the arrays
  give, bit for bit: only shapes and dtypes are read."""
  params = _params()
  shapes = jax.eval_shape(lambda: params)
  from_arrays = metamd_jax.init_divergence(params, 0.03, **options)
  from_shapes = metamd_jax.init_divergence(shapes, 0.03, **options)
  assert jax.tree.structure(from_shapes) == jax.tree.structure(from_arrays)
  for a, b in zip(jax.tree.leaves(from_shapes), jax.tree.leaves(from_arrays)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_operators_compile_once_per_structure_and_equal_each_metrics_own():
  """:func:`divergence.operators` is one compiled program per divergence structure: a
  second divergence of the same shapes reuses it, with its own values, each metric's own
  :meth:`operator` computed operation by operation."""
  params = _params()
  first = randomize(metamd_jax.init_divergence(params, 0.1, max_factor_size=3), seed=1)
  second = randomize(first, seed=2)
  before = divergence_lib._operators._cache_size()
  for divergence in (first, second):
    for inverse_only in (False, True):
      got = divergence_lib.operators(divergence, inverse_only=inverse_only)
      metrics = jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)
      want = [m.operator(inverse_only=inverse_only) for m in metrics]
      assert len(jax.tree.leaves(got, is_leaf=divergence_lib.is_operator)) == len(want)
      for g, w in zip(jax.tree.leaves(got, is_leaf=divergence_lib.is_operator), want):
        assert type(g) is type(w)
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
          # Equal to float32 rounding: one compiled program may round otherwise than
          # operation by operation (bit for bit on these shapes on the 2-core CPU).
          np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # One program for each inverse_only, shared by both divergences.
  assert divergence_lib._operators._cache_size() - before <= 2
  assert not np.allclose(jax.tree.leaves(divergence_lib.preconditioner(first))[0],
                         jax.tree.leaves(divergence_lib.preconditioner(second))[0])


def test_large_factors_become_diagonal():
  params = {'embedding': jnp.zeros((5000, 8)), 'dense': jnp.zeros((16, 8))}
  divergence = metamd_jax.init_divergence(params, 0.1, max_factor_size=1024)
  assert divergence['embedding'].left.shape == (5000,)
  assert divergence['embedding'].right.shape == (8, 8)
  assert divergence['dense'].left.shape == (16, 16)


@pytest.mark.parametrize('learning_rate', [0.0, -1.0, float('nan'), float('inf')])
def test_init_rejects_bad_learning_rate(learning_rate):
  with pytest.raises(ValueError, match='learning_rate'):
    metamd_jax.init_divergence(_params(), learning_rate)


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.float16, jnp.bfloat16, jnp.complex64, 'x'])
def test_init_rejects_a_dtype_that_is_not_float32_or_float64(dtype):
  """An integer dtype would truncate the factors (a step ten times too long at lr 0.1);
  a half-precision one has no Cholesky factorisation."""
  with pytest.raises(ValueError, match='dtype must be float32 or float64'):
    metamd_jax.init_divergence(_params(), 0.1, dtype=dtype)


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_])
def test_a_divergence_that_is_not_of_floats_is_named_before_any_computation(dtype):
  """Integer factors (e.g. a hand-made file) would truncate the metric: named by every
  use, naming the leaf."""
  divergence = jax.tree.map(lambda x: x.astype(dtype), metamd_jax.init_divergence(_params(), 0.1))
  with pytest.raises(ValueError, match=r"divergence leaf \[.*\]\.\w+ must be a float array, "
                                       rf'got {jnp.dtype(dtype)}'):
    metamd_jax.metamd(divergence)
  with pytest.raises(ValueError, match='must be a float array'):
    metamd_jax.mirror_step(divergence, _params(), _params())


def test_init_rejects_learning_rate_beyond_the_floor():
  with pytest.raises(ValueError, match='eps'):
    metamd_jax.init_divergence(_params(), 1e8, eps=1e-3)


def test_init_rejects_bad_options():
  with pytest.raises(ValueError, match='structure'):
    metamd_jax.init_divergence(_params(), 0.1, structure='full')
  with pytest.raises(ValueError, match='every axis'):
    metamd_jax.init_divergence(
        {'w': jnp.zeros((2, 3, 4))}, 0.1,
        dimension_numbers=metamd_jax.KroneckerAxes(rows=(0,), cols=(1,)))
  with pytest.raises(ValueError, match='eps'):
    metamd_jax.init_divergence(_params(), 0.1, eps=0.0)


def test_dimension_numbers_as_a_pytree_are_matched_by_key():
  """A pytree of axes goes with the params' leaves by key (a dict's insertion order does
  not matter); other keys, another container, or a plain tuple for an axes are named."""
  params = {'attn': jnp.ones((4, 2, 3)), 'dense': jnp.ones((4, 6))}
  axes = metamd_jax.KroneckerAxes((0,), (1, 2))
  want = metamd_jax.init_divergence(params, 0.1, dimension_numbers=lambda path, leaf: (
      axes if leaf.ndim == 3 else None))
  assert want['attn'].left.shape == (4, 4) and want['attn'].right.shape == (6, 6)
  for dimension_numbers in ({'attn': axes, 'dense': None}, {'dense': None, 'attn': axes}):
    got = metamd_jax.init_divergence(params, 0.1, dimension_numbers=dimension_numbers)
    chex.assert_trees_all_equal(got, want)
  with pytest.raises(ValueError, match=r"without an entry: \[\"\['attn'\]\"\], "
                                       r"entries that are not params leaves: \[\"\['atn'\]\""):
    metamd_jax.init_divergence(params, 0.1, dimension_numbers={'atn': axes, 'dense': None})
  with pytest.raises(ValueError, match="must have the params' structure"):
    metamd_jax.init_divergence(params, 0.1, dimension_numbers=[axes, None])
  with pytest.raises(TypeError, match=r"gives \(\(0,\), \(1, 2\)\) for leaf \['attn'\]"):
    metamd_jax.init_divergence(params, 0.1, dimension_numbers=lambda path, leaf: (
        ((0,), (1, 2)) if leaf.ndim == 3 else None))


def test_mismatched_shapes_name_the_leaf_and_both_shapes():
  divergence = metamd_jax.init_divergence(_params(), 0.1)
  other = dict(_params(), dense=jnp.zeros((6, 3)))
  with pytest.raises(ValueError, match=r"\['dense'\].*\(6, 3\).*\(5, 3\)"):
    metamd_jax.mirror_step(divergence, other, other)
  with pytest.raises(ValueError, match=r"\['dense'\].*\(6, 3\).*\(5, 3\)"):
    metamd_jax.metamd(divergence).init(other)


def test_mismatched_structure_names_the_leaf():
  divergence = metamd_jax.init_divergence(_params(), 0.1)
  other = dict(_params(), extra=jnp.zeros(3))
  with pytest.raises(ValueError, match=r"only in params: \['extra'\]"):
    metamd_jax.mirror_step(divergence, other, other)
  missing = {k: v for k, v in _params().items() if k != 'bias'}
  with pytest.raises(ValueError, match=r"only in the divergence: \['bias'\]"):
    metamd_jax.scale_by_mirror_descent(divergence).init(missing)


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_meta_parameters_are_rejected(bad):
  params = _params(dtype=np.float32)
  divergence = metamd_jax.init_divergence(params, 0.1)
  broken = dict(divergence)
  broken['conv'] = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(bad), divergence['conv'])
  with pytest.raises(ValueError, match=r"\['conv'\].*non-finite"):
    metamd_jax.mirror_step(broken, params, params)
  with pytest.raises(ValueError, match='non-finite'):
    metamd_jax.metamd(broken)
  with pytest.raises(ValueError, match='non-finite'):
    metamd_jax.bregman_divergence(broken, params, params)


def test_convergence_bound_matches_the_closed_form(x64):
  """Scalar metric c: sigma = lambda_max = c, bound = c D^2 / (2T) + G^2 / (2c)."""
  params = {'w': jnp.zeros((3, 2))}
  divergence = metamd_jax.init_divergence(params, 0.25, structure='scalar', eps=1e-3,
                                          dtype=jnp.float64)
  c = 4.0  # 1 / learning_rate
  bound = metamd_jax.convergence_bound(divergence, distance=2.0, gradient_bound=3.0,
                                       num_steps=10)
  np.testing.assert_allclose(float(bound), c * 4.0 / 20 + 9.0 / (2 * c), rtol=1e-12)
  # Kronecker: lambda_max(M) = lambda_max(L) lambda_max(R), sigma likewise with minima.
  kron = well_conditioned(metamd_jax.init_divergence(params, 0.25, dtype=jnp.float64),
                          seed=1, noise=0.3)
  eig = np.linalg.eigvalsh(dense_metric(kron['w']))
  bound = metamd_jax.convergence_bound(kron, distance=2.0, gradient_bound=3.0, num_steps=10)
  np.testing.assert_allclose(float(bound), eig.max() * 4.0 / 20 + 9.0 / (2 * eig.min()),
                             rtol=1e-10)


@pytest.mark.parametrize('arguments,message', [
    (dict(num_steps=0), 'num_steps must be a positive number, got 0'),
    (dict(num_steps=-5), 'num_steps must be a positive number, got -5'),
    (dict(num_steps=True), 'num_steps must be a positive number, got True'),
    (dict(distance=-1.0), 'distance must be a finite number >= 0'),
    (dict(gradient_bound=float('nan')), 'gradient_bound must be a finite number >= 0'),
])
def test_convergence_bound_names_a_bad_argument(arguments, message):
  """With ``num_steps = -5`` the bound was negative, a "guarantee" below zero."""
  divergence = metamd_jax.init_divergence({'w': jnp.zeros((3, 2))}, 0.25)
  with pytest.raises(ValueError, match=message):
    metamd_jax.convergence_bound(divergence, **{
        'distance': 2.0, 'gradient_bound': 3.0, 'num_steps': 10, **arguments})


def test_strong_convexity_names_params_and_non_finite_factors():
  params = {'w': jnp.zeros((3, 2))}
  with pytest.raises(TypeError):
    metamd_jax.strong_convexity(params)
  nan = jax.tree.map(lambda x: x * jnp.nan, metamd_jax.init_divergence(params, 0.25))
  with pytest.raises(ValueError, match=r"\['w'\].*non-finite"):
    metamd_jax.strong_convexity(nan)


# ---------------------------------------------------------------------------
# check_structure: structure and shapes, nothing computed.
# ---------------------------------------------------------------------------


def test_check_structure_accepts_matching_trees():
  params = _params(dtype=np.float32)
  divergence = metamd_jax.init_divergence(params, 0.1)
  metamd_jax.check_structure(divergence, params)
  metamd_jax.check_structure(divergence, jax.eval_shape(lambda: params))  # abstract leaves
  metamd_jax.check_structure(divergence_lib.operators(divergence), params)
  metamd_jax.check_structure(divergence_lib.preconditioner(divergence), params)


def test_check_structure_names_the_leaf_and_both_shapes():
  divergence = metamd_jax.init_divergence(_params(), 0.1)
  other = dict(_params(), conv=jnp.zeros((2, 2, 4, 3)))
  with pytest.raises(ValueError, match=re.escape(
      "params leaf ['conv'] has shape (2, 2, 4, 3) but the divergence was built for shape "
      '(2, 2, 3, 4).')):
    metamd_jax.check_structure(divergence, other)
  with pytest.raises(ValueError, match=re.escape("grads leaf ['conv'] has shape (2, 2, 4, 3)")):
    metamd_jax.check_structure(divergence, other, name='grads')
  with pytest.raises(ValueError, match=re.escape("params leaf ['scalar'] has shape (1,)")):
    metamd_jax.check_structure(divergence, dict(_params(), scalar=jnp.zeros(1)))


def test_check_structure_names_the_leaves_only_in_one_tree():
  divergence = metamd_jax.init_divergence(_params(), 0.1)
  with pytest.raises(ValueError, match=re.escape(
      "params do not have the structure the divergence was built for; leaves only in "
      "params: ['extra'].")):
    metamd_jax.check_structure(divergence, dict(_params(), extra=jnp.zeros(3)))
  missing = {k: v for k, v in _params().items() if k != 'bias'}
  with pytest.raises(ValueError, match=re.escape(
      "updates do not have the structure the divergence was built for; leaves only in the "
      "divergence: ['bias'].")):
    metamd_jax.check_structure(divergence, missing, name='updates')
  # Same paths, other containers: the message shows both structures.
  as_list = {'w': [jnp.zeros(2)]}
  with pytest.raises(ValueError, match='divergence structure .* vs params structure'):
    metamd_jax.check_structure(metamd_jax.init_divergence(as_list, 0.1),
                               {'w': (jnp.zeros(2),)})


def test_check_structure_allows_masked_leaves():
  params = _params(dtype=np.float32)
  divergence = metamd_jax.init_divergence(params, 0.1)
  masked = dict(params, dense=optax.MaskedNode(), scalar=optax.MaskedNode())
  metamd_jax.check_structure(divergence, masked)
  # A masked leaf does not excuse a wrong shape elsewhere.
  with pytest.raises(ValueError, match=re.escape("['bias'] has shape (5,)")):
    metamd_jax.check_structure(divergence, dict(masked, bias=jnp.zeros(5)))


def test_check_structure_rejects_what_is_not_a_divergence():
  params = _params()
  with pytest.raises(TypeError, match='expected a divergence'):
    metamd_jax.check_structure(params, params)


def test_check_structure_computes_nothing():
  params = _params(dtype=np.float32)
  divergence = randomize(metamd_jax.init_divergence(params, 0.1), seed=1)

  def check(divergence, params):
    metamd_jax.check_structure(divergence, params)
    return ()

  assert not jax.make_jaxpr(check)(divergence, params).eqns
  # Whereas the metric product that used to serve as the check does compute.
  assert jax.make_jaxpr(divergence_lib.apply_metric)(divergence, params).eqns


# ---------------------------------------------------------------------------
# The meta-parameter dtype follows the params.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('leaf_dtypes,expected', [
    ((jnp.float64, jnp.float64), jnp.float64),
    ((jnp.float32, jnp.float32), jnp.float32),
    ((jnp.bfloat16, jnp.bfloat16), jnp.float32),
    ((jnp.float16, jnp.float32), jnp.float32),
    ((jnp.float64, jnp.float32), jnp.float32),  # mixed: the common single precision
    ((jnp.float64, jnp.int32), jnp.float64),  # integer leaves do not count
    ((jnp.int32, jnp.int32), jnp.float32),
])
def test_meta_parameters_take_the_params_dtype(x64, leaf_dtypes, expected):
  params = {'w': jnp.ones((3, 2), leaf_dtypes[0]), 'b': jnp.ones(2, leaf_dtypes[1])}
  assert divergence_lib.params_dtype(params) == expected
  for structure in ('kronecker', 'diagonal', 'scalar'):
    divergence = metamd_jax.init_divergence(params, 0.1, structure=structure)
    assert {x.dtype for x in jax.tree.leaves(divergence)} == {jnp.dtype(expected)}


def test_explicit_dtype_wins(x64):
  params = {'w': jnp.ones((3, 2), jnp.float64)}
  divergence = metamd_jax.init_divergence(params, 0.1, dtype=jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(divergence)} == {jnp.dtype(jnp.float32)}
  divergence = metamd_jax.init_divergence(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
                                          0.1, dtype=jnp.float64)
  assert {x.dtype for x in jax.tree.leaves(divergence)} == {jnp.dtype(jnp.float64)}


def test_float64_arrays_without_x64_give_float32():
  """JAX cannot hold float64 arrays without x64: numpy float64 params give float32."""
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', False)
  try:
    params = {'w': np.ones((3, 2))}
    assert divergence_lib.params_dtype(params) == jnp.float32
    divergence = metamd_jax.init_divergence(params, 0.1)
    assert {x.dtype for x in jax.tree.leaves(divergence)} == {jnp.dtype(jnp.float32)}
  finally:
    jax.config.update('jax_enable_x64', previous)


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_float64_params_give_a_float64_exact_mirror_step(x64, options):
  params, grads = _params(0), _params(1)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.1, **options), seed=2,
                                noise=0.1)
  assert {x.dtype for x in jax.tree.leaves(divergence)} == {jnp.dtype(jnp.float64)}
  new = metamd_jax.mirror_step(divergence, params, grads)
  assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(jnp.float64)}
  expected = flat(params) - np.linalg.solve(dense_block_metric(divergence), flat(grads))
  np.testing.assert_allclose(flat(new), expected, rtol=1e-13, atol=1e-13)
  # What the float32 default used to give: accurate to about 1e-7 only.
  single = jax.tree.map(lambda x: x.astype(jnp.float32), divergence)
  error = np.abs(flat(metamd_jax.mirror_step(single, params, grads)) - expected).max()
  assert error > 1e-9


# ---------------------------------------------------------------------------
# Operators: one cached type per structure.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('options', STRUCTURE_CASES)
def test_operators_apply_and_solve_the_dense_metric(x64, options):
  params, x = _params(0), _params(1)
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.1, **options), seed=3,
                                noise=0.3)
  metric = dense_block_metric(divergence)
  ops = divergence_lib.operators(divergence)
  assert all(divergence_lib.is_operator(o)
             for o in jax.tree.leaves(ops, is_leaf=divergence_lib.is_operator))
  np.testing.assert_allclose(flat(divergence_lib.apply_metric(ops, x)), metric @ flat(x),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(flat(divergence_lib.solve_metric(ops, x)),
                             np.linalg.solve(metric, flat(x)), rtol=1e-10, atol=1e-12)
  inverse = divergence_lib.preconditioner(divergence)
  np.testing.assert_allclose(flat(divergence_lib.precondition(inverse, x)),
                             np.linalg.solve(metric, flat(x)), rtol=1e-10, atol=1e-12)


def test_inverse_only_operators_keep_only_the_inverses():
  params = _params(dtype=np.float32)
  divergence = metamd_jax.init_divergence(params, 0.1, max_factor_size=3)
  inverse = divergence_lib.preconditioner(divergence)
  full = divergence_lib.operators(divergence)
  for name in ('dense', 'conv', 'bias'):
    assert type(inverse[name]) is type(full[name]) is divergence_lib.KroneckerOperator
    assert inverse[name].left is None and inverse[name].right is None
    assert inverse[name].left_inverse.shape == divergence[name].left.shape
    assert inverse[name].right_inverse.shape == divergence[name].right.shape
    np.testing.assert_array_equal(inverse[name].left_inverse, full[name].left_inverse)
  assert type(inverse['scalar']) is divergence_lib.ElementwiseOperator
  assert inverse['scalar'].values is None and inverse['scalar'].inverse_values.shape == ()
  # One array per raw meta-parameter, of the same shape: no more memory than the divergence.
  assert ([x.shape for x in jax.tree.leaves(inverse)]
          == [x.shape for x in jax.tree.leaves(divergence)])
  with pytest.raises(ValueError, match='KroneckerOperator holds no factors'):
    divergence_lib.apply_metric(inverse, params)
  with pytest.raises(ValueError, match='ElementwiseOperator holds no values'):
    inverse['scalar'].apply(params['scalar'])
