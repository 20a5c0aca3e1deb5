"""Meta-testing from a config: the learned divergence against tuned optax baselines.

The protocol (tasks, tuning, statistics) is :mod:`experiments.protocol`'s; the table and
JSON are :mod:`experiments.report`'s and the figure :mod:`experiments.plots`'. With
``eval.adaptive`` adaptive MetaMD (:func:`metamd_jax.adaptive_metamd`) is compared too,
and ``eval.shifts`` repeats the comparison under everyday changes of the tasks
(:func:`experiments.builders.shifted_family`).
"""

from __future__ import annotations

import math
import os
import pathlib
import time

import jax
import ml_collections
import optax
from absl import logging

import metamd_jax
from experiments import benchmark_runs, builders, plots, protocol, report
from experiments import meta_train as meta_train_exp
from metamd_jax import calibrated as calibrated_lib
from metamd_jax import evaluation, parallel
from metamd_jax.tasks.base import TaskFamily
from metamd_jax.types import PyTree


def settings(config: ml_collections.ConfigDict) -> dict:
  """The adaptive optimiser's run-time settings in ``config.eval``, as a calibration
  records them (:data:`experiments.builders.CALIBRATION_FIELDS`; an infinite float as
  ``None``, and ``lengthen_below`` only with the eigenbasis scales), with ``num_steps``:
  the horizon the levels are calibrated over and the restarts' first epoch."""
  ev = config.eval
  record = {name: as_recorded(ev.get(field, calibrated_lib.DEFAULTS.get(name)))
            for name, field in builders.CALIBRATION_FIELDS.items()}
  if not record['eigenbasis']:
    record['lengthen_below'] = None  # used with the eigenbasis scales only
  record['num_steps'] = ev.num_steps
  return record


def calibrate(config: ml_collections.ConfigDict, divergence: PyTree, family: TaskFamily,
              tune_tasks: PyTree) -> dict:
  """The adaptive optimiser's calibration, from the meta-train tuning tasks.

  :func:`metamd_jax.calibrate` of the frozen divergence on ``tune_tasks``
  (:func:`metamd_jax.evaluation.tuning_tasks` of the meta-train family: never the held-out
  tasks) over ``eval.num_steps`` steps, with the config's settings (:func:`settings`) and
  ``eval.adaptive_quantile``.

  Returns:
    The calibration record (:mod:`metamd_jax.calibrated`: what
    :func:`metamd_jax.calibrated_metamd` builds the optimiser from): ``{'reference_norm',
    'eigenbasis_levels', **settings(config), 'quantile', 'calibration_tasks',
    'num_calibration_tasks', 'divergence_digest'}``; ``reference_norm`` is one level, or one
    per parameter leaf with ``eval.adaptive_per_leaf``, and ``None`` (logged as a warning)
    when frozen MetaMD does not train a calibration task (it diverges or ends at or above
    its initial loss, :class:`metamd_jax.calibrated.CalibrationError`): adaptive MetaMD is
    then left out. With ``eval.adaptive_eigenbasis``, ``eigenbasis_levels`` are
    :func:`metamd_jax.eigenbasis.eigenbasis_levels` on the same tasks, at the rank
    ``eval.adaptive_eigenbasis_rank`` (0: none), as JSON-able lists (else ``None``).
  """
  ev = config.eval
  record = settings(config)
  try:
    calibration = calibrated_lib.calibrate(
        divergence, family, tune_tasks, record.pop('num_steps'), record,
        quantile=ev.adaptive_quantile)
  except calibrated_lib.CalibrationError as error:
    logging.warning('adaptive MetaMD left out: %s', error)
    calibration = {'reference_norm': None, 'eigenbasis_levels': None, **settings(config),
                   'quantile': ev.adaptive_quantile,
                   'num_calibration_tasks': ev.num_tune_tasks,
                   'divergence_digest': calibrated_lib.divergence_digest(divergence)}
  return {**calibration, 'calibration_tasks': 'meta-train tuning tasks'}


def as_recorded(value):
  """A setting as :func:`calibrate` records it: an infinite float as ``None`` (JSON has
  no infinity), anything else as it is."""
  return None if isinstance(value, float) and math.isinf(value) else value


def adaptive_optimizer(config: ml_collections.ConfigDict, divergence: PyTree,
                       adaptive: dict | None):
  """The adaptive optimiser with the levels of :func:`calibrate` and the run-time settings
  of ``config`` (:func:`settings`, which take precedence over those ``adaptive`` records:
  a candidate of :mod:`experiments.choose_variant` changes them on one calibration), built
  by :func:`metamd_jax.calibrated_metamd`: blended MetaMD
  (:func:`metamd_jax.blended_metamd`, its online half divided by the learned scale to the
  power ``eval.adaptive_online_power``; with Shampoo's statistics, sides over
  ``eval.adaptive_blend_max_dimension`` diagonal, over ``eval.adaptive_blend_block_size``
  blocked or past ``eval.adaptive_blend_sketch_rank`` sketched (merging a gradient every
  ``eval.adaptive_blend_sketch_interval`` steps), and their roots also
  refreshed after a growth of ``eval.adaptive_refresh_growth``;
  with ``eval.adaptive_overshoot``, the overshoot check at
  ``eval.adaptive_overshoot_decay``, its factor at most ``eval.adaptive_overshoot_cap``,
  shortening what ``eval.adaptive_overshoot_scope`` names)
  when ``eval.adaptive_blend_rate > 0`` or ``eval.adaptive_overshoot``, followed by
  Nesterov's momentum (:func:`metamd_jax.nesterov_momentum`) when
  ``eval.adaptive_momentum > 0``; with ``eval.adaptive_restarts``, the whole state started
  afresh after ``eval.num_steps`` (the horizon the levels were calibrated over), twice
  that, four times, ... (:func:`metamd_jax.doubling_restarts`: a run of ``eval.num_steps``
  steps is unchanged), and with ``eval.adaptive_restart_growth = a`` and
  ``eval.adaptive_restart_shrink = b`` each epoch's online half times ``L**a`` and learned
  half times ``L**-b``, for an epoch ``L`` times ``eval.num_steps`` long (1, 1, 2, 4, ...),
  and with ``eval.adaptive_restart_momentum`` the epochs longer than the horizon (``L >
  1``) taking that momentum and ``eval.adaptive_restart_step_factor``; the eigenbasis
  scales (``eval.adaptive_eigenbasis``) ranked at ``eval.adaptive_eigenbasis_rank`` when
  it is positive (the calibration's levels must have that rank), and, on the blended path
  with those scales, ``eval.adaptive_lengthen_below`` and ``eval.adaptive_min_scale``
  (a leaf whose first gradient is far below its level starts its scales below 1); behind
  the guard (:func:`metamd_jax.calibrated.guard`) with ``eval.adaptive_guard_margin``;
  ``None`` when calibration failed or is off."""
  if adaptive is None or adaptive['reference_norm'] is None:
    return None
  record = settings(config)
  if record['eigenbasis'] and adaptive.get('eigenbasis_levels') is None:
    raise ValueError('eval.adaptive_eigenbasis is set but the calibration has no '
                     'eigenbasis levels: calibrate with the same config.')
  rank = record['eigenbasis_rank'] or 0
  if record['eigenbasis'] and adaptive.get('eigenbasis_rank', 0) != rank:
    raise ValueError(f'eval.adaptive_eigenbasis_rank is {rank} but the calibration\'s '
                     f'levels have the rank {adaptive.get("eigenbasis_rank", 0)}: calibrate '
                     'with the same config.')
  return metamd_jax.calibrated_metamd(divergence, {**adaptive, **record})


def evaluate_shift(config: ml_collections.ConfigDict, shift: str,
                   families: tuple[TaskFamily, TaskFamily],
                   optimizers: dict[str, optax.GradientTransformation],
                   learning_rates: dict[str, float | None]) -> dict:
  """The held-out tasks under one change, every optimiser as it is.

  The reference baseline (``eval.reference``, Adam by default), re-tuned on the shifted
  tuning tasks over the same grid, is the shift's reference
  (:func:`experiments.protocol.against_retuned`, e.g. ``'adam_retuned'``); the other
  optimisers keep the learned divergence, the learning rates tuned on the meta-train
  family and the reference norm calibrated there.

  Args:
    config: the experiment config.
    shift: a name of :data:`experiments.builders.SHIFTS`.
    families: ``(meta_train_family, meta_test_family)``, unshifted.
    optimizers: the optimisers of the main comparison, by name.
    learning_rates: their learning rates (``None``: learned).

  Returns:
    ``{'description', 'reference', '<reference>_learning_rate', 'num_steps', 'seconds',
    'optimizers': {name: {'learning_rate', 'diverged', 'above_initial_loss', 'num_runs',
    'final_train_loss', 'steps_to_<reference>_final_loss', 'reached_fraction',
    <metrics>}}}`` with ``<reference>`` e.g. ``adam_retuned`` (no steps when every
    re-tuned learning rate diverged).
  """
  start = time.perf_counter()
  ev = config.eval
  meta_train_family, meta_test_family = families
  train_family = builders.shifted_family(config, meta_train_family, shift, 'meta_train')
  test_family = (train_family if meta_test_family is meta_train_family
                 else builders.shifted_family(config, meta_test_family, shift, 'meta_test'))
  tune_tasks = evaluation.tuning_tasks(train_family, config.seed, ev.num_tune_tasks)
  test_tasks = evaluation.held_out_tasks(test_family, config.seed, ev.num_tasks)
  curves = {name: evaluation.run(optimizer, test_family, test_tasks, ev.num_steps,
                                 track_every=ev.track_every)
            for name, optimizer in optimizers.items()}
  check, _ = protocol.against_retuned(ev, builders.SHIFTS[shift], (train_family, tune_tasks),
                                      (test_family, test_tasks), ev.num_steps,
                                      ev.track_every, curves, learning_rates)
  check['seconds'] = time.perf_counter() - start  # the runs too
  return check


def _seconds_per_step(optimizer: optax.GradientTransformation, family: TaskFamily,
                      tasks: PyTree, num_steps: int) -> float:
  """Seconds per training step on the first of ``tasks``: compiled once, then timed."""
  first = jax.tree.map(lambda x: x[:1], tasks)
  return float(benchmark_runs.time_runs(optimizer, family, first, num_steps, 1)[0]) / num_steps


def low_rank_optimizer(config: ml_collections.ConfigDict, divergence: PyTree
                       ) -> optax.GradientTransformation | None:
  """Frozen MetaMD at ``eval.frozen_rank`` with ``eval.frozen_rank_fill``
  (:func:`metamd_jax.low_rank_metamd`); ``None`` where the config leaves it off."""
  rank = config.eval.get('frozen_rank', None)
  if rank is None:
    return None
  return metamd_jax.low_rank_metamd(divergence, rank,
                                    fill=config.eval.get('frozen_rank_fill', 'min'))


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             divergence=None) -> dict:
  """Compare MetaMD with tuned baselines on held-out tasks; write table, plot, JSON.

  Baselines are tuned on meta-train tasks (:func:`metamd_jax.evaluation.tuning_tasks`);
  one whose every learning rate diverged is left out (with a warning). With
  ``eval.adaptive`` adaptive MetaMD (``'metamd_adaptive'``) joins, its reference norm
  calibrated on the same tuning tasks (:func:`calibrate`); with ``eval.frozen_rank``,
  frozen MetaMD at that rank (``'metamd_low_rank'``, :func:`metamd_jax.low_rank_metamd`:
  the cheaper step on a wide layer). Every optimiser then trains
  the held-out tasks (:func:`metamd_jax.evaluation.held_out_tasks`) for
  ``eval.num_steps`` steps. Each of ``eval.shifts`` that applies to the family
  (:func:`experiments.builders.applicable_shifts`: none for the convex families) repeats
  the held-out runs under that change (:func:`evaluate_shift`); with
  ``eval.horizon_multiplier > 1`` the learned optimisers and the reference also run that
  many times ``T`` (``'long_horizon'``), and those runs are the check ``'<m>T'`` among the
  shifts: the reference re-tuned for that many steps on the tuning tasks, steps to its
  final loss on each held-out task (:func:`experiments.protocol.beyond_horizon`, as the
  benchmark's check beyond the horizon).

  Args:
    config: the experiment config.
    workdir: where the artifact is read (if ``divergence`` is None) and outputs go:
      ``results.json``, ``results.md`` and ``loss_curves.png``.
    divergence: the learned divergence (default: ``workdir/divergence.npz``).

  Returns:
    The results dictionary written to ``results.json``: ``{'reference', 'num_steps',
    'num_tasks', 'optimizers': {name: {'learning_rate', 'final_train_loss',
    'steps_to_<reference>_final_loss', 'reached_fraction', 'final_minibatch_loss',
    <metrics>, 'mean_curve', 'std_curve', 'curve_every', 'seconds_per_step' and, for the
    learned optimisers and the reference, 'elapsed_seconds_to_<reference>_final_loss' (with
    ``eval.time_steps``: runs stopped where each task reaches that loss,
    :func:`experiments.benchmark_runs.elapsed_to`)}}, 'adaptive': calibrate(...) or None,
    'shifts': {shift: evaluate_shift(...)}, 'long_horizon': {name: ...}}``, statistics as
    ``[mean, std]`` over the held-out tasks (``None`` where no task has a finite value); the
    ``metamd_adaptive`` entry also has ``'reference_norm'``; ``'shifts'`` also has
    ``'<m>T'`` with ``eval.horizon_multiplier = m > 1``.
  """
  builders.validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  meta_train_family, meta_test_family = builders.build_families(config)
  divergence = meta_train_exp.learned_divergence(workdir, meta_test_family, divergence)

  ev = config.eval
  tune_tasks = evaluation.tuning_tasks(meta_train_family, config.seed, ev.num_tune_tasks)
  test_tasks = evaluation.held_out_tasks(meta_test_family, config.seed, ev.num_tasks)
  tuned, _ = protocol.tune_baselines(ev.baselines, ev, meta_train_family, tune_tasks,
                                     ev.num_steps)
  adaptive = (calibrate(config, divergence, meta_train_family, tune_tasks) if ev.adaptive
              else None)
  optimizers = {'metamd': metamd_jax.metamd(divergence)}
  if (adaptive_metamd := adaptive_optimizer(config, divergence, adaptive)) is not None:
    optimizers['metamd_adaptive'] = adaptive_metamd
  if (low_rank_metamd := low_rank_optimizer(config, divergence)) is not None:
    optimizers['metamd_low_rank'] = low_rank_metamd
  learning_rates = {name: None for name in optimizers}
  for name, lr in tuned.items():
    if lr is not None:
      learning_rates[name], optimizers[name] = lr, builders.BASELINES[name](lr)
  curves = {name: evaluation.run(optimizer, meta_test_family, test_tasks, ev.num_steps,
                                 track_every=ev.track_every)
            for name, optimizer in optimizers.items()}
  seconds_per_step = ({name: _seconds_per_step(optimizer, meta_test_family, test_tasks,
                                               ev.num_steps)
                       for name, optimizer in optimizers.items()} if ev.time_steps else {})

  reference = ev.reference if ev.reference in curves else next(iter(curves))
  # Training loss = the loss on each task's whole training set, tracked during the runs.
  target = evaluation.final_train_loss(curves[reference].train_losses)
  results = {'reference': reference, 'num_steps': ev.num_steps, 'num_tasks': ev.num_tasks,
             'optimizers': {}, 'adaptive': adaptive, 'shifts': {}, 'long_horizon': {}}
  for name, run in curves.items():
    entry = {'learning_rate': learning_rates[name],
             **protocol.summarize(run, target, reference, seconds_per_step.get(name)),
             'final_minibatch_loss': report.pair(evaluation.final_loss(run.losses, ev.window)),
             **protocol.curves_summary(run)}
    if name in seconds_per_step:
      entry['seconds_per_step'] = seconds_per_step[name]
    results['optimizers'][name] = entry
  if 'metamd_adaptive' in results['optimizers']:
    results['optimizers']['metamd_adaptive']['reference_norm'] = adaptive['reference_norm']
  if ev.time_steps:  # the learned optimisers and the reference, timed to the step
    for name in dict.fromkeys(['metamd', 'metamd_adaptive', 'metamd_low_rank', reference]):
      if name in curves:
        stopped = benchmark_runs.elapsed_to(optimizers[name], meta_test_family, test_tasks,
                                            curves[name], target, 1)
        results['optimizers'][name][f'elapsed_seconds_to_{reference}_final_loss'] = (
            report.pair(stopped))
  shifts = builders.applicable_shifts(meta_train_family, ev.shifts)
  if len(shifts) < len(ev.shifts):
    logging.info('eval.shifts %s skipped: they do not apply to this family.',
                 sorted(set(ev.shifts) - set(shifts)))
  for shift in shifts:
    results['shifts'][shift] = evaluate_shift(
        config, shift, (meta_train_family, meta_test_family), optimizers, learning_rates)
  if ev.horizon_multiplier > 1:  # the learned optimisers and the reference, far beyond T
    long_curves = {name: benchmark_runs.long_run(optimizers[name], meta_test_family, test_tasks,
                                                 ev.num_steps, ev.horizon_multiplier)
                   for name in dict.fromkeys([n for n in optimizers if n.startswith('metamd')]
                                             + [reference])}
    for name, runs in long_curves.items():
      results['long_horizon'][name] = benchmark_runs.long_run_summary(runs, ev.num_steps,
                                                                      blow_up_factor=1.0)
    # Also a check, as the benchmark's: the reference re-tuned for that many steps on the
    # tuning tasks, then steps to its final loss on each held-out task.
    results['shifts'][f'{ev.horizon_multiplier}T'], _ = protocol.beyond_horizon(
        ev, ev.horizon_multiplier, ev.num_steps, (meta_train_family, tune_tasks),
        (meta_test_family, test_tasks), long_curves, learning_rates)

  if not parallel.is_writer():  # every process evaluates; one writes
    return results
  table = report.format_evaluation(results)
  if results['shifts']:
    table += '\n\n' + report.format_shifts(results)
  if results['long_horizon']:
    table += '\n\n' + report.format_long_horizon(results, ev.horizon_multiplier)
  report.write_json(workdir / 'results.json', results)
  (workdir / 'results.md').write_text(table + '\n')
  print(table)
  if 'metamd_adaptive' in results['optimizers']:
    print(f"\nThe metamd_adaptive row's optimiser, for a training loop of your own: "
          f"metamd_jax.load_optimizer({str(workdir)!r})")
  plots.plot_evaluation(results, workdir / 'loss_curves.png', title=report.title(config))
  return results
