"""Results as JSON and as markdown tables, for every experiment under ``experiments/``.

A statistic in a results file is a JSON-ready ``[mean, std]`` pair over the held-out
tasks (:func:`pair`: ``[null, null]`` when no task has a finite value); the tables format
those pairs. Plots are in :mod:`experiments.plots`; what the figures are and how they
are measured is in :mod:`experiments.protocol` and :mod:`metamd_jax.evaluation`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import ml_collections
import numpy as np
from jax.typing import ArrayLike

from metamd_jax import evaluation

# ---------------------------------------------------------------------------
# JSON.
# ---------------------------------------------------------------------------


def json_safe(value):
  """``value`` with numpy scalars as Python numbers and non-finite floats as ``None``.

  Dictionaries get string keys and tuples become lists, so that ``json.dumps`` writes
  standard JSON (no ``NaN`` or ``Infinity``).
  """
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def write_json(path: str | os.PathLike, value) -> None:
  """Write :func:`json_safe` of ``value`` to ``path``, indented."""
  pathlib.Path(path).write_text(json.dumps(json_safe(value), indent=1))


def write_result(workdir: str | os.PathLike, name: str, result: dict, table: str) -> None:
  """Write ``<name>.json`` (:func:`write_json`) and ``<name>.md`` (``table``) in
  ``workdir``, and print the table."""
  workdir = pathlib.Path(workdir)
  write_json(workdir / f'{name}.json', result)
  (workdir / f'{name}.md').write_text(table + '\n')
  print(table)


def pair(values: ArrayLike) -> list:
  """``[mean, std]`` over the finite entries, ``[None, None]`` when there are none.

  The JSON form of :func:`metamd_jax.evaluation.mean_std`.
  """
  return json_safe(list(evaluation.mean_std(values)))


def title(config: ml_collections.ConfigDict) -> str:
  """What an experiment config trains, for titles: ``'MLP on mnist'``, ``'least squares'``."""
  task = config.task
  if task.family == 'classification':
    return f'{task.model.upper()} on {task.dataset}'
  if task.family == 'language_model':
    return f'byte-level transformer on {task.text}'
  return task.family.replace('_', ' ')


# ---------------------------------------------------------------------------
# Cells of the tables.
# ---------------------------------------------------------------------------


def pair_text(value, spec: str = '.4g', std_spec: str | None = None) -> str:
  """``'mean ± std'`` of a :func:`pair` (``'n/a'`` if missing), each in a format spec."""
  if value is None or value[0] is None:
    return 'n/a'
  mean, std = value
  return f'{mean:{spec}} ± {std:{std_spec or spec}}'


def reach_text(value, reached: float, spec: str = '.1f') -> str:
  """A :func:`pair` of steps (or seconds) to a target, as text.

  With the fraction of tasks that reached it when not all did; ``'not reached'`` when none
  did.
  """
  if value is None or value[0] is None or reached == 0:
    return 'not reached'
  text = pair_text(value, spec)
  return text if reached == 1.0 else f'{text} ({reached:.0%} reached)'


def number_text(value) -> str:
  return 'n/a' if value is None else f'{value:.4g}'


def _learning_rate_text(learning_rate, reference_norm=None) -> str:
  if learning_rate is not None:
    return f'{learning_rate:g}'
  if reference_norm is None:
    return 'learned'
  if isinstance(reference_norm, (list, tuple)):  # one level per leaf
    finite = [c for c in reference_norm if c is not None and math.isfinite(c)]
    span = f'{min(finite):.3g} to {max(finite):.3g}' if finite else 'none finite'
    return f'learned (c per leaf: {span})'
  return f'learned (c = {reference_norm:.3g})'


# ---------------------------------------------------------------------------
# experiments.evaluate and experiments.selection.
# ---------------------------------------------------------------------------


def test_metric(entries: dict) -> tuple[str, str, str]:
  """``(key, column title, format)`` of the test metric of a table's entries.

  Test accuracy for classifiers, held-out bits per byte for language models.
  """
  if any('test_bits_per_byte' in e for e in entries.values()):
    return 'test_bits_per_byte', 'test bits per byte', '.3f'
  return 'test_accuracy', 'test accuracy', '.3f'


def format_evaluation(results: dict) -> str:
  """The table of :func:`experiments.evaluate.evaluate`'s results.

  Adaptive MetaMD's learning rate reads ``learned (c = <reference norm>)``. With timed
  steps (``eval.time_steps``) the seconds per step and the seconds to the reference's
  final loss join, and a line with the elapsed seconds (:func:`elapsed_lines`).
  """
  reference = results['reference']
  entries = results['optimizers']
  metric, metric_title, spec = test_metric(entries)
  timed = any('seconds_per_step' in e for e in entries.values())
  lines = [f'| optimiser | learning rate | steps to {reference} final loss | '
           + (f'seconds to {reference} final loss | ms per step | ' if timed else '')
           + f'final train loss | {metric_title} |',
           '| --- | --- | --- | ' + ('--- | --- | ' if timed else '') + '--- | --- |']
  for name, entry in entries.items():
    steps = reach_text(entry[f'steps_to_{reference}_final_loss'], entry['reached_fraction'])
    learning_rate = _learning_rate_text(entry['learning_rate'], entry.get('reference_norm'))
    timing = ''
    if timed:
      seconds = reach_text(entry.get(f'seconds_to_{reference}_final_loss'),
                           entry['reached_fraction'], '.2f')
      per_step = entry.get('seconds_per_step')
      timing = f"{seconds} | {'n/a' if per_step is None else f'{1e3 * per_step:.1f}'} | "
    lines.append(f"| {name} | {learning_rate} | {steps} | {timing}"
                 f"{pair_text(entry['final_train_loss'], '.4f')} | "
                 f"{pair_text(entry.get(metric), spec)} |")
  return '\n'.join(lines + elapsed_lines(entries, reference))


def format_long_horizon(results: dict, multiplier: int) -> str:
  """The table of ``results['long_horizon']``: training far beyond the horizon ``T``."""
  num_steps = results['num_steps']
  entries = results['long_horizon']
  metric, metric_title, spec = test_metric({n: {k.removesuffix('_at_long'): v
                                                for k, v in e.items()}
                                            for n, e in entries.items()})
  lines = [f'Beyond the horizon: {multiplier}T = {multiplier * num_steps} steps.', '',
           f'| optimiser | train loss at T | train loss at {multiplier}T | blew up or '
           f'diverged | {metric_title} at {multiplier}T |', '| --- | --- | --- | --- | --- |']
  for name, entry in entries.items():
    lines.append(f"| {name} | {pair_text(entry['loss_at_T'], '.4f')} | "
                 f"{pair_text(entry['loss_at_long'], '.4f')} | "
                 f"{entry['blew_up_fraction']:.0%} | "
                 f"{pair_text(entry.get(f'{metric}_at_long'), spec)} |")
  return '\n'.join(lines)


def shift_table(shifts: dict, optimizers: dict, label: str = 'shift') -> list[str]:
  """The rows of a table of shifts: header, separator and one row per (shift, optimiser).

  Runs that diverged or ended above their initial loss (of the held-out tasks), steps to
  the shift's reference's final training loss, final training loss and test metric.

  Args:
    shifts: ``{shift: evaluate_shift(...)-like result}``.
    optimizers: the in-distribution entries by name (for adaptive MetaMD's
      ``'reference_norm'``).
    label: the first column's title.
  """
  first = next(iter(shifts.values()))
  metric, metric_title, spec = test_metric(first['optimizers'])
  lines = [f'| {label} | optimiser | learning rate | diverged | ended above initial loss | '
           f"steps to {first['reference']} final loss | final train loss | {metric_title} |",
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for shift, result in shifts.items():
    reference = result['reference']
    for name, entry in result['optimizers'].items():
      key = f'steps_to_{reference}_final_loss'
      steps = (reach_text(entry[key], entry['reached_fraction']) if key in entry
               else 'n/a (no reference)')
      learning_rate = _learning_rate_text(entry['learning_rate'],
                                          optimizers.get(name, {}).get('reference_norm'))
      lines.append(f"| {shift} | {name} | {learning_rate} | "
                   f"{entry['diverged']}/{entry['num_runs']} | "
                   f"{entry['above_initial_loss']}/{entry['num_runs']} | {steps} | "
                   f"{pair_text(entry['final_train_loss'], '.4f')} | "
                   f"{pair_text(entry.get(metric), spec)} |")
  return lines


def format_shifts(results: dict) -> str:
  """The table of the everyday changes of :func:`experiments.evaluate.evaluate`.

  One row per (shift, optimiser): runs that diverged or ended above their initial loss
  (of the held-out tasks), steps to the re-tuned Adam's final training loss, final
  training loss and test accuracy (:func:`shift_table`).
  """
  first = next(iter(results['shifts'].values()))
  lines = ['Changes: the held-out tasks again, every optimiser as tuned or calibrated in '
           f"distribution; {first['reference']} (re-tuned on each change) is the reference.",
           '', *shift_table(results['shifts'], results['optimizers'])]
  seconds = ', '.join(f"{shift} {r['seconds']:.1f} s" for shift, r in results['shifts'].items())
  lines += ['', f'Seconds per change (one re-tuning, one run per optimiser): {seconds}.']
  return '\n'.join(lines)


def format_selection(result: dict) -> str:
  """The table of :func:`experiments.selection.compare`'s result (per-task lists)."""
  reference = result['reference']

  def stat(values):
    return pair_text(pair(values), '.4g', '.2g')

  lines = [f"{result['num_meta_steps']} meta-steps; best meta-step {result['best_meta_step']} "
           f"(score {number_text(result['best_score'])}, "
           f"last {number_text(result['last_score'])}); "
           f"{result['dropped_tasks']} inner runs dropped.", '',
           f'| divergence | train loss at T | steps to {reference} at T | train loss at 10T | '
           'test accuracy |', '| --- | --- | --- | --- | --- |']
  for name, row in result['optimizers'].items():
    reached = row['reached_fraction']
    steps = stat(row['steps_to_reference']) + ('' if reached == 1 else f' ({reached:.0%})')
    lines.append(f"| {name} | {stat(row['final_train_loss'])} | {steps} | "
                 f"{stat(row['final_train_loss_at_10T'])} | "
                 f"{stat(row.get('test_accuracy', []))} |")
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# experiments.benchmark.
# ---------------------------------------------------------------------------


def _meta_training_line(result: dict) -> str:
  def variant(name, m):
    kept = (f", kept meta-step {m['best_meta_step']}"
            if m.get('select') == 'best' and 'best_meta_step' in m else '')
    return (f"{name} ({m['structure']}, {m['objective']}): {m['num_meta_steps']} meta-steps, "
            f"{m['seconds_logged']:.0f} s{kept}")

  return (f"Meta-training (starting from SGD with lr {result['init_learning_rate']:g}, "
          f"{result['init_from']}): "
          + '; '.join(variant(v, m) for v, m in result['meta_training'].items()))


def _optimizer_rows(result: dict) -> list[str]:
  reference = result['reference']
  lines = ['', f'| optimiser | learning rate | steps to {reference} final loss | '
           f'seconds to {reference} final loss | seconds for T steps | final train loss | '
           'test accuracy |', '| --- | --- | --- | --- | --- | --- | --- |']
  for opt, e in result['optimizers'].items():
    reached = e.get('reached_fraction', 0.0)
    if e.get('test_accuracy'):
      metric = pair_text(e['test_accuracy'], '.3f')
    elif 'suboptimality' in e:
      metric = f"subopt {pair_text(e['suboptimality'], '.3g')}"
    else:
      metric = 'n/a'
    lines.append(
        f"| {opt} | {_learning_rate_text(e['learning_rate'], e.get('reference_norm'))} | "
        f"{reach_text(e.get(f'steps_to_{reference}_final_loss'), reached)} | "
        f"{reach_text(e.get(f'seconds_to_{reference}_final_loss'), reached, '.3f')} | "
        f"{pair_text(e['wall_clock_seconds'], '.3f')} | {pair_text(e['final_train_loss'])} | "
        f'{metric} |')
  return lines + elapsed_lines(result['optimizers'], reference)


def elapsed_lines(entries: dict, reference: str) -> list[str]:
  """A line under a table: each entry's elapsed seconds to the reference's final loss
  (:func:`experiments.benchmark_runs.elapsed_to`), where it has them."""
  key = f'elapsed_seconds_to_{reference}_final_loss'
  timed = {name: e[key] for name, e in entries.items() if key in e}
  if not timed:
    return []
  return ['', f"Seconds to {reference}'s final loss above: the steps times the mean seconds "
          'per step. Elapsed, timing per task a run stopped where it reaches that loss: '
          + '; '.join(f'{name} {pair_text(value, ".3f")}' for name, value in timed.items())
          + '.']


def _learned_vs_baselines_rows(result: dict) -> list[str]:
  rows = result['learned_vs_baselines'].get('metamd')
  if rows is None:
    return []
  lines = ['', 'metamd against each tuned baseline (steps and seconds metamd needs to reach '
           "the baseline's final training loss at T):", '',
           '| baseline | its final train loss | its steps | its seconds (T steps) | '
           'metamd steps | metamd seconds |', '| --- | --- | --- | --- | --- | --- |']
  for baseline, row in rows.items():
    lines.append(
        f"| {baseline} | {pair_text(row['baseline_final_train_loss'])} | "
        f"{pair_text(row['baseline_steps'], '.1f')} | "
        f"{pair_text(row['baseline_wall_clock_seconds'], '.3f')} | "
        f"{reach_text(row['steps'], row['reached_fraction'])} | "
        f"{reach_text(row['seconds'], row['reached_fraction'], '.3f')} |")
  return lines


def _beyond_horizon_rows(result: dict) -> list[str]:
  beyond = result['beyond_horizon']
  if not beyond:
    return []
  steps = next(iter(beyond.values()))['steps']
  lines = ['', f"Beyond the horizon ({steps} steps = {steps // result['horizon']} T):", '',
           '| optimiser | train loss at T | train loss at 10T | blew up | '
           'test accuracy at 10T |', '| --- | --- | --- | --- | --- |']
  for opt, e in beyond.items():
    lines.append(f"| {opt} | {pair_text(e['loss_at_T'])} | {pair_text(e['loss_at_long'])} | "
                 f"{e['blew_up_fraction']:.0%} of tasks | "
                 f"{pair_text(e.get('test_accuracy_at_long'), '.3f')} |")
  return lines


def _heldout_rows(result: dict) -> list[str]:
  heldout = result.get('heldout_dataset')
  if not heldout:
    return []
  reference = result['reference']
  generator = ', '.join(f'{k}={v}' for k, v in heldout['generator'].items())
  lines = ['', f"Held-out dataset {heldout['dataset']}"
           f"{f' ({generator})' if generator else ''}: {heldout['train']} / "
           f"{heldout['test']}, never seen in meta-training; baselines keep the learning "
           'rates tuned on the meta-train family:', '',
           f'| optimiser | steps to {reference} final loss | final train loss | '
           'test accuracy |', '| --- | --- | --- | --- |']
  for opt, e in heldout['optimizers'].items():
    reach = reach_text(e.get(f'steps_to_{reference}_final_loss'), e.get('reached_fraction', 0.0))
    lines.append(f"| {opt} | {reach} | {pair_text(e['final_train_loss'])} | "
                 f"{pair_text(e.get('test_accuracy'), '.3f')} |")
  return lines


def _convex_rows(result: dict) -> list[str]:
  convex = result.get('convex')
  if not convex:
    return []
  lines = ['', 'Convex guarantee (held-out tasks; the bound is the regret bound '
           'against the final iterate, step size folded into the divergence):', '',
           '| divergence | strong convexity (floor) | bound | linearised regret | '
           'suboptimality final | suboptimality avg iterate |',
           '| --- | --- | --- | --- | --- | --- |']
  for div, e in convex.items():
    lines.append(
        f"| {div} | {e['strong_convexity']:.4g} ({e['strong_convexity_floor']:.1g}) | "
        f"{pair_text(e['bound'])} | {pair_text(e['linearised_regret_vs_final'])} | "
        f"{pair_text(e['suboptimality_final'])} | "
        f"{pair_text(e['suboptimality_average_iterate'])} |")
  return lines


def _robustness_rows(result: dict) -> list[str]:
  """The robustness checks (:func:`shift_table`'s rows) and each learned optimiser's count."""
  robustness = result.get('robustness')
  if not robustness:
    return []
  first = next(iter(robustness.values()))
  lines = ['', 'Robustness: the held-out tasks under each check, every optimiser unchanged '
           '(learned divergence, learning rate tuned on the meta-train family, calibrated '
           f"reference norm); {first['reference']}, re-tuned on each check, is the "
           'reference.', '', *(f"- {c}: {r['description']}" for c, r in robustness.items()),
           '', *shift_table(robustness, result['optimizers'], label='check')]
  summary = result.get('robustness_summary') or {}
  if summary:
    lines.append('')
  for name, s in summary.items():
    trained, checks = s['baseline_trained'], s['checks']
    fraction = s['faster_fraction']
    diverged = f" ({', '.join(s['diverged_in'])})" if s['diverged_in'] else ''
    lines.append(
        f"- {name}: {s['diverged_runs']} diverged run{'' if s['diverged_runs'] == 1 else 's'}"
        f"{diverged} in the {len(trained)} of "
        f"{len(checks)} checks where {s['baseline']} (meta-train-tuned learning rate) "
        f"trained; reached {s['reference']}'s final loss in fewer steps on every task in "
        f"{len(s['faster'])}/{len(checks)} checks"
        f"{'' if fraction is None else f' ({fraction:.0%})'}"
        f"{': ' + ', '.join(s['faster']) if s['faster'] else ''}.")
  seconds = ', '.join(f"{c} {r['seconds']:.1f} s" for c, r in robustness.items())
  lines += ['', f'Seconds per check (re-tuning and the runs it adds): {seconds}.']
  return lines


def format_benchmark_family(name: str, result: dict) -> str:
  """The markdown tables of one family of :func:`experiments.benchmark.benchmark`.

  The optimisers (adaptive MetaMD's learning rate reads ``learned (c = <reference
  norm>)``), MetaMD against each baseline, beyond the horizon, the held-out dataset, the
  robustness checks (:func:`shift_table`'s rows and each learned optimiser's summary),
  the convex guarantee and the targets, each where the family has it.
  """
  lines = [f"## {name} (T = {result['horizon']}, {result['num_tasks']} held-out tasks)", '',
           _meta_training_line(result)]
  lines += _optimizer_rows(result)
  lines += _learned_vs_baselines_rows(result)
  lines += _beyond_horizon_rows(result)
  lines += _heldout_rows(result)
  lines += _robustness_rows(result)
  lines += _convex_rows(result)
  targets = result.get('targets')
  if targets:
    lines += ['', 'Targets (MetaMD unless named, mean over held-out tasks): ' + '; '.join(
        f"{key}: {'met' if t['met'] else 'MISSED'} "
        f"({number_text(t['value'])} vs {number_text(t['limit'])})"
        for key, t in targets.items())]
  return '\n'.join(lines)


def format_benchmark(results: dict) -> str:
  """The tables of every family of a benchmark's results."""
  return '\n\n'.join(format_benchmark_family(name, r) for name, r in results['families'].items())
