"""Benchmark (not a test): wall clock to Adam's T-step loss, from a finished benchmark run.

Re-times the benchmark's held-out comparison of one family on whatever device JAX runs on,
without tuning or meta-training again: the learned divergence comes from the benchmark's
artifact (``<workdir>/<family>/metamd/divergence.npz``), the baselines' learning rates and
adaptive MetaMD's calibration from its ``results.json``. Each optimiser trains the same
held-out tasks (:func:`metamd_jax.evaluation.held_out_tasks`) for ``T`` steps, the
whole-set loss tracked every step (:func:`metamd_jax.evaluation.run`), and is timed as the
benchmark times it (:func:`experiments.benchmark_runs.time_runs`: compiled once, then the
median of ``--repeats`` runs per task). Per optimiser: seconds for ``T`` steps, seconds per
step, steps and seconds to tuned Adam's final loss, that time as a fraction of Adam's
``T``-step time, final loss, and the steps the stored results give (a check that the runs
are the benchmark's: equal on the CPU the benchmark ran on, close on another backend,
whose float32 matrix products may round differently).

Usage (from the repository root)::

  python -m scripts.benchmark_wall_clock --workdir runs/benchmark_full \
      --results experiments/results/benchmark.json --family mnist_mlp --json out.json
  python -m scripts.benchmark_wall_clock ... --optimizers adam,metamd,metamd_adaptive
  python -m scripts.benchmark_wall_clock ... --optimizers metamd_adaptive \
      --set adaptive_blend_statistics=peak_average --set adaptive_blend_rate=0.003
  python -m scripts.benchmark_wall_clock ... --horizon-multiplier 10   # runs of 10 T steps
  python -m scripts.benchmark_wall_clock ... --run-lengths 1,2,4,8,16,32,100
  python -m scripts.benchmark_wall_clock ... --optimizers adam,metamd,metamd_rank_64 \
      --tasks validation

``--set FIELD=VALUE`` changes one ``eval.adaptive_*`` setting of adaptive MetaMD (its blend
and momentum; the calibrated reference norm is the stored one, which does not depend on
them), to time another adaptive variant on the same divergence; the figures record it.
The eigenbasis levels depend on ``adaptive_eigenbasis_rank``: it can only be set to the
stored calibration's rank (to re-time a run made under another default config).

``--horizon-multiplier m`` trains every optimiser for ``m T`` steps instead (the reference's
loss is then its ``m T``-step loss, at its meta-train-tuned learning rate; adaptive
MetaMD keeps its calibration over ``T``): the cost of a step over a longer run, where
refreshes and merges that follow the gradients' growth become rarer.

The seconds to Adam's loss are the steps to it times the mean seconds per step of the
``T``-step run: right for a step of constant cost. A step whose cost varies along the run
(Shampoo's roots refreshed at each of the first 10 steps, then on a schedule) costs more
early. ``--elapsed`` also times, per task, a run stopped at the step where that task
reaches Adam's loss (compiled per step count; the median of ``--repeats`` runs):
``elapsed_seconds_to_reference_final_loss`` and its fraction of Adam's ``T``-step time.

``metamd_low_rank`` times frozen MetaMD at the config's ``eval.frozen_rank`` and
``eval.frozen_rank_fill`` (as the benchmark runs it); ``metamd_rank_<r>`` and
``metamd_rank_<r>_<fill>`` (``fill`` one of
:data:`metamd_jax.low_rank.FILLS`, ``'min'`` when left out) time frozen MetaMD with each
dense factor longer than ``r`` at rank ``r`` plus a level (:func:`metamd_jax.low_rank_metamd`):
the learned divergence's cheaper step on a wide layer.

``--tasks validation`` runs the meta-train family's validation tasks
(:func:`metamd_jax.evaluation.tuning_tasks`, ``eval.num_validation_tasks`` of them, as
:mod:`experiments.choose_variant` does) instead of the held-out tasks: the figures a choice
(such as the rank above) is made on.

``--run-lengths 1,2,4,8,16,32`` also times, per optimiser, runs of each of these step counts
on every task (timed as the ``T``-step runs; the mean over the tasks of each task's median),
``run_length_seconds``: where a run's time goes along it. The time of a 1-step run is mostly
what every run pays once (the model's and the optimiser's ``init``, the run's minibatch
positions); the differences between lengths are the steps' own costs, e.g. a step that
refreshes roots at each of the first steps costing more than a later one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

# One OpenBLAS thread, as experiments/benchmark.py runs (set before numpy loads; a user's
# value wins): the CPU's eigendecompositions then round as they did in the benchmark.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import numpy as np  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import (  # noqa: E402
    benchmark_runs,
    benchmark_setup,
    builders,
    evaluate,
    protocol,
)
from experiments.benchmark_setup import ADAPTIVE, LOW_RANK  # noqa: E402
from metamd_jax import calibrated, evaluation, low_rank, overshoot  # noqa: E402
from scripts import timing  # noqa: E402
from scripts.benchmark_parallel import load_config  # noqa: E402

DEFAULT_OPTIMIZERS = ('metamd', ADAPTIVE, 'adam', 'sgd', 'muon', 'psgd_kron', 'shampoo')
# Recorded only since the guard's fast step could be low rank; a record without them was
# not made with the guard.
_UNRECORDED_BEFORE = ('frozen_rank', 'frozen_rank_fill')


def _fail(message: str):
  raise SystemExit(f'benchmark_wall_clock: {message}')


def _mean(pair) -> float | None:
  """The mean of a ``[mean, std]`` pair; ``None`` when absent or when no task reached it."""
  return None if pair is None or pair[0] is None else float(pair[0])


def stored_family(results_path: pathlib.Path, family: str) -> dict:
  """The family's entry of a benchmark ``results.json``; exits with a message if absent."""
  if not results_path.is_file():
    _fail(f'--results {results_path} is not a file (a benchmark results.json).')
  results = json.loads(results_path.read_text())
  families = results.get('families', {})
  if family not in families:
    _fail(f'{results_path} has no family {family!r} (it has {sorted(families)}).')
  return families[family]


_SETTABLE = ('adaptive_blend_rate', 'adaptive_blend_statistics', 'adaptive_momentum',
             'adaptive_online_power', 'adaptive_blend_max_dimension',
             'adaptive_blend_block_size', 'adaptive_blend_sketch_rank', 'adaptive_overshoot',
             'adaptive_overshoot_decay',
             'adaptive_refresh_growth', 'adaptive_overshoot_cap',
             'adaptive_overshoot_scope', 'adaptive_restarts',
             'adaptive_restart_growth', 'adaptive_restart_shrink',
             'adaptive_restart_momentum', 'adaptive_restart_step_factor',
             'adaptive_eigenbasis_rank', 'adaptive_blend_sketch_interval',
             'adaptive_guard_margin', 'adaptive_guard_steps', 'adaptive_guard_progress',
             'adaptive_guard_prior')
_INTEGER_SETTINGS = ('adaptive_blend_max_dimension', 'adaptive_blend_block_size',
                     'adaptive_blend_sketch_rank', 'adaptive_eigenbasis_rank',
                     'adaptive_blend_sketch_interval', 'adaptive_guard_steps')
_BOOLEANS = {'true': True, 'false': False}


def parse_settings(pairs: list[str]) -> dict:
  """``['FIELD=VALUE', ...]`` of ``--set``: fields of :data:`_SETTABLE`, typed values."""
  settings = {}
  for pair in pairs:
    field, sep, value = pair.partition('=')
    if not sep or field not in _SETTABLE:
      _fail(f'--set takes FIELD=VALUE with FIELD one of {_SETTABLE}, got {pair!r}.')
    if field in ('adaptive_overshoot', 'adaptive_restarts', 'adaptive_guard_prior'):
      if value.lower() not in _BOOLEANS:
        _fail(f'--set {field} takes true or false, got {value!r}.')
      settings[field] = _BOOLEANS[value.lower()]
      continue
    if field == 'adaptive_overshoot_scope' and value not in overshoot.SCOPES:
      _fail(f'--set {field} takes one of {overshoot.SCOPES}, got {value!r}.')
    try:
      settings[field] = (value if field == 'adaptive_blend_statistics'
                         else value if field == 'adaptive_overshoot_scope'
                         else int(value) if field in _INTEGER_SETTINGS else float(value))
    except ValueError:
      _fail(f'--set {field} takes '
            + ('an integer' if field in _INTEGER_SETTINGS else 'a number') + f', got {value!r}.')
  return settings


_RANK_PREFIX = 'metamd_rank_'
TASKS = ('held_out', 'validation')


def low_rank_settings(name: str) -> tuple[int, str] | None:
  """``(rank, fill)`` of a ``metamd_rank_<r>[_<fill>]`` name, ``None`` for another name;
  exits naming a bad rank or fill."""
  if not name.startswith(_RANK_PREFIX):
    return None
  rank, _, fill = name[len(_RANK_PREFIX):].partition('_')
  if not rank.isdigit() or int(rank) < 1:
    _fail(f'{name!r}: the rank after {_RANK_PREFIX!r} must be an integer >= 1.')
  fill = fill or 'min'
  if fill not in low_rank.FILLS:
    _fail(f'{name!r}: the fill must be one of {low_rank.FILLS}.')
  return int(rank), fill


def build_optimizer(name: str, family_cfg, stored: dict, divergence, changed=()):
  """Optimiser ``name`` as the benchmark built it (stored learning rate or calibration);
  ``changed``: the ``eval`` fields set on purpose, not checked against the stored ones."""
  if name == 'metamd':
    return metamd_jax.metamd(divergence)
  if (settings := low_rank_settings(name)) is not None:
    return metamd_jax.low_rank_metamd(divergence, settings[0], fill=settings[1])
  if name == LOW_RANK:
    if (optimizer := evaluate.low_rank_optimizer(family_cfg, divergence)) is None:
      _fail(f'{LOW_RANK} needs the config\'s eval.frozen_rank (or name {_RANK_PREFIX}<r>).')
    return optimizer
  if name == ADAPTIVE:
    adaptive = stored.get('adaptive')
    configured = evaluate.settings(family_cfg)
    for recorded, field in builders.CALIBRATION_FIELDS.items():
      if (adaptive is None or field in changed
          or (recorded in _UNRECORDED_BEFORE and recorded not in adaptive)):
        continue
      if adaptive.get(recorded, calibrated.DEFAULTS.get(recorded)) != configured[recorded]:
        _fail(f'the stored calibration has {recorded}={adaptive.get(recorded)!r} but the '
              f'config has eval.{field}={configured[recorded]!r}: rerun the benchmark '
              'or pass the config it ran with.')
    optimizer = evaluate.adaptive_optimizer(family_cfg, divergence, adaptive)
    if optimizer is None:
      _fail(f'the stored results have no calibration for {ADAPTIVE}.')
    return optimizer
  if name in builders.BASELINES:
    rate = stored['optimizers'].get(name, {}).get('learning_rate')
    if rate is None:
      _fail(f'the stored results have no tuned learning rate for {name!r}.')
    return builders.BASELINES[name](rate)
  raise ValueError(f'unknown optimiser {name!r}')


def measure_one(optimizer, family, tasks, horizon: int, repeats: int
                ) -> tuple[evaluation.Curves, np.ndarray, float]:
  """The tracked runs, the timed seconds per task and the first (compiling) call's time."""
  started = time.perf_counter()
  run = evaluation.run(optimizer, family, tasks, horizon, track_every=1)
  first = time.perf_counter() - started  # compile and one run of all tasks
  return run, benchmark_runs.time_runs(optimizer, family, tasks, horizon, repeats), first


def row(run: evaluation.Curves, seconds: np.ndarray, first: float, horizon: int,
        target: np.ndarray, reference_seconds: float, reference: str, stored: dict,
        elapsed: np.ndarray | None = None) -> dict:
  """One optimiser's figures against the reference's final loss and ``T``-step time;
  ``elapsed``: per task, the timed seconds of a run stopped where it reaches the loss
  (:func:`experiments.benchmark_runs.elapsed_to`)."""
  per_step = seconds / horizon
  reached = protocol.reach(run, target, per_step)
  mean_seconds = _mean(reached['seconds'])
  extra = {}
  if elapsed is not None:  # reached_fraction is the steps' (the same tasks)
    extra = {k: v for k, v in benchmark_runs.elapsed_summary(elapsed, reference_seconds).items()
             if k != 'reached_fraction'}
  return {
      'seconds_for_T_steps': float(np.mean(seconds)),
      'seconds_per_step': float(np.mean(per_step)),
      'first_run_seconds': first,
      'steps_to_reference_final_loss': reached['steps'],
      'seconds_to_reference_final_loss': reached['seconds'],
      'fraction_of_reference_T_seconds': (None if mean_seconds is None
                                          else mean_seconds / reference_seconds),
      'reached_fraction': reached['reached_fraction'],
      'final_train_loss': float(np.mean(evaluation.final_train_loss(run.train_losses))),
      'stored_steps_to_reference_final_loss': stored.get(f'steps_to_{reference}_final_loss'),
      'stored_seconds_for_T_steps': _mean(stored.get('wall_clock_seconds')),
      **extra,
  }


def check_run_lengths(run_lengths) -> tuple[int, ...]:
  """``run_lengths``: step counts ``>= 1`` (``--run-lengths``), each once; exits naming a
  bad one."""
  lengths = tuple(run_lengths or ())
  for length in lengths:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
      _fail(f'--run-lengths takes step counts >= 1, got {length!r}.')
  if len(set(lengths)) != len(lengths):
    _fail(f'--run-lengths names a step count twice: {lengths}.')
  return tuple(int(length) for length in lengths)


def run_length_seconds(optimizer, family, tasks, lengths: tuple[int, ...], repeats: int
                       ) -> dict[str, float]:
  """``{str(n): seconds}``: per step count ``n``, the mean over the tasks of the timed
  seconds of an ``n``-step run (:func:`experiments.benchmark_runs.time_runs`)."""
  return {str(n): float(np.mean(benchmark_runs.time_runs(optimizer, family, tasks, n, repeats)))
          for n in lengths}


def format_run_lengths(rows: dict) -> str:
  """The ``run_length_seconds`` of every row that has them, in ms per run."""
  timed = {name: row['run_length_seconds'] for name, row in rows.items()
           if 'run_length_seconds' in row}
  if not timed:
    return ''
  lengths = list(next(iter(timed.values())))
  lines = ['ms per run of n steps (mean over the tasks):', '',
           '| optimiser | ' + ' | '.join(f'n = {n}' for n in lengths) + ' |',
           '| --- |' + ' ---: |' * len(lengths)]
  for name, seconds in timed.items():
    lines.append(f'| {name} | ' + ' | '.join(f'{1e3 * seconds[n]:.2f}' for n in lengths) + ' |')
  return '\n'.join(lines)


def format_table(rows: dict, reference: str, horizon: int) -> str:
  def pair(value, digits):
    return 'not reached' if value is None or _mean(value) is None else f'{value[0]:.{digits}f}'

  def ratio(fraction):
    return '-' if fraction is None else f'{fraction:.2f}'

  elapsed = any('elapsed_seconds_to_reference_final_loss' in row for row in rows.values())
  lines = [f'| optimiser | s for T={horizon} steps | ms per step | steps to {reference} '
           f'final loss (stored) | s to it | x {reference} T-step s | final loss |'
           + (' elapsed s to it | elapsed x T-step s |' if elapsed else ''),
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: |'
           + (' ---: | ---: |' if elapsed else '')]
  for name, row in rows.items():
    stored = row['stored_steps_to_reference_final_loss']
    line = (
        f"| {name} | {row['seconds_for_T_steps']:.4f} | {1e3 * row['seconds_per_step']:.3f} | "
        f"{pair(row['steps_to_reference_final_loss'], 1)} "
        f"({'-' if stored is None else pair(stored, 1)}; "
        f"{row['reached_fraction']:.0%} reached) | "
        f"{pair(row['seconds_to_reference_final_loss'], 4)} | "
        f"{ratio(row['fraction_of_reference_T_seconds'])} | {row['final_train_loss']:.4f} |")
    if elapsed:
      line += (f" {pair(row.get('elapsed_seconds_to_reference_final_loss'), 4)} | "
               f"{ratio(row.get('elapsed_fraction_of_reference_T_seconds'))} |")
    lines.append(line)
  return '\n'.join(lines)


def wall_clock(config, family: str, workdir, results, optimizers=DEFAULT_OPTIMIZERS, *,
               repeats: int = 3, num_tasks: int | None = None, settings: dict | None = None,
               json_path=None, elapsed: bool = False, horizon_multiplier: int = 1,
               run_lengths=(), tasks: str = 'held_out') -> dict:
  """Re-time the held-out runs of ``family`` from a finished benchmark (module docstring).

  Args:
    config: the benchmark config the run used (``configs/benchmark.py``'s ``get_config()``).
    family: a family of ``config.families``.
    workdir: the benchmark's workdir (``<workdir>/<family>/metamd/divergence.npz``).
    results: its ``results.json``.
    optimizers: names: ``metamd``, ``metamd_low_rank``, ``metamd_rank_<r>[_<fill>]``,
      ``metamd_adaptive`` or baselines; the reference (``config.reference``) always runs,
      first.
    repeats: timed runs per task.
    num_tasks: tasks (default: the config's ``eval.num_tasks`` held-out tasks or
      ``eval.num_validation_tasks`` validation tasks).
    settings: ``eval.adaptive_*`` fields changed for adaptive MetaMD (``--set``).
    json_path: also write the figures there, after every optimiser.
    elapsed: also time, per task, a run stopped where it reaches the reference's loss
      (:func:`experiments.benchmark_runs.elapsed_to`).
    horizon_multiplier: ``m >= 1``: runs of ``m T`` steps, against the reference's
      ``m T``-step loss (the stored steps, which are for ``T``, are then not compared).
    run_lengths: step counts ``n >= 1``: also time runs of each (``run_length_seconds``,
      :func:`run_length_seconds`).
    tasks: ``'held_out'`` (the benchmark's) or ``'validation'`` (the meta-train family's
      validation tasks, where choices are made).

  Returns:
    ``{'family', 'horizon', 'num_tasks', 'reference', 'repeats', 'settings', 'device',
    'environment', 'optimizers': {name: row}, 'errors': {name: message}}`` with the rows of
    :func:`row`; an optimiser that fails to build or run (other than the reference) is
    recorded in ``errors``.
  """
  for name in optimizers:
    if name not in ('metamd', ADAPTIVE, LOW_RANK, *builders.BASELINES) and \
        low_rank_settings(name) is None:
      _fail(f'--optimizers names {name!r}: neither metamd, {ADAPTIVE} nor a baseline '
            f'({", ".join(builders.BASELINES)}), nor {LOW_RANK} or {_RANK_PREFIX}<r>[_<fill>].')
  if tasks not in TASKS:
    _fail(f'--tasks must be one of {TASKS}, got {tasks!r}.')
  settings = dict(settings or {})
  run_lengths = check_run_lengths(run_lengths)
  family_cfg = benchmark_setup.family_config(config, family)
  stored = stored_family(pathlib.Path(results), family)
  family_cfg.eval.update(settings)
  builders.validate_config(family_cfg)
  reference = config.reference
  path = pathlib.Path(workdir) / family / 'metamd' / 'divergence.npz'
  if not path.is_file():
    _fail(f'no learned divergence at {path} (run the benchmark with --workdir '
          f'{workdir} first).')
  divergence, _ = metamd_jax.load_divergence(path)

  train_family, test_family = builders.build_families(family_cfg)
  metamd_jax.artifact.check_compatible(divergence, test_family.param_shapes())
  if tasks == 'validation':  # the meta-train family's, as experiments.choose_variant
    test_family = train_family
    num_tasks = num_tasks or builders.num_validation_tasks(family_cfg.eval)
    task_batch = evaluation.tuning_tasks(train_family, family_cfg.seed, num_tasks)
  else:
    num_tasks = num_tasks or family_cfg.eval.num_tasks
    task_batch = evaluation.held_out_tasks(test_family, family_cfg.seed, num_tasks)
  if isinstance(horizon_multiplier, bool) or not isinstance(horizon_multiplier, int) \
      or horizon_multiplier < 1:
    _fail(f'--horizon-multiplier must be an int >= 1, got {horizon_multiplier!r}.')
  horizon = family_cfg.meta.horizon * horizon_multiplier
  env = timing.environment()
  print(timing.describe_environment(env))
  print(f"family {family}, {num_tasks} {tasks.replace('_', '-')} tasks, T = {horizon}, "
        f'{repeats} timed runs per task', flush=True)
  payload = {'family': family, 'horizon': horizon, 'horizon_multiplier': horizon_multiplier,
             'num_tasks': num_tasks, 'tasks': tasks,
             'reference': reference, 'repeats': repeats, 'settings': settings,
             'device': str(jax.devices()[0]), 'environment': env, 'optimizers': {},
             'errors': {}}
  target = reference_seconds = None
  for name in dict.fromkeys([reference, *optimizers]):  # the reference first
    try:
      optimizer = build_optimizer(name, family_cfg, stored, divergence, tuple(settings))
      run, seconds, first = measure_one(optimizer, test_family, task_batch, horizon, repeats)
    except Exception as error:  # noqa: BLE001 - an optional baseline's library can fail here
      if name == reference:
        raise
      payload['errors'][name] = f'{type(error).__name__}: {error}'
      print(f'{name}: failed ({payload["errors"][name]})', flush=True)
      continue
    if name == reference:
      target = evaluation.final_train_loss(run.train_losses)
      reference_seconds = float(np.mean(seconds))
    stopped = None
    if elapsed:
      stopped = benchmark_runs.elapsed_to(optimizer, test_family, task_batch, run, target,
                                          repeats)
    payload['optimizers'][name] = row(run, seconds, first, horizon, target, reference_seconds,
                                      reference, stored['optimizers'].get(name, {})
                                      if horizon_multiplier == 1 and tasks == 'held_out'
                                      else {}, stopped)
    if run_lengths:
      payload['optimizers'][name]['run_length_seconds'] = run_length_seconds(
          optimizer, test_family, task_batch, run_lengths, repeats)
    print(f'{name}: {np.mean(seconds):.4f} s for {horizon} steps (first call {first:.1f} s)',
          flush=True)
    if json_path:  # after every optimiser, so a run stopped early keeps what it measured
      pathlib.Path(json_path).write_text(json.dumps(payload, indent=2, default=str))
  print(format_table(payload['optimizers'], reference, horizon))
  if run_lengths:
    print(format_run_lengths(payload['optimizers']))
  if json_path:
    timing.write_json(json_path, payload)
  return payload


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/benchmark.py')
  parser.add_argument('--family', default='mnist_mlp')
  parser.add_argument('--workdir', default='runs/benchmark_full',
                      help='the benchmark workdir holding <family>/metamd/divergence.npz')
  parser.add_argument('--results', default='experiments/results/benchmark.json')
  parser.add_argument('--optimizers', default=','.join(DEFAULT_OPTIMIZERS))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--num-tasks', type=int, default=None,
                      help="tasks (default: the benchmark config's)")
  parser.add_argument('--tasks', default='held_out', choices=TASKS,
                      help='the held-out tasks (default) or the validation tasks')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help=f'change one adaptive setting, one of {", ".join(_SETTABLE)}')
  parser.add_argument('--json', default=None, help='also write the figures here')
  parser.add_argument('--elapsed', action='store_true',
                      help="also time runs stopped where each task reaches the reference's "
                      'loss (one compilation per step count)')
  parser.add_argument('--horizon-multiplier', type=int, default=1,
                      help='runs of this many times the horizon T (default 1)')
  parser.add_argument('--run-lengths', default='',
                      help='also time runs of these step counts, e.g. 1,2,4,8,16,32')
  args = parser.parse_args(argv)
  try:
    run_lengths = [int(n) for n in args.run_lengths.split(',') if n.strip()]
  except ValueError:
    parser.error(f'--run-lengths takes step counts like 1,2,4, got {args.run_lengths!r}.')
  if args.horizon_multiplier < 1:
    parser.error(f'--horizon-multiplier must be >= 1, got {args.horizon_multiplier}.')
  if args.repeats < 1:
    parser.error(f'--repeats must be >= 1, got {args.repeats}.')
  if args.num_tasks is not None and args.num_tasks < 1:
    parser.error(f'--num-tasks must be >= 1, got {args.num_tasks}.')
  return wall_clock(load_config(args.config), args.family, args.workdir, args.results,
                    [n for n in args.optimizers.split(',') if n], repeats=args.repeats,
                    num_tasks=args.num_tasks, settings=parse_settings(args.set),
                    json_path=args.json, elapsed=args.elapsed,
                    horizon_multiplier=args.horizon_multiplier, run_lengths=run_lengths,
                    tasks=args.tasks)


if __name__ == '__main__':
  main()
