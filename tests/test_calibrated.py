"""The learned optimiser rebuilt from its calibration record (:mod:`metamd_jax.calibrated`).

The reference for every record is the same optimiser composed by hand from the public
building blocks (:func:`metamd_jax.blended_metamd`, :func:`metamd_jax.nesterov_momentum`,
:func:`metamd_jax.doubling_restarts`, :func:`metamd_jax.guarded_switch`, ...), run on the
same gradients.
"""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ScaledLeastSquares, well_conditioned

import metamd_jax
from metamd_jax import calibrated
from metamd_jax import divergence as divergence_lib

NUM_STEPS = 9  # with a horizon of 2: epochs of 2, 2, 4 and 8 steps (the 4th begins at 8)
# Blended MetaMD with Shampoo's statistics refreshes its roots at every step of an epoch's
# first 10 (refresh_every), so its case runs a horizon of 12 for 16 steps: the roots'
# growth rule decides at steps 10 and 11, and the second epoch begins at 12.
BLENDED_HORIZON, BLENDED_STEPS = 12, 16


@pytest.fixture(scope='module')
def setup():
  """A learned-looking divergence for the bias (4,) and weight (8, 4) of a least-squares
  family, and its levels calibrated on two of its tasks."""
  family = ScaledLeastSquares()
  unit = well_conditioned(metamd_jax.init_divergence(family.init_params(), 1.0), seed=1,
                          noise=0.3)
  divergence = divergence_lib.scale_steps(unit, 0.05)
  tasks = family.sample_batch(jax.random.key(1), 2)
  reference = metamd_jax.reference_gradient_norm(divergence, family, tasks, 10,
                                                 per_leaf=True)
  levels = [[np.asarray(x).tolist() for x in leaf]
            for leaf in metamd_jax.eigenbasis_levels(divergence, family, tasks, 10)]
  # Levels below the calibrated ones, so that the scales grow within the test's run.
  reference = [0.3 * float(r) for r in reference]
  levels = [[[0.3 * v for v in side] for side in leaf] for leaf in levels]
  return family, divergence, reference, levels


def _assert_own_buffers(state, name):
  """No array appears twice in ``state``: ``jax.jit(..., donate_argnums=...)`` refuses to
  donate one buffer twice."""
  seen = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    assert id(x) not in seen, (name, jax.tree_util.keystr(path), seen.get(id(x)))
    seen[id(x)] = jax.tree_util.keystr(path)


@pytest.mark.parametrize('family', sorted(calibrated.PRESETS))
def test_every_presets_state_can_be_donated(setup, family):
  """Before, the overshoot check and the online statistics started several fields at one
  zeros array, and a jitted step donating the default's state failed at once."""
  _, divergence, reference, levels = setup
  record = {**calibrated.PRESETS[family], 'reference_norm': reference,
            'eigenbasis_levels': levels, 'num_steps': 4}
  optimizer = metamd_jax.calibrated_metamd(divergence, record)
  params = jax.tree.map(lambda m: jnp.zeros(m.shape), divergence,
                        is_leaf=divergence_lib.is_metric)
  _assert_own_buffers(optimizer.init(params), family)
  if family != 'mnist_mlp':
    return
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda p, s: optimizer.update(grads, s, p), donate_argnums=(1,))
  state = optimizer.init(params)
  for _ in range(2):
    updates, state = step(params, state)
  want, _ = optimizer.update(grads, optimizer.update(grads, optimizer.init(params), params)[1],
                             params)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)


def _record(reference, **settings):
  return {'reference_norm': reference, 'decay': 0.9, 'per_leaf': True, 'blend_rate': 0.0,
          'blend_statistics': 'sum', 'num_steps': 2, **settings}


def _updates(optimizer, params, num_steps=NUM_STEPS):
  """``num_steps`` updates on fixed random gradients, the parameters moving with them."""
  state, update = optimizer.init(params), jax.jit(optimizer.update)
  out = []
  for step in range(num_steps):
    keys = jax.random.split(jax.random.key(100 + step), len(jax.tree.leaves(params)))
    grads = jax.tree.unflatten(jax.tree.structure(params), [
        jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, jax.tree.leaves(params))])
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _cases(divergence, reference, levels):
  """(record, the same optimiser by hand) for each path of the builder."""
  blended = dict(eigenbasis=True, eigenbasis_levels=levels, blend_rate=0.1,
                 blend_statistics='kronecker', momentum=0.5, online_power=0.5,
                 overshoot=True, overshoot_decay=0.5, overshoot_cap=1.5,
                 refresh_growth=0.05, lengthen_below=0.3, min_scale=0.2, restarts=True,
                 sketch_rank=2, sketch_interval=0,
                 num_steps=BLENDED_HORIZON)

  # Levels far above the first gradients: with lengthen_below, the first steps are longer.
  high = [100 * r for r in reference]

  def blended_by_hand(rate, momentum=0.5, factor=0.5):
    return optax.chain(
        metamd_jax.blended_metamd(
            divergence, high, rate, decay=0.9, per_leaf=True, statistics='kronecker',
            eigenbasis_levels=levels, online_power=0.5, overshoot_decay=0.5,
            overshoot_cap=1.5, refresh_growth=0.05, eigenbasis_lengthen_below=0.3,
            eigenbasis_min_scale=0.2, sketch_rank=2, sketch_interval=0),
        metamd_jax.nesterov_momentum(momentum, factor))

  def per_epoch(length):
    longer = length > 1
    inner = optax.chain(
        metamd_jax.blended_metamd(divergence, reference, 0.05 * length ** 1.0, decay=0.9,
                                  per_leaf=True, statistics='sum'),
        metamd_jax.nesterov_momentum(jnp.where(longer, 0.9, 0.5),
                                     jnp.where(longer, 0.2, 0.5)))
    return optax.chain(inner, optax.scale(length ** -0.5))

  adaptive = metamd_jax.adaptive_metamd(divergence, reference, decay=0.9, per_leaf=True)
  return {
      'adaptive': (_record(reference), adaptive),
      'eigenbasis': (_record(reference, eigenbasis=True, eigenbasis_levels=levels),
                     metamd_jax.eigenbasis_metamd(divergence, levels, decay=0.9)),
      'momentum': (_record(reference, momentum=0.5),
                   optax.chain(adaptive, metamd_jax.nesterov_momentum(0.5))),
      'blended_restarts': (_record(high, **blended),
                           metamd_jax.doubling_restarts(blended_by_hand(0.1),
                                                        BLENDED_HORIZON)),
      'restarts_per_epoch': (
          _record(reference, blend_rate=0.05, momentum=0.5, restarts=True,
                  restart_growth=0.5, restart_shrink=0.5, restart_momentum=0.9,
                  restart_step_factor=0.2),
          metamd_jax.doubling_restarts(per_epoch, 2)),
      'guard': (_record(reference, guard_margin=1e30, guard_steps=3),
                metamd_jax.guarded_switch(metamd_jax.metamd(divergence), adaptive,
                                          reference, margin=1e30, switch_after=3)),
      'guard_low_rank': (_record(reference, guard_margin=1e30, guard_steps=3, frozen_rank=2,
                                 frozen_rank_fill='mean'),
                         metamd_jax.guarded_switch(
                             metamd_jax.low_rank_metamd(divergence, 2, fill='mean'),
                             adaptive, reference, margin=1e30, switch_after=3)),
  }


@pytest.mark.parametrize('case', ['adaptive', 'eigenbasis', 'momentum', 'blended_restarts',
                                  'restarts_per_epoch', 'guard', 'guard_low_rank'])
def test_calibrated_metamd_is_the_optimiser_composed_by_hand(setup, case):
  family, divergence, reference, levels = setup
  record, by_hand = _cases(divergence, reference, levels)[case]
  params = family.init_params()
  num_steps = BLENDED_STEPS if case == 'blended_restarts' else NUM_STEPS
  ours = _updates(metamd_jax.calibrated_metamd(divergence, record), params, num_steps)
  theirs = _updates(by_hand, params, num_steps)
  for step, (a, b) in enumerate(zip(ours, theirs)):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-9, custom_message=f'step {step}')
  # The run is not trivial: the steps move, and not all alike.
  sizes = [float(optax.tree.norm(u)) for u in ours]
  assert all(np.isfinite(sizes)) and min(sizes) > 0 and np.ptp(sizes) > 1e-3 * max(sizes)


def test_settings_change_the_optimiser(setup):
  """A mutation check of the test above: leaving one setting out changes the updates."""
  family, divergence, reference, levels = setup
  params = family.init_params()
  cases = _cases(divergence, reference, levels)
  record, _ = cases['restarts_per_epoch']
  base = _updates(metamd_jax.calibrated_metamd(divergence, record), params)
  for field in ('restart_growth', 'restart_shrink', 'restart_momentum', 'momentum',
                'blend_rate'):
    changed = {**record, field: calibrated.DEFAULTS.get(field, 0.0)}
    other = _updates(metamd_jax.calibrated_metamd(divergence, changed), params)
    assert not all(np.allclose(a, b, rtol=1e-4) for a, b in
                   zip(jax.tree.leaves(base), jax.tree.leaves(other))), field


def _results(tmp_path, divergence, params, record, **extra):
  metamd_jax.save_divergence(tmp_path / 'divergence.npz', divergence, params)
  (tmp_path / 'results.json').write_text(json.dumps({'reference': 'adam', 'adaptive': record,
                                                     **extra}))
  return tmp_path / 'results.json'


def test_a_workdir_loads_the_optimiser_its_results_report(setup, tmp_path):
  """``load_optimizer`` reads the artifact and the record of ``results.json`` (JSON: an
  infinite level is ``null``) and builds the same optimiser as the record in memory."""
  family, divergence, reference, levels = setup
  # The weight never adapts (an infinite level), nor the bias along its last direction.
  finite_levels = levels
  levels = [[levels[0][0][:-1] + [math.inf], levels[0][1]], levels[1]]
  record = _record([reference[0], math.inf], eigenbasis=True, eigenbasis_levels=levels,
                   momentum=0.5, restarts=True, quantile=1.0,
                   calibration_tasks='meta-train tuning tasks', num_calibration_tasks=2,
                   divergence_digest=calibrated.divergence_digest(divergence))
  stored = {**record, 'reference_norm': [reference[0], None],
            'eigenbasis_levels': [[levels[0][0][:-1] + [None], levels[0][1]], levels[1]]}
  params = family.init_params()
  path = _results(tmp_path, divergence, params, stored)
  loaded = calibrated.load_calibration(path)
  assert loaded == {**calibrated.DEFAULTS, **record}  # null read back as inf
  ours = _updates(metamd_jax.load_optimizer(tmp_path), params)
  theirs = _updates(metamd_jax.calibrated_metamd(divergence, record), params)
  for a, b in zip(ours, theirs):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-9)
  # The infinite levels matter: finite ones there give other updates.
  finite = _updates(metamd_jax.calibrated_metamd(divergence, {
      **record, 'reference_norm': reference, 'eigenbasis_levels': finite_levels}), params)
  assert not all(np.allclose(a, b, rtol=1e-4) for a, b in
                 zip(jax.tree.leaves(ours), jax.tree.leaves(finite)))
  # Parameters that do not fit the divergence: a clear error at init.
  with pytest.raises(ValueError):
    metamd_jax.load_optimizer(tmp_path).init({'w': jnp.zeros((3, 3))})


def test_the_digest_ties_a_calibration_to_its_divergence(setup, tmp_path):
  family, divergence, reference, _ = setup
  params = family.init_params()
  digest = calibrated.divergence_digest(divergence)
  assert len(digest) == 64
  # Saving and loading keeps it; any change of a meta-parameter does not.
  metamd_jax.save_divergence(tmp_path / 'd.npz', divergence, params)
  assert calibrated.divergence_digest(metamd_jax.load_divergence(tmp_path / 'd.npz')[0]) == digest
  other = divergence_lib.scale_steps(divergence, 1.0 + 1e-6)
  assert calibrated.divergence_digest(other) != digest
  record = _record(reference, divergence_digest=digest)
  metamd_jax.calibrated_metamd(divergence, record)  # its own divergence: fine
  with pytest.raises(ValueError, match='calibration was made for another divergence'):
    metamd_jax.calibrated_metamd(other, record)
  # A workdir whose divergence was meta-trained again after the calibration.
  _results(tmp_path, other, params, record)
  with pytest.raises(ValueError, match=r'results\.json: the calibration was made for another'):
    metamd_jax.load_optimizer(tmp_path)
  # A record without a digest (made before it was recorded) is taken as it is.
  metamd_jax.calibrated_metamd(other, _record(reference))


@pytest.mark.parametrize('change,message', [
    ({'decay': None}, 'the calibration has no decay'),
    ({'num_steps': None, 'blend_rate': None}, 'the calibration has no blend_rate, num_steps'),
    ({'blend_rte': 0.1}, r"unknown calibration fields \['blend_rte'\]"),
    ({'reference_norm': 'none'}, 'has no reference_norm: frozen MetaMD did not train'),
    ({'eigenbasis': True}, 'sets eigenbasis but has no eigenbasis_levels'),
    ({'momentum': '0.5'}, r"momentum must be a number in \[0, 1\), got '0.5'"),
    ({'blend_rate': math.nan}, 'blend_rate must be a finite number >= 0, got nan'),
    ({'decay': True}, r'decay must be a number in \[0, 1\), got True'),
    ({'restarts': 'yes'}, "restarts must be True or False, got 'yes'"),
    # Ranges, not only kinds: a negative factor steps up the gradient after a restart, and
    # a negative momentum would be no momentum.
    ({'restart_step_factor': -1.0}, 'restart_step_factor must be a positive finite number'),
    ({'momentum': -1.0}, r'momentum must be a number in \[0, 1\), got -1.0'),
    ({'sketch_rank': -3}, r'sketch_rank must be an int >= 0 \(0: no sketch\), got -3'),
    ({'blend_statistics': 'bogus'}, "blend_statistics must be one of .*, got 'bogus'"),
    ({'min_scale': 0}, r'min_scale must be a number in \(0, 1\], got 0'),
    ({'overshoot_cap': 0.5}, 'overshoot_cap must be a number >= 1'),
    ({'reference_norm': ['1.0', '2']}, "reference_norm holds '1.0', not a number"),
    ({'reference_norm': [True, True]}, 'reference_norm holds True, not a number'),
    ({'num_steps': 0}, 'num_steps must be an integer >= 1, got 0'),
    ({'num_steps': 100.0}, 'num_steps must be an integer >= 1, got 100.0'),
])
def test_a_bad_record_is_named(setup, change, message):
  _, divergence, reference, _ = setup
  record = _record(reference)
  for field, value in change.items():
    if value is None:
      del record[field]
    else:
      record[field] = None if value == 'none' else value
  with pytest.raises(ValueError, match=message):
    metamd_jax.calibrated_metamd(divergence, record)
  with pytest.raises(TypeError, match='a calibration is a mapping'):
    calibrated.check_calibration([('decay', 0.9)])


def test_results_files_are_checked(setup, tmp_path):
  family, divergence, reference, _ = setup
  params = family.init_params()
  with pytest.raises(FileNotFoundError, match='no results file'):
    metamd_jax.load_calibration(tmp_path / 'results.json')
  with pytest.raises(FileNotFoundError, match='is a directory: pass its results.json'):
    metamd_jax.load_calibration(tmp_path)
  with pytest.raises(FileNotFoundError, match='no divergence artifact'):
    metamd_jax.load_optimizer(tmp_path)
  metamd_jax.save_divergence(tmp_path / 'divergence.npz', divergence, params)
  with pytest.raises(FileNotFoundError, match='no results.json in'):
    metamd_jax.load_optimizer(tmp_path)
  path = tmp_path / 'results.json'
  path.write_text('{"adaptive": ')
  with pytest.raises(ValueError, match='is not a JSON results file'):
    metamd_jax.load_calibration(path)
  path.write_text(json.dumps({'reference': 'adam', 'adaptive': None}))
  with pytest.raises(ValueError, match='has no calibration: adaptive MetaMD was off'):
    metamd_jax.load_optimizer(tmp_path)
  path.write_text(json.dumps({'adaptive': {**_record(reference), 'decay': None,
                                           'blend_rte': 1}}))
  with pytest.raises(ValueError, match=r'results\.json: unknown calibration fields'):
    metamd_jax.load_calibration(path)
  # A benchmark's results: one calibration per family.
  record = _record(reference)
  path.write_text(json.dumps({'families': {'digits_mlp': {'adaptive': record}}}))
  with pytest.raises(ValueError, match=r"benchmark's results: name one of its families "
                                       r"\['digits_mlp'\]"):
    metamd_jax.load_calibration(path)
  with pytest.raises(ValueError, match=r"has no family 'cnn' \(it has \['digits_mlp'\]\)"):
    metamd_jax.load_calibration(path, family='cnn')
  assert metamd_jax.load_calibration(path, family='digits_mlp') == {**calibrated.DEFAULTS,
                                                                      **record}


def test_a_benchmark_workdir_loads_a_familys_optimiser(setup, tmp_path):
  """With ``family``: the family's calibration in the benchmark's ``results.json`` and the
  divergence it was made for, that of the family's ``metamd`` variant."""
  family, divergence, reference, _ = setup
  params = family.init_params()
  other = divergence_lib.scale_steps(divergence, 2.0)  # another variant's divergence
  for variant, learned in (('metamd', divergence), ('metamd_unrolled', other)):
    (tmp_path / 'least_squares' / variant).mkdir(parents=True)
    metamd_jax.save_divergence(tmp_path / 'least_squares' / variant / 'divergence.npz',
                               learned, params)
  record = _record(reference, momentum=0.5,
                   divergence_digest=calibrated.divergence_digest(divergence))
  (tmp_path / 'results.json').write_text(json.dumps(
      {'families': {'least_squares': {'adaptive': record}}}))
  ours = _updates(metamd_jax.load_optimizer(tmp_path, family='least_squares'), params)
  theirs = _updates(metamd_jax.calibrated_metamd(divergence, record), params)
  for a, b in zip(ours, theirs):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-9)
  with pytest.raises(FileNotFoundError, match='no divergence artifact'):
    metamd_jax.load_optimizer(tmp_path, family='digits_mlp')
  with pytest.raises(FileNotFoundError, match='no divergence artifact'):
    metamd_jax.load_optimizer(tmp_path)  # a main job's layout: no divergence.npz at the top


# ---------------------------------------------------------------------------
# Calibrating a divergence from Python, and saving the record.
# ---------------------------------------------------------------------------


def test_recommended_settings_are_the_main_jobs_default():
  """``RECOMMENDED`` is what the main job's default config records, field for field."""
  from configs import default
  from experiments import evaluate

  recorded = evaluate.settings(default.get_config())
  assert recorded.pop('num_steps') == default.get_config().eval.num_steps
  assert calibrated.RECOMMENDED == recorded


@pytest.mark.parametrize('family,config_name', [
    ('mnist_mlp', 'default'), ('digits_mlp', 'digits_mlp'), ('mnist1d_cnn', 'mnist1d_cnn'),
    ('transformer_lm', 'transformer_lm'), ('least_squares', 'least_squares')])
def test_each_preset_is_its_shipped_configs_settings(setup, family, config_name):
  """``PRESETS[family]`` is what that family's config records (and the benchmark's entry
  for the family, where it has one), field for field; ``calibrate`` takes it."""
  import importlib

  from configs import benchmark
  from experiments import evaluate

  config = importlib.import_module(f'configs.{config_name}').get_config()
  recorded = evaluate.settings(config)
  recorded.pop('num_steps')
  assert calibrated.PRESETS[family] == recorded
  families = benchmark.get_config().families
  if family in families:
    in_benchmark = evaluate.settings(families[family])
    in_benchmark.pop('num_steps')
    assert calibrated.PRESETS[family] == in_benchmark
  assert set(calibrated.PRESETS) == {'mnist_mlp', 'digits_mlp', 'mnist1d_cnn',
                                     'transformer_lm', 'least_squares'}
  least_squares, divergence, _, _ = setup
  tasks = least_squares.sample_batch(jax.random.key(1), 2)
  record = metamd_jax.calibrate(divergence, least_squares, tasks, 4, calibrated.PRESETS[family])
  expected = dict(calibrated.PRESETS[family])
  if not expected['eigenbasis']:
    expected['lengthen_below'] = None
  assert {k: record[k] for k in expected} == expected


def test_calibrate_records_the_levels_and_settings_it_was_given(setup):
  """The record's levels are the building blocks' on the same tasks; its settings are
  ``RECOMMENDED`` with the given ones in their place."""
  family, divergence, _, _ = setup
  tasks = family.sample_batch(jax.random.key(1), 2)
  record = metamd_jax.calibrate(divergence, family, tasks, 10)
  assert record['reference_norm'] == metamd_jax.reference_gradient_norm(
      divergence, family, tasks, 10, per_leaf=True)
  expected = metamd_jax.eigenbasis_levels(divergence, family, tasks, 10)
  assert len(record['eigenbasis_levels']) == len(expected)
  for ours, theirs in zip(record['eigenbasis_levels'], expected):
    for a, b in zip(ours, theirs):
      np.testing.assert_array_equal(np.asarray(a), b)
  assert {k: record[k] for k in calibrated.RECOMMENDED} == calibrated.RECOMMENDED
  assert (record['num_steps'], record['quantile'], record['num_calibration_tasks']) == (
      10, 1.0, 2)
  assert record['divergence_digest'] == calibrated.divergence_digest(divergence)
  assert calibrated.check_calibration(record)  # a valid record, as it is

  # Another quantile, one level for all leaves, no eigenbasis scales.
  other = metamd_jax.calibrate(divergence, family, tasks, np.int64(6),
                               {'per_leaf': False, 'eigenbasis': False, 'momentum': 0.3},
                               quantile=0.5)
  assert other['reference_norm'] == metamd_jax.reference_gradient_norm(
      divergence, family, tasks, 6, quantile=0.5)
  assert other['eigenbasis_levels'] is None and other['lengthen_below'] is None
  assert (other['momentum'], other['per_leaf'], other['num_steps']) == (0.3, False, 6)
  assert type(other['num_steps']) is int


def test_calibrated_levels_take_frozen_steps_on_the_calibration_tasks(setup):
  """With quantile 1, the learned half never adapts on its own calibration tasks: the
  optimiser without momentum, online half, check, restarts or longer first steps is
  frozen MetaMD there (and not on a calibration with levels a tenth as high)."""
  family, divergence, _, _ = setup
  tasks = family.sample_batch(jax.random.key(1), 2)
  plain = {'blend_rate': 0.0, 'overshoot': False, 'momentum': 0.0, 'restarts': False,
           'lengthen_below': None}
  record = metamd_jax.calibrate(divergence, family, tasks, 10, plain)
  frozen = metamd_jax.evaluation.run(metamd_jax.metamd(divergence), family, tasks, 10)
  ours = metamd_jax.evaluation.run(metamd_jax.calibrated_metamd(divergence, record), family,
                                   tasks, 10)
  np.testing.assert_allclose(ours.losses, frozen.losses, rtol=1e-5, atol=1e-7)
  low = {**record, 'reference_norm': [0.1 * c for c in record['reference_norm']],
         'eigenbasis_levels': [[[0.1 * v for v in side] for side in leaf]
                               for leaf in record['eigenbasis_levels']]}
  slower = metamd_jax.evaluation.run(metamd_jax.calibrated_metamd(divergence, low), family,
                                     tasks, 10)
  assert not np.allclose(slower.losses, frozen.losses, rtol=1e-3)


@pytest.mark.parametrize('arguments,error,message', [
    (dict(settings={'blend': 0.1}), ValueError, 'unknown settings'),
    (dict(settings={'reference_norm': 1.0}), ValueError, 'computed by calibrate'),
    (dict(settings={'num_steps': 5}), ValueError, 'computed by calibrate'),
    (dict(settings={'momentum': 'high'}), ValueError, r'momentum must be a number in \[0, 1\)'),
    (dict(settings={'restart_step_factor': -1.0}), ValueError,
     'restart_step_factor must be a positive finite number'),
    (dict(settings={'restarts': 1}), ValueError, 'restarts must be True or False'),
    (dict(settings={'decay': 1.0}), ValueError, 'decay'),
    (dict(settings=[('momentum', 0.5)]), TypeError, 'settings is a mapping'),
    (dict(num_steps=0), ValueError, 'num_steps'),
    (dict(num_steps=2.5), ValueError, 'num_steps'),
    (dict(quantile=1.5), ValueError, 'quantile'),
    (dict(quantile=None), ValueError, 'quantile'),
    (dict(task_params='one task'), ValueError, r"task_params\['key'\] has the shape \(2,\)"),
    # Before, a NaN factor was reported as the divergence diverging on every task.
    (dict(divergence='nan'), ValueError, 'non-finite meta-parameters'),
])
def test_calibrate_names_bad_input_before_any_run(setup, monkeypatch, arguments, error,
                                                  message):
  family, divergence, _, _ = setup
  if arguments.pop('divergence', None) == 'nan':
    divergence = jax.tree.map(lambda x: x * jnp.nan, divergence)

  def no_run(*args, **kwargs):
    raise AssertionError('a calibration run started')

  monkeypatch.setattr(metamd_jax.adaptive, 'reference_gradient_norm', no_run)
  monkeypatch.setattr(metamd_jax.eigenbasis, 'eigenbasis_levels', no_run)
  tasks = family.sample_batch(jax.random.key(1), 2)
  if arguments.get('task_params') == 'one task':
    arguments['task_params'] = family.sample(jax.random.key(1))  # not stacked
  arguments = {'num_steps': 4, 'task_params': tasks, **arguments}
  with pytest.raises(error, match=message):
    metamd_jax.calibrate(divergence, family, **arguments)


def test_calibrate_names_a_divergence_of_other_parameters_before_any_run(setup, monkeypatch):
  family, _, _, _ = setup
  monkeypatch.setattr(metamd_jax.adaptive, 'reference_gradient_norm',
                      lambda *a, **k: pytest.fail('a calibration run started'))
  other = metamd_jax.init_divergence({'w': jnp.zeros((3, 3))}, 0.1)
  with pytest.raises(ValueError, match='w') as error:
    metamd_jax.calibrate(other, family, family.sample_batch(jax.random.key(1), 2), 4)
  assert not isinstance(error.value, calibrated.CalibrationError)


def test_calibrate_without_levels_is_a_calibration_error(setup):
  """A divergence whose frozen steps diverge, or end above their start, on a calibration
  task has no levels; settings that do not fit together are named after the runs."""
  family, divergence, _, _ = setup
  tasks = family.sample_batch(jax.random.key(1), 2)
  too_long = divergence_lib.scale_steps(divergence, 1e4)  # 0.05 -> 500: not finite
  with pytest.raises(calibrated.CalibrationError, match='diverges on 2 of 2'):
    metamd_jax.calibrate(too_long, family, tasks, 10)
  # Steps 20 times the setup's: every run grows and stays finite. Its peaks are levels
  # (reference_gradient_norm takes them), but of runs that do not train.
  growing = divergence_lib.scale_steps(divergence, 20.0)
  assert all(math.isfinite(c) for c in metamd_jax.reference_gradient_norm(
      growing, family, tasks, 10, per_leaf=True, require_training=False))
  with pytest.raises(calibrated.CalibrationError, match='initial loss .* on 2 of 2'):
    metamd_jax.calibrate(growing, family, tasks, 10)
  assert issubclass(calibrated.CalibrationError, ValueError)
  with pytest.raises(ValueError, match='needs per_leaf=True'):
    metamd_jax.calibrate(divergence, family, tasks, 4, {'per_leaf': False})


def test_a_saved_calibration_loads_back_and_builds_the_same_optimiser(setup, tmp_path):
  """``save_calibration`` writes standard JSON (an infinite level as ``null``, every
  setting); ``load_calibration`` reads it back; ``load_optimizer`` reads a workdir of one's
  own (``divergence.npz`` and ``calibration.json``)."""
  family, divergence, _, _ = setup
  tasks = family.sample_batch(jax.random.key(1), 2)
  record = metamd_jax.calibrate(divergence, family, tasks, 4, {'blend_rate': 0.05})
  record['reference_norm'] = (record['reference_norm'][0], math.inf)  # the weight: never
  workdir = tmp_path / 'runs' / 'mine'
  path = metamd_jax.save_calibration(workdir / calibrated.CALIBRATION_FILE, record)
  assert path == workdir / 'calibration.json' and sorted(p.name for p in workdir.iterdir()) == [
      'calibration.json']  # nothing left aside

  def no_constants(name):
    raise AssertionError(f'{name} is not standard JSON')

  stored = json.loads(path.read_text(), parse_constant=no_constants)['adaptive']
  assert stored['reference_norm'][1] is None
  assert set(stored) == set(calibrated.check_calibration(record))  # every setting written
  loaded = metamd_jax.load_calibration(path)
  assert loaded == calibrated.check_calibration(record)
  assert loaded['reference_norm'][1] == math.inf

  params = family.init_params()
  metamd_jax.save_divergence(workdir / 'divergence.npz', divergence, params)
  ours = _updates(metamd_jax.load_optimizer(workdir), params, num_steps=6)
  theirs = _updates(metamd_jax.calibrated_metamd(divergence, record), params, num_steps=6)
  for a, b in zip(ours, theirs):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-9)

  # Saving again replaces the file whole (levels as arrays, numpy or jax, are written as
  # numbers); a job's results.json beside it is ambiguous.
  metamd_jax.save_calibration(path, {**record, 'momentum': 0.2, 'reference_norm': jnp.asarray(
      [record['reference_norm'][0], 1.0]), 'eigenbasis_levels': [
          [np.asarray(side) for side in leaf] for leaf in record['eigenbasis_levels']]})
  again = metamd_jax.load_calibration(path)
  assert again['momentum'] == 0.2 and again['eigenbasis_levels'] == loaded['eigenbasis_levels']
  np.testing.assert_allclose(again['reference_norm'], [record['reference_norm'][0], 1.0],
                             rtol=1e-6)
  (workdir / 'results.json').write_text(json.dumps({'adaptive': stored}))
  with pytest.raises(ValueError, match='two calibrations'):
    metamd_jax.load_optimizer(workdir)
  (workdir / 'results.json').unlink()
  path.unlink()
  with pytest.raises(FileNotFoundError, match='calibration.json'):
    metamd_jax.load_optimizer(workdir)


@pytest.mark.parametrize('change,error,message', [
    ({'reference_norm': [float('nan'), 1.0]}, ValueError, 'level nan'),
    ({'reference_norm': [0.0, 1.0]}, ValueError, 'level 0.0'),
    ({'eigenbasis': True, 'eigenbasis_levels': [[[1.0, -2.0]]]}, ValueError, 'level -2.0'),
    ({'reference_norm': None}, ValueError, 'no reference_norm'),
    ({'blend_rat': 0.1}, ValueError, 'unknown calibration fields'),
])
def test_a_bad_record_is_not_saved(tmp_path, change, error, message):
  record = {**_record([0.5, 1.0]), **change}
  path = tmp_path / 'calibration.json'
  with pytest.raises(error, match=message):
    metamd_jax.save_calibration(path, record)
  assert not path.exists()


def test_save_calibration_names_a_directory(tmp_path):
  with pytest.raises(ValueError, match='is a directory'):
    metamd_jax.save_calibration(tmp_path, _record([0.5, 1.0]))
