"""The learned optimiser as it was meta-tested: a divergence plus its recorded calibration.

Meta-testing calibrates adaptive MetaMD on meta-train tasks (the gradient levels of
:func:`metamd_jax.reference_gradient_norm` and, with the eigenbasis scales,
:func:`metamd_jax.eigenbasis_levels`) and records those levels together with every
run-time setting the optimiser was built with: the ``'adaptive'`` entry of a main job's
``results.json`` (and of each family in a benchmark's). :func:`calibrated_metamd` builds
the same optax transformation from such a record, so that the optimiser a table reports is
the one a training loop gets:

* blended MetaMD (:func:`metamd_jax.blended_metamd`) when ``blend_rate > 0`` or with the
  overshoot check, else eigenbasis MetaMD (with ``eigenbasis``) or adaptive MetaMD;
* then Nesterov's momentum (:func:`metamd_jax.nesterov_momentum`) when ``momentum > 0``;
* with ``restarts``, the doubling trick (:func:`metamd_jax.doubling_restarts`) after
  ``num_steps`` updates (the horizon the levels were calibrated over), ``2 num_steps``, ...,
  each epoch ``L`` horizons long taking the blend rate times ``L**(restart_growth +
  restart_shrink)``, the whole step times ``L**-restart_shrink`` and, with
  ``restart_momentum``, that momentum at ``restart_step_factor`` once ``L > 1``;
* with ``guard_margin``, all of it behind frozen MetaMD (at ``frozen_rank`` where set) with
  :func:`metamd_jax.guarded_switch`.

Nothing is added to the parts, so each keeps its own guarantee (the modules state them):
a non-decreasing metric, the momentum at a step factor of at most 1/2, the restarts and
the guard's switch epoch by epoch. :func:`load_optimizer` reads a job's workdir (a main
job's ``divergence.npz`` and ``results.json``, or a benchmark family's) and checks that the
calibration was made for that divergence (:func:`divergence_digest`).

For a divergence meta-trained from Python (:func:`metamd_jax.fit`), :func:`calibrate` makes
the record on meta-train tasks, with :data:`RECOMMENDED` settings unless told otherwise,
and :func:`save_calibration` writes it where :func:`load_calibration` and
:func:`load_optimizer` read it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax import (
  accelerated,
  adaptive,
  artifact,
  blended,
  eigenbasis,
  guarded,
  low_rank,
  overshoot,
  restarts,
  statistics,
  transform,
)
from metamd_jax import divergence as divergence_lib
from metamd_jax.tasks.base import TaskFamily
from metamd_jax.types import PyTree

PathLike = str | os.PathLike

# Every setting a record must hold.
REQUIRED = ('reference_norm', 'decay', 'per_leaf', 'blend_rate', 'blend_statistics',
            'num_steps')
# What a record made before a setting existed meant.
DEFAULTS = {
    'eigenbasis': False, 'eigenbasis_levels': None, 'eigenbasis_rank': 0,
    'momentum': 0.0, 'online_power': 1.0, 'max_dimension': 1024, 'block_size': 0,
    'sketch_rank': 0, 'sketch_interval': 1, 'lengthen_below': None, 'min_scale': 0.1,
    'overshoot': False, 'overshoot_decay': 0.5, 'refresh_growth': None,
    'overshoot_cap': None, 'overshoot_scope': 'learned', 'restarts': False,
    'restart_growth': 0.0, 'restart_shrink': 0.0, 'restart_momentum': None,
    'restart_step_factor': accelerated.DEFAULT_STEP_FACTOR, 'guard_margin': None,
    'guard_steps': None, 'guard_progress': None, 'guard_prior': False,
    'frozen_rank': None, 'frozen_rank_fill': 'min', 'divergence_digest': None,
}
# Recorded about the calibration, not used to build the optimiser.
DESCRIPTIVE = ('quantile', 'calibration_tasks', 'num_calibration_tasks')
# The run-time settings of the main job's default (``configs/default.py``, the MNIST MLP
# family; each chosen on that family's validation tasks, ``experiments/RESULTS.md``):
# what :func:`calibrate` records unless told otherwise. Another family's best settings may
# differ (the transformer's config takes Nesterov's momentum 0.7 and the blend rate 0.01).
RECOMMENDED = {
    'decay': 0.9, 'per_leaf': True, 'eigenbasis': True, 'eigenbasis_rank': 0,
    'blend_rate': 0.1, 'blend_statistics': 'kronecker', 'momentum': 0.5,
    'online_power': 0.5, 'max_dimension': 1024, 'block_size': 0, 'sketch_rank': 64,
    'sketch_interval': 0, 'lengthen_below': 0.3, 'min_scale': 0.1, 'overshoot': True,
    'overshoot_decay': 0.5, 'refresh_growth': 0.1, 'overshoot_cap': 3.0,
    'overshoot_scope': 'learned', 'restarts': True, 'restart_growth': 0.0,
    'restart_shrink': 0.0, 'restart_momentum': None, 'restart_step_factor': 0.5,
    'guard_margin': None, 'guard_steps': None, 'guard_progress': None,
    'guard_prior': False, 'frozen_rank': 64, 'frozen_rank_fill': 'min',
}
# The run-time settings of each shipped family's config (``configs/<name>.py``; ``mnist_mlp``
# is ``configs/default.py``, RECOMMENDED), as chosen or kept on that family's validation
# tasks (the configs' comments and ``experiments/RESULTS.md`` say which and where): a start
# for a family of one's own near one of them, e.g. ``calibrate(...,
# settings=PRESETS['transformer_lm'])``.
PRESETS = {
    'mnist_mlp': RECOMMENDED,
    'digits_mlp': {
        **RECOMMENDED, 'blend_rate': 0.3, 'sketch_rank': 0, 'sketch_interval': 1,
        'lengthen_below': 0.1, 'overshoot_decay': 0.8, 'refresh_growth': 0.0,
        'overshoot_cap': 10.0, 'frozen_rank': None},
    'mnist1d_cnn': {
        **RECOMMENDED, 'online_power': 0.0, 'sketch_rank': 0, 'sketch_interval': 1,
        'lengthen_below': None, 'overshoot': False, 'refresh_growth': 0.3,
        'restart_shrink': 0.5, 'restart_momentum': 0.9, 'restart_step_factor': 0.1,
        'frozen_rank': None},
    'transformer_lm': {
        **RECOMMENDED, 'blend_rate': 0.01, 'momentum': 0.7, 'sketch_rank': 0,
        'sketch_interval': 1, 'lengthen_below': 0.1, 'refresh_growth': None,
        'restart_growth': 0.25, 'restart_shrink': 0.5, 'restart_momentum': 0.9,
        'restart_step_factor': 0.2, 'frozen_rank': None},
    'least_squares': {
        **RECOMMENDED, 'lengthen_below': None, 'overshoot_cap': None, 'restarts': False,
        'frozen_rank': None},
}
# Where save_calibration writes in a workdir of one's own, and load_optimizer reads when the
# workdir has no results.json.
CALIBRATION_FILE = 'calibration.json'
# The fields calibrate computes (not settings).
_COMPUTED = ('reference_norm', 'eigenbasis_levels', 'num_steps', 'divergence_digest')


def _real(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
  """A real number between ``low`` and ``high`` (each end closed unless said open)."""
  return lambda v: _real(v) and (low < v if low_open else low <= v) and (
      v < high if high_open else v <= high)


def _or_none(rule):
  return lambda v: v is None or rule(v)


_FLAG = (lambda v: isinstance(v, bool), 'must be True or False')
# Every run-time setting's admissible values, and the requirement a bad value is named
# with: one table for a record (check_calibration, calibrate) and for a config's eval
# fields (experiments.builders.validate_config). ``None`` or ``inf`` where a setting may be
# off or unbounded (a record writes ``inf`` as ``None``).
SETTING_RULES = {
    'decay': (_in(0, 1, high_open=True), 'must be a number in [0, 1)'),
    'per_leaf': _FLAG,
    'eigenbasis': _FLAG,
    'eigenbasis_rank': (lambda v: _count(v) and v >= 0,
                        'must be an int >= 0 (0: a scale per eigendirection)'),
    'blend_rate': (_in(0, math.inf, high_open=True), 'must be a finite number >= 0'),
    'blend_statistics': (lambda v: v in blended.STATISTICS,
                         f'must be one of {blended.STATISTICS}'),
    'momentum': (_in(0, 1, high_open=True), 'must be a number in [0, 1)'),
    'online_power': (_in(0, 1), 'must be a number in [0, 1]'),
    'max_dimension': (lambda v: _count(v) and v >= 1, 'must be an int >= 1'),
    'block_size': (lambda v: _count(v) and v >= 0, 'must be an int >= 0 (0: no blocking)'),
    'sketch_rank': (lambda v: _count(v) and v >= 0, 'must be an int >= 0 (0: no sketch)'),
    'sketch_interval': (lambda v: _count(v) and v >= 0,
                        "must be an int >= 0 (1: every step; 0: at the leaf's root refreshes)"),
    'lengthen_below': (_or_none(_in(0, 1, low_open=True)),
                       'must be a number in (0, 1] or None (the scales start at 1)'),
    'min_scale': (_in(0, 1, low_open=True), 'must be a number in (0, 1]'),
    'overshoot': _FLAG,
    'overshoot_decay': (_in(0, 1, high_open=True), 'must be a number in [0, 1)'),
    'refresh_growth': (_or_none(_in(0, math.inf)),
                       'must be a number >= 0 (0: every step) or inf (the schedule alone)'),
    'overshoot_cap': (_or_none(_in(1, math.inf)),
                      'must be a number >= 1 (the largest factor of the overshoot check) or '
                      'inf (no cap)'),
    'overshoot_scope': (lambda v: v in overshoot.SCOPES, f'must be one of {overshoot.SCOPES}'),
    'restarts': _FLAG,
    'restart_growth': (_in(0, math.inf, high_open=True),
                       'must be a finite number >= 0 (0: the online half the same in every '
                       'epoch)'),
    'restart_shrink': (_in(0, math.inf, high_open=True),
                       'must be a finite number >= 0 (0: the learned half the same in every '
                       'epoch)'),
    'restart_momentum': (_or_none(_in(0, 1, high_open=True)),
                         'must be None (the momentum in every epoch) or a number in [0, 1)'),
    'restart_step_factor': (_in(0, math.inf, low_open=True, high_open=True),
                            'must be a positive finite number'),
    'guard_margin': (_or_none(_in(0, math.inf, low_open=True, high_open=True)),
                     'must be None (no guard) or a positive finite number'),
    'guard_steps': (lambda v: v is None or (_count(v) and v >= 0),
                    'must be None (no switch on the step count) or an int >= 0'),
    'guard_progress': (_or_none(_in(0, math.inf, high_open=True)),
                       'must be None (switch on the step count alone) or a finite number >= 0'),
    'guard_prior': _FLAG,
    'frozen_rank': (lambda v: v is None or (_count(v) and v >= 1),
                    'must be None (no low-rank frozen MetaMD) or an int >= 1'),
    'frozen_rank_fill': (lambda v: v in low_rank.FILLS, f'must be one of {low_rank.FILLS}'),
}


def setting_requirement(name: str, value: Any) -> str | None:
  """``None`` where ``value`` is admissible for the run-time setting ``name``
  (:data:`SETTING_RULES`), else the requirement it breaks."""
  admissible, requirement = SETTING_RULES[name]
  try:
    return None if admissible(value) else requirement
  except TypeError:  # e.g. an unhashable value tested for membership
    return requirement


class CalibrationError(ValueError):
  """No levels: frozen MetaMD does not train a calibration task (the run diverges, or ends
  at or above its initial loss), or every calibration gradient is zero."""


# A calibration names the divergence it was made for by this digest.
divergence_digest = divergence_lib.digest


def _infinite_where_null(levels: Any) -> Any:
  """``levels`` (nested lists) with each ``None`` entry as ``inf``: JSON writes an
  infinite level (a leaf or direction that never adapts) as ``null``."""
  if isinstance(levels, (list, tuple)):
    return [math.inf if x is None else _infinite_where_null(x) for x in levels]
  return levels


def check_calibration(calibration: Mapping[str, Any]) -> dict:
  """The record with every setting present (:data:`DEFAULTS` where it has none).

  A ``None`` among the levels (``reference_norm`` per leaf, ``eigenbasis_levels``) is an
  infinite level, as JSON writes it; ``reference_norm`` itself ``None`` is a failed
  calibration.

  Raises:
    TypeError: if ``calibration`` is not a mapping.
    ValueError: naming the fields missing from :data:`REQUIRED` or unknown to this
      library, a setting outside its range (:data:`SETTING_RULES`), a bad ``num_steps``,
      a level that is NaN, zero or negative, or when ``reference_norm`` is ``None`` (the
      calibration failed: frozen MetaMD did not train a calibration task, so there are no
      levels to adapt from), or ``eigenbasis`` is set without ``eigenbasis_levels``.
  """
  if not isinstance(calibration, Mapping):
    raise TypeError(f'a calibration is a mapping (the \'adaptive\' entry of a results.json), '
                    f'got {type(calibration).__name__}.')
  missing = [name for name in REQUIRED if name not in calibration]
  if missing:
    raise ValueError(f'the calibration has no {", ".join(missing)}: pass the \'adaptive\' '
                     'entry of a results.json.')
  unknown = sorted(set(calibration) - set(REQUIRED) - set(DEFAULTS) - set(DESCRIPTIVE))
  if unknown:
    raise ValueError(f'unknown calibration fields {unknown} (a record of a newer version, '
                     'or a misspelt setting).')
  if calibration['reference_norm'] is None:
    raise ValueError('the calibration has no reference_norm: frozen MetaMD did not train a '
                     'calibration task, so adaptive MetaMD was left out of that run.')
  record = {**DEFAULTS, **calibration}
  _check_settings(record)
  for name in ('reference_norm', 'eigenbasis_levels'):
    record[name] = _infinite_where_null(record[name])
    _check_levels(name, record[name])
  if record['eigenbasis'] and record['eigenbasis_levels'] is None:
    raise ValueError('the calibration sets eigenbasis but has no eigenbasis_levels.')
  return record


def _check_settings(record: Mapping[str, Any]) -> None:
  """Every run-time setting and ``num_steps`` of a full record is admissible."""
  for name in SETTING_RULES:
    requirement = setting_requirement(name, record[name])
    if requirement is not None:
      raise ValueError(f'the calibration\'s {name} {requirement}, got {record[name]!r}.')
  steps = record['num_steps']
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f'the calibration\'s num_steps must be an integer >= 1, got {steps!r}.')


def _check_levels(name: str, levels: Any) -> None:
  """Every concrete level is positive or infinite (not zero, negative or NaN)."""
  if levels is None or isinstance(levels, jax.core.Tracer):
    return
  if isinstance(levels, (list, tuple)):
    for x in levels:
      _check_levels(name, x)
    return
  dtype = np.asarray(levels).dtype
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    # a string, a bool, an object: not a level
    raise ValueError(f'the calibration\'s {name} holds {levels!r}, not a number.')
  values = np.asarray(levels, np.float64).ravel()
  bad = values[~(values > 0)]
  if bad.size:
    raise ValueError(f'the calibration\'s {name} holds the level {float(bad[0])!r}: levels '
                     'are positive, or infinite (null in JSON) where they never adapt.')


def _learned(divergence: PyTree, record: dict, blend_rate, momentum, step_factor
             ) -> optax.GradientTransformation:
  """One epoch's optimiser: blended, eigenbasis or adaptive MetaMD, then the momentum."""
  levels = record['eigenbasis_levels'] if record['eigenbasis'] else None
  rank = record['eigenbasis_rank'] or None
  if record['blend_rate'] > 0 or record['overshoot']:
    optimizer = blended.blended_metamd(
        divergence, record['reference_norm'], blend_rate, decay=record['decay'],
        per_leaf=record['per_leaf'], statistics=record['blend_statistics'],
        eigenbasis_levels=levels, online_power=record['online_power'],
        max_dimension=record['max_dimension'], block_size=record['block_size'] or None,
        sketch_rank=record['sketch_rank'] or None,
        sketch_interval=record['sketch_interval'],
        overshoot_decay=record['overshoot_decay'] if record['overshoot'] else None,
        refresh_growth=record['refresh_growth'],
        overshoot_cap=record['overshoot_cap'] if record['overshoot'] else None,
        overshoot_scope=record['overshoot_scope'],
        eigenbasis_rank=rank if levels is not None else None,
        eigenbasis_lengthen_below=record['lengthen_below'] if levels is not None else None,
        eigenbasis_min_scale=record['min_scale'])
  elif levels is not None:
    optimizer = eigenbasis.eigenbasis_metamd(divergence, levels, decay=record['decay'],
                                             rank=rank)
  else:
    optimizer = adaptive.adaptive_metamd(divergence, record['reference_norm'],
                                         decay=record['decay'], per_leaf=record['per_leaf'])
  if record['momentum'] > 0:
    optimizer = optax.chain(optimizer, accelerated.nesterov_momentum(momentum, step_factor))
  return optimizer


def calibrated_metamd(divergence: PyTree, calibration: Mapping[str, Any]
                      ) -> optax.GradientTransformation:
  """The optimiser a calibration record describes (module docstring), for ``divergence``.

  Args:
    divergence: the learned divergence the record was calibrated for (e.g. from
      :func:`metamd_jax.load_divergence`).
    calibration: the record: the ``'adaptive'`` entry of a ``results.json``
      (:func:`load_calibration`), or a mapping with the fields of :data:`REQUIRED` and any
      of :data:`DEFAULTS`.

  Returns:
    An optax ``GradientTransformation``; its ``update`` needs ``params`` with the
    restarts (and the guard's handover), as :func:`metamd_jax.doubling_restarts` does.

  Raises:
    ValueError: from :func:`check_calibration`, or when ``calibration`` records a
      ``divergence_digest`` that is not ``divergence``'s (calibrated for another divergence;
      not checked for a traced divergence); the building blocks' own errors for a bad
      setting.
  """
  record = check_calibration(calibration)
  concrete = not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(divergence))
  if (record['divergence_digest'] is not None and concrete
      and record['divergence_digest'] != divergence_digest(divergence)):
    raise ValueError('the calibration was made for another divergence (its '
                     'divergence_digest differs): calibrate again for this one.')
  first_momentum = record['momentum']
  step_factor = accelerated.DEFAULT_STEP_FACTOR
  growth, shrink = record['restart_growth'], record['restart_shrink']
  later_momentum = record['restart_momentum']
  if not record['restarts']:
    optimizer = _learned(divergence, record, record['blend_rate'], first_momentum,
                         step_factor)
  elif growth == 0 and shrink == 0 and later_momentum is None:
    optimizer = restarts.doubling_restarts(
        _learned(divergence, record, record['blend_rate'], first_momentum, step_factor),
        record['num_steps'])
  else:
    def for_epoch(length):
      # The learned half times L**-shrink, the online half times L**growth: the whole step
      # times L**-shrink, the blend rate times L**(growth + shrink). Epochs longer than
      # the horizon (L > 1) may take their own momentum and step factor.
      momentum, factor = first_momentum, step_factor
      if later_momentum is not None:
        longer = length > 1
        momentum = jnp.where(longer, later_momentum, momentum)
        factor = jnp.where(longer, record['restart_step_factor'], factor)
      epoch = _learned(divergence, record, record['blend_rate'] * length ** (growth + shrink),
                       momentum, factor)
      return epoch if shrink == 0 else optax.chain(epoch, optax.scale(length ** -shrink))

    optimizer = restarts.doubling_restarts(for_epoch, record['num_steps'])
  return guard(divergence, record, optimizer)


def guard(divergence: PyTree, calibration: Mapping[str, Any],
          optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """``optimizer`` behind frozen MetaMD, as the record's guard settings say.

  With ``guard_margin`` set, :func:`metamd_jax.guarded_switch` runs frozen MetaMD (at
  ``frozen_rank`` with ``frozen_rank_fill`` where set, :func:`metamd_jax.low_rank_metamd`)
  while its gradients stay within that margin of the ``reference_norm`` levels, and
  ``optimizer`` for good from the first step they do not, or after ``guard_steps`` steps
  (once the loss's averaged relative decrease per step is below ``guard_progress``, where
  set), its Shampoo statistics started from the frozen steps' gradient mass with
  ``guard_prior``; without it, ``optimizer`` itself.
  """
  record = check_calibration(calibration)
  if record['guard_margin'] is None:
    return optimizer
  fast = (low_rank.low_rank_metamd(divergence, record['frozen_rank'],
                                   fill=record['frozen_rank_fill'])
          if record['frozen_rank'] is not None else transform.metamd(divergence))
  return guarded.guarded_switch(
      fast, optimizer, record['reference_norm'], margin=record['guard_margin'],
      switch_after=record['guard_steps'], min_progress=record['guard_progress'],
      handover=statistics.statistics_prior if record['guard_prior'] else None,
      decay=record['decay'])


def calibrate(divergence: PyTree, family: TaskFamily, task_params: PyTree, num_steps: int,
              settings: Mapping[str, Any] | None = None, *, quantile: float = 1.0) -> dict:
  """The calibration record of a learned divergence, made on meta-train tasks.

  Runs the frozen divergence on each task of ``task_params`` for ``num_steps`` steps and
  records its gradient levels: :func:`metamd_jax.reference_gradient_norm` (one per leaf
  with ``per_leaf``; each run must train its task, ``require_training``) and, with
  ``eigenbasis``, :func:`metamd_jax.eigenbasis_levels` (at ``eigenbasis_rank``), together
  with the run-time settings. :func:`calibrated_metamd`
  builds the learned optimiser from the record; :func:`save_calibration` writes it.

  Args:
    divergence: the learned divergence (e.g. ``metamd_jax.fit(...).divergence``).
    family: its meta-training task family.
    task_params: stacked task parameters of the calibration tasks: meta-train tasks
      (e.g. :func:`metamd_jax.evaluation.tuning_tasks`), never the held-out ones.
    num_steps: the horizon of the calibration runs, and the first epoch of the
      ``restarts``: the length of the runs the optimiser is for (meta-training's horizon,
      or meta-testing's).
    settings: run-time settings that replace :data:`RECOMMENDED`'s (any of its fields;
      e.g. one of :data:`PRESETS`, another shipped family's).
    quantile: in ``[0, 1]``; the quantile over the tasks of each level's peak. ``1``:
      the optimiser takes exactly frozen MetaMD's steps on every calibration task, and
      adapts only to gradients beyond anything seen there.

  Returns:
    The record: ``{'reference_norm', 'eigenbasis_levels', **settings, 'num_steps',
    'quantile', 'num_calibration_tasks', 'divergence_digest'}``; an infinite level (a leaf
    or direction whose gradient is zero on every calibration task) is ``inf``.

  Raises:
    ValueError: before any run, naming an unknown setting, a computed field passed as a
      setting, a setting outside its range, a bad ``num_steps`` or ``quantile``, a
      divergence with a non-finite factor or that does not fit the family's parameters,
      or ``task_params`` that are not stacked tasks (:meth:`TaskFamily.count_tasks`);
      after the runs, the building blocks' errors for settings that do not fit together (e.g.
      ``eigenbasis`` without ``per_leaf``).
    CalibrationError: (a ``ValueError``) if the frozen divergence does not train a
      calibration task (the run diverges, or ends at or above its initial loss on the
      task's first batch), or every calibration gradient is zero: there are no levels.
  """
  settings = {} if settings is None else settings
  if not isinstance(settings, Mapping):
    raise TypeError(f'settings is a mapping of RECOMMENDED\'s fields, got '
                    f'{type(settings).__name__}.')
  computed = sorted(set(settings) & set(_COMPUTED))
  if computed:
    raise ValueError(f'{computed} are computed by calibrate, not settings.')
  unknown = sorted(set(settings) - set(RECOMMENDED))
  if unknown:
    raise ValueError(f'unknown settings {unknown}; the settings are {sorted(RECOMMENDED)}.')
  if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not (
      0 <= quantile <= 1):
    raise ValueError(f'quantile must be a number in [0, 1], got {quantile!r}.')
  if isinstance(num_steps, np.integer):
    num_steps = int(num_steps)
  record = {**RECOMMENDED, **settings}
  if not record['eigenbasis']:
    record['lengthen_below'] = None  # used with the eigenbasis scales only
  record['num_steps'] = num_steps
  _check_settings(record)
  adaptive.check_decay(record['decay'])
  divergence_lib.check_divergence(divergence)
  divergence_lib.check_structure(divergence, family.param_shapes())
  num_tasks = family.count_tasks(task_params)
  try:
    reference = adaptive.reference_gradient_norm(
        divergence, family, task_params, num_steps, quantile=quantile, decay=record['decay'],
        per_leaf=record['per_leaf'], require_training=True)
    levels = None
    if record['eigenbasis']:
      levels = [[np.asarray(x).tolist() for x in leaf] for leaf in eigenbasis.eigenbasis_levels(
          divergence, family, task_params, num_steps, quantile=quantile,
          decay=record['decay'], rank=record['eigenbasis_rank'] or None)]
  except ValueError as error:  # the arguments were checked above: the runs themselves
    raise CalibrationError(str(error)) from error
  record = {'reference_norm': reference, 'eigenbasis_levels': levels, **record,
            'quantile': quantile, 'num_calibration_tasks': num_tasks,
            'divergence_digest': divergence_digest(divergence)}
  calibrated_metamd(divergence, record)  # the settings fit together
  return record


def _as_json(value: Any) -> Any:
  """``value`` as standard JSON data: tuples and arrays as lists, numpy scalars as Python
  numbers, an infinite float as ``None`` (JSON has no infinity)."""
  if isinstance(value, Mapping):
    return {str(k): _as_json(v) for k, v in value.items()}
  if isinstance(value, jax.Array):
    value = np.asarray(value)
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_as_json(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and math.isinf(value):
    return None
  return value


def save_calibration(path: PathLike, calibration: Mapping[str, Any]) -> pathlib.Path:
  """Write a calibration record (e.g. :func:`calibrate`'s) as JSON, with every setting.

  The file has a ``results.json``'s layout (``{'adaptive': record}``), so
  :func:`load_calibration` reads it, and :func:`load_optimizer` reads a workdir's
  ``calibration.json`` (:data:`CALIBRATION_FILE`) next to its ``divergence.npz``. An
  infinite level is written as ``null``. The file is replaced whole (written aside, then
  renamed).

  Returns:
    The path written.

  Raises:
    ValueError: from :func:`check_calibration` (a level that is NaN, zero or negative among
      them), or if ``path`` is a directory.
  """
  record = check_calibration(calibration)
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f'{path} is a directory: name the file, e.g. {path / CALIBRATION_FILE}.')
  text = json.dumps({'adaptive': _as_json(record)}, indent=1, allow_nan=False)
  path.parent.mkdir(parents=True, exist_ok=True)
  aside = path.with_name(f'.{path.name}.writing')
  aside.write_text(text)
  os.replace(aside, path)
  return path


def load_calibration(path: PathLike, family: str | None = None) -> dict:
  """The calibration record in a ``results.json`` or a saved calibration.

  Args:
    path: a main job's ``results.json`` (its ``'adaptive'`` entry), a benchmark's with
      ``family`` (``results['families'][family]['adaptive']``), or a file
      :func:`save_calibration` wrote.
    family: the benchmark family's name; ``None`` for a main job's results.

  Raises:
    FileNotFoundError: if ``path`` is not a file.
    ValueError: naming ``path`` when it is not JSON, has no such family (naming those it
      has) or no calibration (adaptive MetaMD off or left out in that run), or from
      :func:`check_calibration`.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise FileNotFoundError(f'{path} is a directory: pass its results.json or '
                            f'{CALIBRATION_FILE} (load_optimizer takes a workdir).')
  if not path.is_file():
    raise FileNotFoundError(f'no results file at {path}.')
  try:
    results = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{path} is not a JSON results file ({error}).') from error
  if not isinstance(results, Mapping):
    raise ValueError(f'{path} holds no results object.')
  if family is not None:
    families = results.get('families')
    if not isinstance(families, Mapping) or family not in families:
      have = sorted(families) if isinstance(families, Mapping) else []
      raise ValueError(f'{path} has no family {family!r} (it has {have}).')
    results = families[family]
  elif 'families' in results and 'adaptive' not in results:
    raise ValueError(f'{path} is a benchmark\'s results: name one of its families '
                     f'{sorted(results["families"])}.')
  calibration = results.get('adaptive')
  if calibration is None:
    raise ValueError(f'{path} has no calibration: adaptive MetaMD was off (eval.adaptive) '
                     'or left out in that run.')
  try:
    return check_calibration(calibration)
  except (TypeError, ValueError) as error:
    raise ValueError(f'{path}: {error}') from error


def load_optimizer(workdir: PathLike, family: str | None = None
                   ) -> optax.GradientTransformation:
  """The learned optimiser of a job's workdir, as its ``results.json`` reports it.

  Reads the divergence (:func:`metamd_jax.load_divergence`) and the calibration in
  ``workdir/results.json`` (:func:`load_calibration`), and builds
  :func:`calibrated_metamd`: the ``metamd_adaptive`` row of the job's tables. A workdir
  without ``results.json`` may hold ``calibration.json`` instead (:func:`save_calibration`).
  Its ``init`` checks that the parameters fit the divergence.

  Args:
    workdir: a main job's workdir (``divergence.npz``, ``results.json``), a benchmark's
      with ``family``, or one's own (``divergence.npz``, ``calibration.json``).
    family: a benchmark family's name: its calibration (``results['families'][family]``)
      and the divergence it was made for, that of the family's ``metamd`` variant
      (``workdir/<family>/metamd/divergence.npz``).

  Raises:
    FileNotFoundError: naming the missing file.
    ValueError: from :func:`load_calibration` and :func:`calibrated_metamd`, e.g. when the
      divergence was meta-trained again after the calibration (the digests differ), or
      when the workdir holds both ``results.json`` and ``calibration.json`` (two
      calibrations: load the one meant with :func:`load_calibration`).
  """
  workdir = pathlib.Path(workdir)
  stored = (workdir / 'divergence.npz' if family is None
            else workdir / family / 'metamd' / 'divergence.npz')
  divergence, _ = artifact.load_divergence(stored)
  results, own = workdir / 'results.json', workdir / CALIBRATION_FILE
  if family is None and results.is_file() and own.is_file():
    raise ValueError(f'{workdir} holds two calibrations, results.json and {CALIBRATION_FILE}: '
                     'pass the one meant to load_calibration and calibrated_metamd.')
  if family is None and not results.is_file() and own.is_file():
    results = own
  if not results.is_file():
    raise FileNotFoundError(f'no results.json in {workdir}: run the job\'s evaluation '
                            '(--mode evaluate) to calibrate the learned optimiser, or save a '
                            f'calibration there as {CALIBRATION_FILE} (save_calibration).')
  calibration = load_calibration(results, family)
  try:
    return calibrated_metamd(divergence, calibration)
  except ValueError as error:
    raise ValueError(f'{results}: {error}') from error


__all__ = ('CALIBRATION_FILE', 'DEFAULTS', 'DESCRIPTIVE', 'PRESETS', 'RECOMMENDED',
           'REQUIRED',
           'CalibrationError', 'calibrate', 'calibrated_metamd', 'check_calibration',
           'divergence_digest', 'guard', 'load_calibration', 'load_optimizer',
           'save_calibration')
