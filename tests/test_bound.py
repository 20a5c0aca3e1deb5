"""The regret bound: its terms against dense matrices, autodiff and finite differences,
the streamed sums against the stored bound, and the bound's analytic minimisers."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_block_metric, flat
from helpers import well_conditioned

import metamd_jax
from metamd_jax import bound
from metamd_jax import divergence as divergence_lib

SHAPES = {'w': (4, 3), 'b': (3,), 'conv': (2, 2, 2, 3)}
STRUCTURES = [dict(structure='kronecker'), dict(structure='kronecker', max_factor_size=3),
              dict(structure='diagonal'), dict(structure='scalar')]


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}


def _divergence(options, seed=0):
  return well_conditioned(metamd_jax.init_divergence(_tree(0), 0.1, **options), seed=seed,
                          noise=0.3)


def _trajectory(divergence, num_steps, seed=10):
  """Mirror-descent iterates for fixed (data) gradients, stacked: ``(T + 1, ...)``, ``(T, ...)``."""
  params = _tree(seed)
  grads = [_tree(seed + 1 + t) for t in range(num_steps)]
  iterates = [params]
  for g in grads:
    iterates.append(metamd_jax.mirror_step(divergence, iterates[-1], g))
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return stack(iterates), stack(grads), grads


# ---------------------------------------------------------------------------
# The terms.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('options', STRUCTURES)
def test_step_term_is_half_the_dual_norm(x64, options):
  divergence = _divergence(options)
  params, grads = _tree(1), _tree(2)
  metric = dense_block_metric(divergence)
  direction = np.linalg.solve(metric, flat(grads))
  expected = 0.5 * flat(grads) @ direction  # B(theta, theta - M^{-1} g) = 1/2 g^T M^{-1} g
  operators = divergence_lib.operators(divergence)

  term, new_params = bound.step_term(operators, params, grads)
  np.testing.assert_allclose(float(term), expected, rtol=1e-12)
  np.testing.assert_allclose(flat(new_params), flat(params) - direction, rtol=1e-12,
                             atol=1e-12)
  term, statistics_direction = bound.statistics_term(operators, grads)
  np.testing.assert_allclose(float(term), expected, rtol=1e-12)
  np.testing.assert_allclose(flat(statistics_direction), direction, rtol=1e-12, atol=1e-12)
  # The statistics need the inverses only.
  term, _ = bound.statistics_term(divergence_lib.preconditioner(divergence), grads)
  np.testing.assert_allclose(float(term), expected, rtol=1e-12)


@pytest.mark.parametrize('options', STRUCTURES)
def test_term_gradients_equal_plain_autodiff(x64, options):
  """The implicit and the statistics gradients of a step term, against autodiff of
  ``1/2 <g, M^{-1} g>`` written with Cholesky solves on the divergence itself."""
  divergence = _divergence(options, seed=1)
  params, grads = _tree(3), _tree(4)

  def reference(divergence):
    direction = divergence_lib.solve_metric(divergence, grads)
    return 0.5 * jnp.vdot(jax.flatten_util.ravel_pytree(grads)[0],
                          jax.flatten_util.ravel_pytree(direction)[0])

  implicit = jax.grad(
      lambda d: bound.step_term(divergence_lib.operators(d), params, grads)[0])(divergence)
  statistics = jax.grad(
      lambda d: bound.statistics_term(divergence_lib.operators(d), grads)[0])(divergence)
  expected = jax.grad(reference)(divergence)
  for got in (implicit, statistics):
    np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-10,
                               atol=1e-12 * np.abs(flat(expected)).max())
  # Iterates and gradients are data: no gradient flows to them.
  for argnum in (1, 2):
    zero = jax.grad(lambda *a: bound.step_term(*a)[0], argnums=argnum)(
        divergence_lib.operators(divergence), params, grads)
    assert not np.any(flat(zero))


@pytest.mark.parametrize('options', STRUCTURES)
def test_distance_term_holds_the_comparator_constant(x64, options):
  divergence = _divergence(options, seed=2)
  final, init = _tree(5), _tree(6)
  diff = flat(final) - flat(init)
  expected = 0.5 * diff @ dense_block_metric(divergence) @ diff
  for metrics in (divergence, divergence_lib.operators(divergence)):
    np.testing.assert_allclose(float(bound.distance_term(metrics, final, init)), expected,
                               rtol=1e-12)
  grad_final, grad_init = jax.grad(bound.distance_term, argnums=(1, 2))(divergence, final, init)
  assert not np.any(flat(grad_final)) and not np.any(flat(grad_init))


def test_regret_bound_gradient_equals_finite_differences(x64):
  divergence = _divergence(STRUCTURES[1], seed=3)
  params_seq, grads_seq, _ = _trajectory(divergence, 4)
  flat_divergence, unravel = jax.flatten_util.ravel_pytree(divergence)
  objective = jax.jit(lambda x: bound.regret_bound(unravel(x), params_seq, grads_seq))
  gradient = jax.grad(objective)(flat_divergence)
  rng = np.random.default_rng(0)
  for _ in range(3):
    direction = rng.standard_normal(flat_divergence.shape)
    direction /= np.linalg.norm(direction)
    h = 1e-5
    fd = (objective(flat_divergence + h * direction)
          - objective(flat_divergence - h * direction)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(gradient, direction)), float(fd), rtol=1e-7,
                               atol=1e-10)


def test_regret_bound_is_its_terms_by_definition(x64):
  divergence = _divergence(STRUCTURES[0], seed=4)
  params_seq, grads_seq, grads = _trajectory(divergence, 3)
  iterates = [jax.tree.map(lambda x, t=t: x[t], params_seq) for t in range(4)]
  steps = sum(metamd_jax.bregman_divergence(divergence, iterates[t], iterates[t + 1])
              for t in range(3))
  distance = metamd_jax.bregman_divergence(divergence, iterates[-1], iterates[0])
  np.testing.assert_allclose(float(bound.regret_bound(divergence, params_seq, grads_seq)),
                             float((distance + steps) / 3), rtol=1e-12)
  assert bound.regret_bound is metamd_jax.regret_bound


def test_regret_bound_rejects_a_trajectory_of_the_wrong_length(x64):
  divergence = _divergence(STRUCTURES[0])
  params_seq, grads_seq, _ = _trajectory(divergence, 3)
  short = jax.tree.map(lambda x: x[:-1], params_seq)
  with pytest.raises(ValueError, match=r'T \+ 1 = 4 iterates for T = 3 gradients'):
    bound.regret_bound(divergence, short, grads_seq)
  # Iterates or gradients of other shapes are named, per step.
  wide = jax.tree.map(lambda x: jnp.concatenate([x, x], axis=-1), grads_seq)
  with pytest.raises(ValueError, match=r'grads_sequence \(per step\) leaf .* has shape'):
    bound.regret_bound(divergence, params_seq, wide)
  # No gradient at all: the average over T = 0 steps was NaN.
  empty = jax.tree.map(lambda x: x[:0], grads_seq)
  with pytest.raises(ValueError, match=r'no gradient \(T = 0\)'):
    bound.regret_bound(divergence, jax.tree.map(lambda x: x[:1], params_seq), empty)


# ---------------------------------------------------------------------------
# Streaming sums.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('options', STRUCTURES)
@pytest.mark.parametrize('adjoint', ('implicit', 'statistics'))  # 'auto' is one of these
def test_streamed_sums_equal_the_stored_bound(x64, options, adjoint):
  divergence = _divergence(options, seed=5)
  params_seq, grads_seq, grads = _trajectory(divergence, 4)
  value, grad = jax.value_and_grad(bound.regret_bound)(divergence, params_seq, grads_seq)
  init = jax.tree.map(lambda x: x[0], params_seq)

  operators, pullback = jax.vjp(divergence_lib.operators, divergence)
  for meta_gradient in (True, False):
    sums = bound.init_sums(operators, meta_gradient=meta_gradient)
    params = init
    for g in grads:
      params, sums = bound.add_step(sums, operators, params, g, adjoint=adjoint)
    np.testing.assert_allclose(flat(params), flat(jax.tree.map(lambda x: x[-1], params_seq)),
                               rtol=1e-12, atol=1e-12)
    streamed, distance, streamed_grad = bound.finish(sums, operators, params, init, len(grads))
    np.testing.assert_allclose(float(streamed), float(value), rtol=1e-12)
    np.testing.assert_allclose(float(distance), float(bound.distance_term(divergence, params,
                                                                          init)), rtol=1e-12)
    if meta_gradient:
      np.testing.assert_allclose(flat(pullback(streamed_grad)[0]), flat(grad), rtol=1e-10,
                                 atol=1e-12 * np.abs(flat(grad)).max())
    else:
      assert sums.grads is None and streamed_grad is None


def test_add_step_rejects_an_unknown_adjoint(x64):
  operators = divergence_lib.operators(_divergence(STRUCTURES[0]))
  sums = bound.init_sums(operators, meta_gradient=True)
  with pytest.raises(ValueError, match="unknown adjoint 'reverse'"):
    bound.add_step(sums, operators, _tree(1), _tree(2), adjoint='reverse')


def _callable_solver(matvec, b, *args):
  return b


@pytest.mark.parametrize('adjoint,solver,expected', [
    ('auto', 'exact', 'statistics'),
    ('auto', 'cg', 'implicit'),
    ('auto', 'neumann', 'implicit'),
    ('auto', 'dense', 'implicit'),
    ('auto', _callable_solver, 'implicit'),
    ('implicit', 'exact', 'implicit'),
    ('implicit', 'cg', 'implicit'),
    ('implicit', 'neumann', 'implicit'),
    ('implicit', 'dense', 'implicit'),
    ('implicit', _callable_solver, 'implicit'),
    ('statistics', 'exact', 'statistics'),
])
def test_resolve_adjoint_truth_table(adjoint, solver, expected):
  assert bound.resolve_adjoint(adjoint, solver) == expected


def test_resolve_adjoint_defaults_to_auto_with_the_exact_solver():
  assert bound.ADJOINTS == ('auto', 'implicit', 'statistics')
  assert bound.resolve_adjoint() == 'statistics'
  assert bound.resolve_adjoint('auto') == 'statistics'
  assert bound.resolve_adjoint(solver='cg', tol=1e-6) == 'implicit'


@pytest.mark.parametrize('solver', ['cg', 'neumann', 'dense', _callable_solver])
def test_statistics_with_another_solver_is_rejected_naming_both(solver):
  with pytest.raises(ValueError, match=r"adjoint='statistics'.*solver=") as error:
    bound.resolve_adjoint('statistics', solver)
  assert repr(solver) in str(error.value)


@pytest.mark.parametrize('adjoint', ['reverse', 'Auto', None, ''])
def test_resolve_adjoint_rejects_an_unknown_adjoint(adjoint):
  with pytest.raises(ValueError, match='unknown adjoint'):
    bound.resolve_adjoint(adjoint, 'exact')


@pytest.mark.parametrize('adjoint', ['auto', 'statistics'])
def test_statistics_take_no_solver_options(adjoint):
  """As the exact solver of the implicit adjoint: options are an error, not ignored."""
  with pytest.raises(ValueError, match=r"exact solver takes no options, got \['tol'\]"):
    bound.resolve_adjoint(adjoint, 'exact', tol=1e-6)


def test_every_adjoint_parameter_defaults_to_auto():
  import inspect

  from metamd_jax import inner_loop, meta_train, objectives
  functions = [bound.add_step, bound.adaptive_step_term, bound.adaptive_regret_bound,
               bound.add_adaptive_step, inner_loop.rollout, inner_loop.adaptive_rollout,
               objectives.meta_gradient, meta_train.make_meta_step, meta_train.fit]
  for function in functions:
    assert inspect.signature(function).parameters['adjoint'].default == 'auto', function


def test_add_step_rejects_statistics_with_another_solver(x64):
  operators = divergence_lib.operators(_divergence(STRUCTURES[0]))
  for meta_gradient in (True, False):
    sums = bound.init_sums(operators, meta_gradient=meta_gradient)
    with pytest.raises(ValueError, match="adjoint='statistics'.*solver='cg'"):
      bound.add_step(sums, operators, _tree(1), _tree(2), adjoint='statistics', solver='cg')


@pytest.mark.parametrize('adjoint', ['auto', 'implicit', 'statistics'])
def test_add_step_auto_takes_the_statistics_path_with_the_exact_solver(x64, monkeypatch,
                                                                       adjoint):
  """Which term is differentiated, recorded: 'auto' is 'statistics' for 'exact'."""
  calls = []
  for name in ('step_term', 'statistics_term'):
    original = getattr(bound, name)
    monkeypatch.setattr(bound, name, lambda *a, name=name, original=original, **k:
                        calls.append(name) or original(*a, **k))
  divergence = _divergence(STRUCTURES[0], seed=5)
  params_seq, grads_seq, grads = _trajectory(divergence, 3)
  operators, pullback = jax.vjp(divergence_lib.operators, divergence)
  sums = bound.init_sums(operators, meta_gradient=True)
  init = params = jax.tree.map(lambda x: x[0], params_seq)
  for g in grads:
    params, sums = bound.add_step(sums, operators, params, g, adjoint=adjoint)
  assert calls == ['step_term' if adjoint == 'implicit' else 'statistics_term'] * 3
  # The same gradient either way: the stored bound's, through the implicit VJP.
  _, grad = jax.value_and_grad(bound.regret_bound)(divergence, params_seq, grads_seq)
  _, _, streamed = bound.finish(sums, operators, params, init, 3)
  np.testing.assert_allclose(flat(pullback(streamed)[0]), flat(grad), rtol=1e-10,
                             atol=1e-12 * np.abs(flat(grad)).max())


# ---------------------------------------------------------------------------
# Analytic minimisers of the bound (METHOD.md section 2).
# ---------------------------------------------------------------------------


def _fixed_trajectory(seed=0, num_steps=12, shape=(5,)):
  """A stored trajectory: the gradients are data, as in the regret view."""
  rng = np.random.default_rng(seed)
  grads = rng.standard_normal((num_steps, *shape))
  params = rng.standard_normal((num_steps + 1, *shape))
  params[-1] = params[0] + rng.uniform(0.5, 1.5, shape)  # comparator well away from the start
  return {'w': jnp.asarray(params)}, {'w': jnp.asarray(grads)}


def _minimise(divergence, params_seq, grads_seq, steps=3000):
  optimizer = optax.adam(optax.cosine_decay_schedule(0.2, steps, alpha=1e-3))

  @jax.jit
  def step(divergence, state):
    grad = jax.grad(bound.regret_bound)(divergence, params_seq, grads_seq)
    updates, state = optimizer.update(grad, state, divergence)
    return optax.apply_updates(divergence, updates), state

  state = optimizer.init(divergence)
  for _ in range(steps):
    divergence, state = step(divergence, state)
  return divergence


def test_scalar_bound_minimiser_is_the_step_size_formula(x64):
  params_seq, grads_seq = _fixed_trajectory()
  divergence = metamd_jax.init_divergence({'w': params_seq['w'][0]}, 0.5, structure='scalar',
                                          dtype=jnp.float64)
  learned = _minimise(divergence, params_seq, grads_seq)
  distance = np.linalg.norm(params_seq['w'][-1] - params_seq['w'][0])
  s_star = distance / np.sqrt(np.sum(np.asarray(grads_seq['w']) ** 2))
  np.testing.assert_allclose(1.0 / float(learned['w'].values()), s_star, rtol=1e-4)


def test_diagonal_bound_minimiser_is_per_coordinate(x64):
  params_seq, grads_seq = _fixed_trajectory(seed=1)
  divergence = metamd_jax.init_divergence({'w': params_seq['w'][0]}, 0.5,
                                          structure='diagonal', dtype=jnp.float64)
  learned = _minimise(divergence, params_seq, grads_seq)
  distance = np.abs(params_seq['w'][-1] - params_seq['w'][0])
  s_star = distance / np.sqrt(np.sum(np.asarray(grads_seq['w']) ** 2, axis=0))
  np.testing.assert_allclose(1.0 / np.asarray(learned['w'].values()), s_star, rtol=1e-3)
