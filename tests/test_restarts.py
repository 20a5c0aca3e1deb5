"""Tests for metamd_jax.restarts: the doubling restarts of an optimiser's state."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_block_metric, flat
from helpers import quadratic_task, well_conditioned

import metamd_jax
from metamd_jax import restarts


def _gradients(num_steps, seed=0):
  key = jax.random.PRNGKey(seed)
  return [{'w': jax.random.normal(k, (3, 2)), 'b': jax.random.normal(k, (2,)) * 0.1}
          for k in jax.random.split(key, num_steps)]


def _params():
  return {'w': jnp.ones((3, 2)), 'b': jnp.zeros((2,))}


def _run(optimizer, gradients, params, compiled=False):
  """Updates of ``optimizer`` along ``gradients``, applying each to ``params``. Op by op
  (the reference of the jitted-scan checks), or with ``compiled`` the update jitted: each
  ``lax.cond`` then compiles once, not again at every step."""
  state = optimizer.init(params)
  out = []
  update = jax.jit(optimizer.update) if compiled else optimizer.update
  for g in gradients:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state


def _assert_jitted_scan_is_eager(optimizer, gradients, params, rtol, atol):
  """``optimizer`` in a jitted ``lax.scan`` (init included) takes the eager run's steps."""
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *gradients)

  def body(carry, g):
    params, state = carry
    updates, state = optimizer.update(g, state, params)
    return (optax.apply_updates(params, updates), state), updates

  _, scanned = jax.jit(lambda p: jax.lax.scan(body, (p, optimizer.init(p)), stacked))(params)
  eager, _ = _run(optimizer, gradients, params)
  for step, want in enumerate(eager):
    for x, y in zip(jax.tree.leaves(jax.tree.map(lambda u, i=step: u[i], scanned)),
                    jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _epochs_by_hand(inner, gradients, params, bounds):
  """The reference: ``inner`` started afresh (``inner.init``) at every epoch bound (its
  update jitted)."""
  out = []
  update = jax.jit(inner.update)
  for start, stop in zip(bounds[:-1], bounds[1:]):
    state = inner.init(params)
    for g in gradients[start:stop]:
      updates, state = update(g, state, params)
      params = optax.apply_updates(params, updates)
      out.append(updates)
  return out


def _assert_same(got, want, exact=True):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      if exact:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
      else:
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('first,factor,bounds', [
    (2, 2, [0, 2, 4, 8, 11]),
    (3, 2, [0, 3, 6, 11]),
    (2, 3, [0, 2, 6, 11]),
    (20, 2, [0, 11]),  # a run shorter than the first epoch never restarts
])
def test_restarts_are_fresh_optax_states_at_the_epoch_bounds(first, factor, bounds):
  inner = optax.adam(0.1)
  gradients = _gradients(11)
  got, _ = _run(restarts.doubling_restarts(inner, first, factor), gradients, _params())
  _assert_same(got, _epochs_by_hand(inner, gradients, _params(), bounds), exact=False)


def _blended():
  params = _params()
  divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
  optimizer = metamd_jax.blended_metamd(divergence, 1.0, 0.1, per_leaf=True,
                                        statistics='kronecker', overshoot_decay=0.5,
                                        overshoot_cap=3.0)
  return optax.chain(optimizer, metamd_jax.nesterov_momentum(0.5))


def test_blended_metamd_with_momentum_restarts_exactly():
  inner = _blended()
  gradients = _gradients(9, seed=1)
  got, state = _run(restarts.doubling_restarts(inner, 2), gradients, _params())
  # Before the first restart the wrapped optimiser is itself, bit for bit.
  _assert_same(got[:2], _run(inner, gradients[:2], _params())[0])
  _assert_same(got, _epochs_by_hand(inner, gradients, _params(), [0, 2, 4, 8, 9]),
               exact=False)
  assert int(state.count) == 9 and int(state.next) == 16


@pytest.mark.parametrize('first,factor,lengths', [
    # Epochs [1, 3], (3, 6], (6, 12], (12, 24]: lengths 1, 1, 2, 4 in units of first.
    (3, 2, [1] * 3 + [1] * 3 + [2] * 6 + [4] * 4),
    # Epochs [1, 2], (2, 6], (6, 18]: lengths 1, 2, 6.
    (2, 3, [1] * 2 + [2] * 4 + [6] * 10),
])
def test_an_epoch_dependent_inner_gets_each_epochs_length(first, factor, lengths):
  # The step is -length * g: what the wrapper passes, read off every update.
  optimizer = restarts.doubling_restarts(lambda length: optax.scale(-length), first, factor)
  params = {'w': jnp.zeros(())}
  state = optimizer.init(params)
  got = []
  for _ in lengths:
    updates, state = optimizer.update({'w': jnp.ones(())}, state, params)
    got.append(-float(updates['w']))
    assert float(state.length) == got[-1]
  assert got == [float(n) for n in lengths]


def test_blended_metamd_with_an_epoch_blend_rate_restarts_as_by_hand():
  # Each epoch runs blended MetaMD at the blend rate 0.1 sqrt(length), started afresh,
  # exactly as fresh optimisers built by hand at those rates.
  params = _params()
  divergence = metamd_jax.init_divergence(params, learning_rate=0.1)

  def blended(rate):
    return optax.chain(
        metamd_jax.blended_metamd(divergence, 1.0, rate, per_leaf=True,
                                  statistics='kronecker', overshoot_decay=0.5),
        metamd_jax.nesterov_momentum(0.5))

  optimizer = restarts.doubling_restarts(lambda length: blended(0.1 * jnp.sqrt(length)), 2)
  gradients = _gradients(9, seed=4)
  got, state = _run(optimizer, gradients, params, compiled=True)
  bounds, rates = [0, 2, 4, 8, 9], [0.1, 0.1, 0.1 * np.sqrt(2), 0.1 * 2]
  want = []
  by_hand = params
  for start, stop, rate in zip(bounds[:-1], bounds[1:], rates):
    updates, _ = _run(blended(float(rate)), gradients[start:stop], by_hand, compiled=True)
    for u in updates:
      by_hand = optax.apply_updates(by_hand, u)
    want += updates
  _assert_same(got, want, exact=False)
  assert float(state.length) == 4.0
  # A constant rate is not what ran: the growth changed the later epochs' steps.
  constant = _epochs_by_hand(blended(0.1), gradients, params, bounds)
  assert not np.allclose(np.asarray(got[-1]['w']), np.asarray(constant[-1]['w']))


def test_an_epoch_dependent_inner_with_an_eigenbasis_builds_under_jit():
  # Eigenbasis MetaMD eigendecomposes the learned factors when it is built, which needs
  # concrete factors: built per epoch inside the traced update, it still gets them, and
  # the jitted scan takes the eager run's steps.
  params = _params()
  divergence = well_conditioned(metamd_jax.init_divergence(params, 0.1), seed=5, noise=0.3)
  bases, _ = metamd_jax.eigenbasis.leaf_bases(divergence)
  levels = [(np.full(len(b.left_values), 0.5), np.full(len(b.right_values), 0.5))
            if b.inverse_values is None else (0.5,) for b in bases]

  def for_epoch(length):
    return optax.chain(metamd_jax.blended_metamd(divergence, 1.0, 0.1 * jnp.sqrt(length),
                                                 per_leaf=True, statistics='kronecker',
                                                 eigenbasis_levels=levels),
                       metamd_jax.nesterov_momentum(0.5))

  _assert_jitted_scan_is_eager(restarts.doubling_restarts(for_epoch, 2), _gradients(9, seed=6),
                               params, rtol=1e-4, atol=1e-6)


def test_a_restart_shortens_no_step_the_inner_run_would_lengthen():
  # AdaGrad's steps decay as 1 / sqrt(t) within an epoch and return to the first
  # step's length at each restart: the doubling trick's schedule.
  adagrad = optax.chain(optax.scale_by_rss(initial_accumulator_value=0.0), optax.scale(-1.0))
  optimizer = restarts.doubling_restarts(adagrad, 1)
  params = {'w': jnp.zeros(())}
  state = optimizer.init(params)
  lengths = []
  for _ in range(8):
    updates, state = optimizer.update({'w': jnp.ones(())}, state, params)
    lengths.append(-float(updates['w']))
  # Epochs [1], [2], [3, 4], [5, 8]: steps 1, 1, 1, 1/sqrt(2), 1, 1/sqrt(2), 1/sqrt(3), 1/2.
  want = [1.0, 1.0, 1.0, 2 ** -0.5, 1.0, 2 ** -0.5, 3 ** -0.5, 0.5]
  np.testing.assert_allclose(lengths, want, rtol=1e-6)


@pytest.mark.parametrize('shrink', [0.0, 0.5])
def test_the_regret_bound_holds_epoch_by_epoch(x64, shrink):
  """Least squares (convex), adaptive MetaMD restarted after 10 and 20 updates, dense
  metrics ``M_t = s_t M / c_k`` with ``c_k = L_k**-shrink`` the epoch's step factor (1, 1,
  then 2**-shrink in the epoch of length 2): every step is mirror descent with ``M_t``;
  ``M_t`` never decreases inside an epoch and returns to ``M / c_k`` at each restart; the
  regret against the minimiser is below the sum of the epochs' adaptive-mirror-descent
  bounds, itself below the closed form of the module docstring (one distance term per
  epoch, each times ``1 / c_k``; the gradient terms times ``c_k``)."""
  task = quadratic_task(dims=(4, 3), seed=3, dtype=jnp.float64)
  params = task.init()
  divergence = well_conditioned(
      metamd_jax.init_divergence(params, 0.2, dtype=jnp.float64), seed=3, noise=0.3)
  metric = dense_block_metric(divergence)
  inverse = np.linalg.inv(metric)
  grad0 = flat(jax.grad(task.loss)(params, task.batch(jnp.asarray(0))))
  reference_norm = 0.3 * np.sqrt(grad0 @ inverse @ grad0)  # adapts from the first step
  optimizer = restarts.doubling_restarts(
      lambda length: optax.chain(metamd_jax.adaptive_metamd(divergence, reference_norm),
                                 optax.scale(length ** -shrink)), first=10)
  num_steps, epochs = 35, [(0, 10), (10, 20), (20, 35)]
  # c_k of each epoch, from the float32 length the wrapper passes
  factors = [1.0, 1.0, float(np.float32(2.0) ** np.float32(-shrink))]
  factor_at = [c for (start, stop), c in zip(epochs, factors) for _ in range(start, stop)]
  state = optimizer.init(params)
  update, gradient = jax.jit(optimizer.update), jax.jit(jax.grad(task.loss))
  thetas, grads, scales = [], [], []
  for t in range(num_steps):
    g = gradient(params, task.batch(jnp.asarray(t)))
    thetas.append(flat(params))
    grads.append(flat(g))
    updates, state = update(g, state, params)
    scales.append(float(state.inner[0][0].scale))  # adaptive_metamd and the factor
    params = optax.apply_updates(params, updates)
  thetas.append(flat(params))
  for t in range(num_steps):  # mirror descent with M_t = s_t M / c_k
    np.testing.assert_allclose(thetas[t + 1] - thetas[t],
                               -factor_at[t] * inverse @ grads[t] / scales[t],
                               rtol=1e-10, atol=1e-14)
  for start, stop in epochs:
    assert all(b >= a for a, b in zip(scales[start:stop], scales[start + 1:stop]))
    assert scales[stop - 1] > 1.5  # each epoch adapted ...
  assert scales[10] < scales[9] and scales[20] < scales[19]  # ... and started afresh

  x, y = (np.concatenate(parts) for parts in zip(*(
      [np.asarray(a, np.float64) for a in task.batch(jnp.asarray(t))] for t in range(4))))
  solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
  u = np.concatenate([solution[-1], solution[:-1].ravel()])  # leaves b, then w
  d = [theta - u for theta in thetas]
  regret = sum(g @ dt for g, dt in zip(grads, d))
  epoch_bounds = []
  for (start, stop), c in zip(epochs, factors):
    bound = 0.5 * scales[start] / c * d[start] @ metric @ d[start]
    bound += 0.5 * sum((scales[t] - scales[t - 1]) / c * d[t] @ metric @ d[t]
                       for t in range(start + 1, stop))
    bound += 0.5 * sum(c * grads[t] @ inverse @ grads[t] / scales[t]
                       for t in range(start, stop))
    epoch_bounds.append(bound)
  assert regret <= sum(epoch_bounds)
  diameter = max(dt @ dt for dt in d)
  closed_form = sum(0.5 * max(scales[start:stop]) / c * np.trace(metric) * diameter
                    for (start, stop), c in zip(epochs, factors))
  closed_form += 0.5 * sum(c * g @ inverse @ g / s
                           for g, s, c in zip(grads, scales, factor_at))
  assert sum(epoch_bounds) <= closed_form


def test_restarts_compile_in_a_scan():
  _assert_jitted_scan_is_eager(restarts.doubling_restarts(_blended(), 2), _gradients(7, seed=2),
                               _params(), rtol=1e-5, atol=1e-7)


def test_the_next_restart_never_overflows():
  big = jnp.asarray(2 ** 30 + 1, jnp.int32)
  assert int(restarts._advance(big, 2)) == np.iinfo(np.int32).max
  assert int(restarts._advance(jnp.asarray(2 ** 29, jnp.int32), 2)) == 2 ** 30
  # A saturated count at the never-reached restart does not restart at every step.
  adagrad = optax.chain(optax.scale_by_rss(initial_accumulator_value=0.0), optax.scale(-1.0))
  optimizer = restarts.doubling_restarts(adagrad, 1)
  params = {'w': jnp.zeros(())}
  never = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
  state = optimizer.init(params)._replace(count=never, next=never)
  lengths = []
  for _ in range(2):
    updates, state = optimizer.update({'w': jnp.ones(())}, state, params)
    lengths.append(-float(updates['w']))
  np.testing.assert_allclose(lengths, [1.0, 2 ** -0.5], rtol=1e-6)


@pytest.mark.parametrize('kwargs,error,match', [
    ({'first': 0}, ValueError, 'first must be an integer >= 1'),
    ({'first': 2.0}, TypeError, 'first must be an integer'),
    ({'first': True}, TypeError, 'first must be an integer'),
    ({'first': 2, 'factor': 1}, ValueError, 'factor must be an integer >= 2'),
    ({'first': 2, 'factor': 1.5}, TypeError, 'factor must be an integer'),
])
def test_bad_settings_are_named(kwargs, error, match):
  with pytest.raises(error, match=match):
    restarts.doubling_restarts(optax.sgd(0.1), **kwargs)


def test_bad_inner_and_missing_params_are_named():
  with pytest.raises(TypeError, match='inner must be an optax.GradientTransformation'):
    restarts.doubling_restarts(3, 2)
  with pytest.raises(TypeError, match='must return an optax.GradientTransformation'):
    restarts.doubling_restarts(lambda length: length, 2).init(_params())
  optimizer = restarts.doubling_restarts(optax.sgd(0.1), 2)
  state = optimizer.init(_params())
  with pytest.raises(ValueError, match='needs params'):
    optimizer.update(_params(), state)


def _moment(size):
  return optax.GradientTransformation(lambda params: jnp.zeros((size,)),
                                      lambda updates, state, params=None: (updates, state))


@pytest.mark.parametrize('longer,match', [
    (optax.adam(0.1), "running state's structure"),  # optax.scale has no state
    (_moment(2), "running state's shapes"),
])
def test_an_epoch_inner_that_changes_its_state_is_named(longer, match):
  shorter = optax.scale(-1.0) if match.endswith('structure') else _moment(1)
  # Eager: the length is concrete, so the choice can be made in Python. Epochs of 1, 1
  # and 2 updates: the third update restarts into the longer epoch.
  optimizer = restarts.doubling_restarts(
      lambda length: longer if float(length) > 1.5 else shorter, 1)
  params = {'w': jnp.zeros(())}
  state = optimizer.init(params)
  for _ in range(2):
    _, state = optimizer.update({'w': jnp.ones(())}, state, params)
  with pytest.raises(ValueError, match=match):
    optimizer.update({'w': jnp.ones(())}, state, params)


def test_docstring_examples_run():
  failed, attempted = doctest.testmod(restarts)
  assert attempted > 0 and failed == 0
