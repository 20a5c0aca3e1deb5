"""Tests for metamd_jax.guarded: frozen MetaMD until its gradients leave their levels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_metric, flat
from helpers import SHAPES, random_divergence, random_tree

import metamd_jax
from metamd_jax import divergence as divergence_lib

DECAY = 0.9
NUM_STEPS = 10


def _gradients(growth=1.3, num_steps=NUM_STEPS, seed=1, bad_step=None):
  """``growth**t`` times Gaussian trees: their dual norms grow along the run."""
  out = [jax.tree.map(lambda x, t=t: (growth ** t) * x, random_tree(seed + t, 0.1))
         for t in range(num_steps)]
  if bad_step is not None:
    out[bad_step] = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), out[bad_step])
  return out


def _run(optimizer, gradients, params):
  state = optimizer.init(params)
  updates = []
  update = jax.jit(optimizer.update)
  for g in gradients:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return updates, state


def _reference_levels(divergence, gradients, decay=DECAY):
  """float64: ``sqrt(v_t / (1 - decay^t))`` per leaf, ``v_t`` the moving average of
  ``g^T M^{-1} g`` with each leaf's dense metric (built from the definition)."""
  inverses = [np.linalg.inv(dense_metric(m))
              for m in jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)]
  average = np.zeros(len(inverses))
  levels = []
  for t, g in enumerate(gradients, start=1):
    squared = np.array([flat(x) @ inverse @ flat(x)
                        for x, inverse in zip(jax.tree.leaves(g), inverses)])
    average = decay * average + (1 - decay) * squared
    levels.append(np.sqrt(average / (1 - decay ** t)))
  return np.array(levels)  # (T, L)


def _by_hand(fast, fallback, gradients, params, switch):
  """The reference: ``fast`` for the updates before ``switch`` (1-based), then
  ``fallback`` started afresh there (``switch = None``: never)."""
  cut = len(gradients) if switch is None else switch - 1
  first, _ = _run(fast, gradients[:cut], params)
  for u in first:
    params = optax.apply_updates(params, u)
  second, _ = _run(fallback, gradients[cut:], params) if cut < len(gradients) else ([], None)
  return first + second


def _assert_updates_close(got, want, rtol=1e-5, atol=1e-7):
  assert len(got) == len(want)
  for step, (a, b) in enumerate(zip(got, want)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                 err_msg=f'update {step + 1}')


def _first_above(levels, bound):
  """1-based first step where some leaf's level is above ``bound`` (``None``: never)."""
  above = np.any(levels > bound, axis=1)
  return int(np.argmax(above)) + 1 if above.any() else None


@pytest.mark.parametrize('options', [dict(structure='kronecker'),
                                     dict(structure='kronecker', max_factor_size=3),
                                     dict(structure='diagonal')])
@pytest.mark.parametrize('margin', [1.0, 2.0])
def test_switches_at_the_first_step_above_the_levels(options, margin):
  divergence = random_divergence(options, dtype=jnp.float32)
  gradients = _gradients()
  params = random_tree(0)
  levels = _reference_levels(divergence, gradients)
  # Each leaf's level set between its 5th and 6th step's, over the margin: the switch
  # comes where the dense reference says, a few steps in (so that a check on another
  # quantity, average or bias correction fires elsewhere).
  c = (levels[4] + levels[5]) / 2 / margin
  want_switch = _first_above(levels, margin * c)
  assert want_switch is not None and 3 <= want_switch <= 6
  fast, fallback = metamd_jax.metamd(divergence), optax.adam(0.05)
  optimizer = metamd_jax.guarded_switch(fast, fallback, c, margin=margin, decay=DECAY)
  got, state = _run(optimizer, gradients, params)
  assert bool(state.switched) and int(state.switch_step) == want_switch
  _assert_updates_close(got, _by_hand(fast, fallback, gradients, params, want_switch))


def test_never_switches_below_the_levels_and_is_fast_exactly():
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients()
  params = random_tree(0)
  c = 1.01 * _reference_levels(divergence, gradients).max(axis=0)
  fast = metamd_jax.metamd(divergence)
  got, state = _run(metamd_jax.guarded_switch(fast, optax.adam(0.05), c), gradients, params)
  assert not bool(state.switched) and int(state.switch_step) == 0
  want, _ = _run(fast, gradients, params)
  for a, b in zip(got, want):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_infinite_level_never_fires_and_the_others_still_do():
  """A leaf whose calibration gradients were all zero has an infinite level (JSON's
  null): it never fires the check; the switch comes from the other leaves, at the step
  the dense reference gives for them alone."""
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients()
  params = random_tree(0)
  levels = _reference_levels(divergence, gradients)
  c = (levels[4] + levels[5]) / 2
  first = _first_above(levels, c)
  # The leaf that fires first is given an infinite level: the switch moves to the first
  # step at which another leaf is above its level.
  leaf = int(np.argmax(levels[first - 1] > c))
  c[leaf] = np.inf
  want_switch = _first_above(np.delete(levels, leaf, axis=1), np.delete(c, leaf))
  assert want_switch is not None and want_switch != first
  fast, fallback = metamd_jax.metamd(divergence), optax.adam(0.05)
  got, state = _run(metamd_jax.guarded_switch(fast, fallback, c), gradients, params)
  assert int(state.switch_step) == want_switch
  _assert_updates_close(got, _by_hand(fast, fallback, gradients, params, want_switch))
  # Every level infinite: frozen MetaMD's steps throughout.
  got, state = _run(metamd_jax.guarded_switch(fast, fallback, np.full(c.shape, np.inf)),
                    gradients, params)
  assert not bool(state.switched)


def test_one_level_for_all_checks_the_sum_over_leaves():
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients()
  params = random_tree(0)
  per_leaf = _reference_levels(divergence, gradients)
  total = np.sqrt(np.sum(per_leaf ** 2, axis=1, keepdims=True))  # the averages add up
  level = float((total[3, 0] + total[4, 0]) / 2)
  want_switch = _first_above(total, level)
  assert want_switch == 5
  fast, fallback = metamd_jax.metamd(divergence), optax.sgd(0.01)
  got, state = _run(metamd_jax.guarded_switch(fast, fallback, level), gradients, params)
  assert int(state.switch_step) == want_switch
  _assert_updates_close(got, _by_hand(fast, fallback, gradients, params, want_switch))


@pytest.mark.parametrize('switch_after', [0, 3])
def test_switch_after_a_number_of_steps(switch_after):
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients()
  params = random_tree(0)
  c = 10 * _reference_levels(divergence, gradients).max(axis=0)  # the check never fires
  fast, fallback = metamd_jax.metamd(divergence), optax.adam(0.05)
  optimizer = metamd_jax.guarded_switch(fast, fallback, c, switch_after=switch_after)
  got, state = _run(optimizer, gradients, params)
  assert int(state.switch_step) == switch_after + 1
  _assert_updates_close(got, _by_hand(fast, fallback, gradients, params, switch_after + 1))


def test_a_nan_gradient_switches_and_the_fast_step_is_discarded():
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients(growth=1.0, bad_step=2)
  params = random_tree(0)
  c = 10 * _reference_levels(divergence, gradients[:2]).max(axis=0)
  optimizer = metamd_jax.guarded_switch(metamd_jax.metamd(divergence), optax.sgd(0.01), c)
  state = optimizer.init(params)
  for step, g in enumerate(gradients[:3], start=1):
    u, state = jax.jit(optimizer.update)(g, state, params)
    assert bool(state.switched) == (step == 3)
  assert int(state.switch_step) == 3
  # The step that fired is sgd's first: NaN only where the gradient is.
  np.testing.assert_array_equal(np.isnan(flat(u)), np.isnan(flat(gradients[2])))


def test_the_fast_epochs_gradient_terms_are_capped():
  """Before the switch each ``||g_t||^2_{M^{-1}}`` is at most ``mu^2 c^2 / (1 - beta)``
  per leaf (the guarantee's cap), checked with the dense metric in float64."""
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients(growth=1.5)
  params = random_tree(0)
  margin = 1.5
  c = _reference_levels(divergence, gradients)[3] / margin  # fires at a later step
  optimizer = metamd_jax.guarded_switch(metamd_jax.metamd(divergence), optax.sgd(0.01), c,
                                        margin=margin)
  _, state = _run(optimizer, gradients, params)
  switch = int(state.switch_step)
  assert 4 <= switch <= NUM_STEPS
  inverses = [np.linalg.inv(dense_metric(m))
              for m in jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)]
  for g in gradients[:switch - 1]:
    squared = np.array([flat(x) @ inverse @ flat(x)
                        for x, inverse in zip(jax.tree.leaves(g), inverses)])
    assert np.all(squared <= (margin * c) ** 2 / (1 - DECAY) * (1 + 1e-5))


def test_jitted_scan_and_vmap_match_the_eager_run():
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients()
  params = random_tree(0)
  levels = _reference_levels(divergence, gradients)
  c = (levels[4] + levels[5]) / 2
  optimizer = metamd_jax.guarded_switch(metamd_jax.metamd(divergence),
                                        metamd_jax.nesterov_momentum(0.5), c)
  want, _ = _run(optimizer, gradients, params)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *gradients)

  def run(p, grads):
    def body(carry, g):
      p, s = carry
      u, s = optimizer.update(g, s, p)
      return (optax.apply_updates(p, u), s), u
    return jax.lax.scan(body, (p, optimizer.init(p)), grads)[1]

  scanned = jax.jit(run)(params, stacked)
  batched = jax.jit(jax.vmap(run, in_axes=(None, 0)))(
      params, jax.tree.map(lambda x: jnp.stack([x, x]), stacked))
  for step, u in enumerate(want):
    for x, y, z in zip(jax.tree.leaves(u), jax.tree.leaves(scanned), jax.tree.leaves(batched)):
      np.testing.assert_allclose(np.asarray(y[step]), np.asarray(x), rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(np.asarray(z[1, step]), np.asarray(x), rtol=1e-5, atol=1e-7)


def test_low_rank_fast_and_optax_chain():
  """Behind ``optax.chain`` with a learning-rate scale, the guard still reads the fast
  optimiser's own update (a low-rank one here) and switches where the reference says."""
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  fast = metamd_jax.low_rank_metamd(divergence, 2)
  gradients = _gradients()
  params = random_tree(0)
  # The levels from the fast optimiser's own updates: -<g, u> per leaf.
  state, average, levels = fast.init(params), np.zeros(len(SHAPES)), []
  for t, g in enumerate(gradients, start=1):
    u, state = fast.update(g, state, params)
    squared = np.array([-flat(a) @ flat(b) for a, b in zip(jax.tree.leaves(g),
                                                           jax.tree.leaves(u))])
    average = DECAY * average + (1 - DECAY) * squared
    levels.append(np.sqrt(average / (1 - DECAY ** t)))
  levels = np.array(levels)
  c = (levels[4] + levels[5]) / 2
  want_switch = _first_above(levels, c)
  optimizer = optax.chain(metamd_jax.guarded_switch(fast, optax.adam(0.05), c),
                          optax.scale(0.5))
  got, state = _run(optimizer, gradients, params)
  assert int(state[0].switch_step) == want_switch
  assert want_switch is not None and want_switch > 1
  # Neither optimiser's update depends on the parameters: the chain's is half the inner's.
  inner = _by_hand(fast, optax.adam(0.05), gradients, params, want_switch)
  _assert_updates_close(got, [jax.tree.map(lambda x: 0.5 * x, u) for u in inner])


@pytest.mark.parametrize('kwargs,match', [
    (dict(levels=[1.0, 2.0]), 'one per parameter leaf'),
    (dict(levels=[1.0, 0.0, 1.0]), r'levels must be positive \(or inf'),
    (dict(levels=[1.0, np.nan, 1.0]), r'levels must be positive \(or inf'),
    (dict(levels=[1.0, -np.inf, 1.0]), r'levels must be positive \(or inf'),
    (dict(margin=0.0), 'margin'),
    (dict(margin=np.inf), 'margin'),
    (dict(margin=True), 'margin'),
    (dict(switch_after=-1), 'switch_after'),
    (dict(switch_after=2.5), 'switch_after'),
    (dict(switch_after=True), 'switch_after'),
    (dict(decay=1.0), 'decay'),
    (dict(decay=-0.1), 'decay'),
    (dict(switch_after=3, min_progress=-0.01), 'min_progress'),
    (dict(switch_after=3, min_progress=np.nan), 'min_progress'),
    (dict(switch_after=3, min_progress=True), 'min_progress'),
    (dict(min_progress=0.01), 'needs switch_after'),
])
def test_bad_arguments_are_named(kwargs, match):
  args = dict(levels=[1.0, 1.0, 1.0])
  args.update(kwargs)
  levels = args.pop('levels')
  with pytest.raises(ValueError, match=match):
    optimizer = metamd_jax.guarded_switch(optax.sgd(0.1), optax.adam(0.1), levels, **args)
    optimizer.init(random_tree(0))


# The switch on progress (min_progress): the loss arrives as optax's extra argument value.

def _losses(rates):
  """Losses ``L_1 = 2`` and ``L_t = L_{t-1} (1 - rates[t-2])``: relative decreases given."""
  out = [2.0]
  for r in rates:
    out.append(out[-1] * (1 - r))
  return out


def _reference_progress(losses, decay=DECAY):
  """float64: the bias-corrected moving average of ``(L_{t-1} - L_t) / |L_{t-1}|`` at each
  update ``t`` (``nan`` at ``t = 1``, where there is none)."""
  average, out = 0.0, [np.nan]
  for t in range(2, len(losses) + 1):
    relative = (losses[t - 2] - losses[t - 1]) / abs(losses[t - 2])
    average = decay * average + (1 - decay) * relative
    out.append(average / (1 - decay ** (t - 1)))
  return np.array(out)


def _below_the_levels():
  """A Kronecker divergence, gradients, parameters and levels the check never reaches."""
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients()
  return (divergence, gradients, random_tree(0),
          10 * _reference_levels(divergence, gradients).max(axis=0))


def _run_with_losses(optimizer, gradients, params, losses):
  state = optimizer.init(params)
  updates = []
  update = jax.jit(optimizer.update)
  for g, loss in zip(gradients, losses):
    u, state = update(g, state, params, value=jnp.float32(loss))
    params = optax.apply_updates(params, u)
    updates.append(u)
  return updates, state


@pytest.mark.parametrize('switch_after', [2, 4])
def test_progress_switch_comes_where_the_float64_reference_says(switch_after):
  """Fast progress first, then slower: the step count switch waits, past ``switch_after``,
  for the first update whose averaged relative decrease is below ``min_progress`` (set
  between two updates' so that another average or bias correction fires elsewhere)."""
  divergence = random_divergence(dict(structure='kronecker'), dtype=jnp.float32)
  gradients = _gradients()
  params = random_tree(0)
  c = 10 * _reference_levels(divergence, gradients).max(axis=0)  # the levels never fire
  losses = _losses([0.3, 0.3, 0.25, 0.2, 0.1, 0.02, 0.01, 0.0, -0.05])
  progress = _reference_progress(losses)
  min_progress = float((progress[6] + progress[7]) / 2)
  later = np.arange(1, NUM_STEPS + 1) > switch_after
  want_switch = int(np.argmax(later & (progress < min_progress))) + 1
  assert want_switch == 8  # past switch_after, and not where the step count alone says
  fast, fallback = metamd_jax.metamd(divergence), optax.adam(0.05)
  optimizer = metamd_jax.guarded_switch(fast, fallback, c, switch_after=switch_after,
                                        min_progress=min_progress)
  assert isinstance(optimizer, optax.GradientTransformationExtraArgs)
  got, state = _run_with_losses(optimizer, gradients, params, losses)
  assert int(state.switch_step) == want_switch
  _assert_updates_close(got, _by_hand(fast, fallback, gradients, params, want_switch))
  # The moving average stored is the reference's, frozen at the switch.
  np.testing.assert_allclose(
      float(state.progress) / (1 - DECAY ** (want_switch - 1)), progress[want_switch - 1],
      rtol=1e-5)


def test_steady_progress_never_switches_and_is_fast_exactly():
  divergence, gradients, params, c = _below_the_levels()
  fast = metamd_jax.metamd(divergence)
  optimizer = metamd_jax.guarded_switch(fast, optax.adam(0.05), c, switch_after=2,
                                        min_progress=0.05)
  got, state = _run_with_losses(optimizer, gradients, params,
                                _losses([0.1] * (NUM_STEPS - 1)))
  assert not bool(state.switched)
  want, _ = _run(fast, gradients, params)
  for a, b in zip(got, want):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _nan_at_third(losses):
  losses[2] = np.nan
  return losses


@pytest.mark.parametrize('losses,switch_after,min_progress,want', [
    (_losses([0.001] * (NUM_STEPS - 1)), 3, 0.01, 4),  # slow: right after switch_after
    (_nan_at_third(_losses([0.1] * (NUM_STEPS - 1))), 5, 0.0, 3),  # NaN: at once
])
def test_slow_progress_or_a_nan_loss_switches_early(losses, switch_after, min_progress, want):
  divergence, gradients, params, c = _below_the_levels()
  optimizer = metamd_jax.guarded_switch(metamd_jax.metamd(divergence), optax.sgd(0.01), c,
                                        switch_after=switch_after, min_progress=min_progress)
  _, state = _run_with_losses(optimizer, gradients, params, losses)
  assert int(state.switch_step) == want


def test_progress_behind_optax_chain_gets_the_loss():
  """``optax.chain`` passes the extra argument on: the switch is the reference's."""
  divergence, gradients, params, c = _below_the_levels()
  losses = _losses([0.3, 0.3, 0.25, 0.2, 0.1, 0.02, 0.01, 0.0, -0.05])
  progress = _reference_progress(losses)
  min_progress = float((progress[5] + progress[6]) / 2)
  fast, fallback = metamd_jax.metamd(divergence), optax.adam(0.05)
  optimizer = optax.chain(metamd_jax.guarded_switch(fast, fallback, c, switch_after=1,
                                                    min_progress=min_progress),
                          optax.scale(0.5))
  got, state = _run_with_losses(optimizer, gradients, params, losses)
  assert int(state[0].switch_step) == 7
  inner = _by_hand(fast, fallback, gradients, params, 7)
  _assert_updates_close(got, [jax.tree.map(lambda x: 0.5 * x, u) for u in inner])


def test_progress_needs_the_scalar_loss():
  optimizer = metamd_jax.guarded_switch(optax.sgd(0.1), optax.adam(0.1), 1.0,
                                        switch_after=2, min_progress=0.01)
  params = random_tree(0)
  state = optimizer.init(params)
  with pytest.raises(ValueError, match='needs the loss'):
    optimizer.update(params, state, params)
  with pytest.raises(ValueError, match='scalar loss'):
    optimizer.update(params, state, params, value=jnp.ones(2))
  # Without min_progress the loss is not needed and update takes no extra arguments.
  plain = metamd_jax.guarded_switch(optax.sgd(0.1), optax.adam(0.1), 1.0, switch_after=2)
  assert not isinstance(plain, optax.GradientTransformationExtraArgs)
  plain.update(params, plain.init(params), params)


# The handover: fallback's fresh state, changed with the fast steps' gradient mass.

@pytest.mark.parametrize('switch_after', [0, 3])
def test_handover_gets_the_fast_steps_gradient_mass(switch_after):
  """At the switch ``fallback`` starts from ``handover(init, params, mu)`` with ``mu``
  per leaf the float64 sum of ``||g_t||^2`` over the fast updates before it (not the
  switch's own gradient): with ``statistics_prior`` its Shampoo statistics start there,
  and the updates equal ``fallback`` run by hand from that state."""
  divergence, gradients, params, c = _below_the_levels()
  fast = metamd_jax.metamd(divergence)
  fallback = metamd_jax.statistics.scale_by_kronecker_statistics(refresh_every=2)
  seen = []

  def handover(state, at, masses):
    seen.append(masses)
    return metamd_jax.statistics_prior(state, at, masses)

  optimizer = metamd_jax.guarded_switch(fast, fallback, c, switch_after=switch_after,
                                        handover=handover)
  got, state = _run(optimizer, gradients, params)
  assert int(state.switch_step) == switch_after + 1 and seen
  want_mass = np.array([sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                            for x in [jax.tree.leaves(g)[leaf]
                                      for g in gradients[:switch_after]])
                        for leaf in range(len(jax.tree.leaves(params)))])
  np.testing.assert_allclose(state.mass, want_mass, rtol=1e-5)
  # By hand: fast's updates, then fallback from the prior on the parameters at the switch.
  first, _ = _run(fast, gradients[:switch_after], params)
  at = params
  for u in first:
    at = optax.apply_updates(at, u)
  hand_state = metamd_jax.statistics_prior(fallback.init(at), at, jnp.asarray(want_mass))
  second, fallback_update = [], jax.jit(fallback.update)
  for g in gradients[switch_after:]:
    u, hand_state = fallback_update(g, hand_state, at)
    second.append(u)
  _assert_updates_close(got, first + second, rtol=1e-4, atol=1e-6)
  if switch_after:  # the prior changes the steps: not fallback started empty
    empty = _by_hand(fast, fallback, gradients, params, switch_after + 1)
    assert not np.allclose(flat(got[switch_after]), flat(empty[switch_after]), rtol=1e-3)


def test_handover_needs_params_and_a_function():
  with pytest.raises(ValueError, match='handover must be None or a function'):
    metamd_jax.guarded_switch(optax.sgd(0.1), optax.adam(0.1), 1.0, handover='prior')
  optimizer = metamd_jax.guarded_switch(optax.sgd(0.1), optax.adam(0.1), 1.0,
                                        handover=lambda state, params, masses: state)
  params = random_tree(0)
  state = optimizer.init(params)
  with pytest.raises(ValueError, match='needs the parameters'):
    optimizer.update(params, state)
