"""The meta-testing protocol the experiments share, from a config.

Every experiment (``evaluate``, ``selection``, ``benchmark``) compares optimisers the same
way:

1. tasks: :func:`metamd_jax.evaluation.tuning_tasks` from the meta-train family and
   :func:`metamd_jax.evaluation.held_out_tasks` from the meta-test family, with the
   config's seed;
2. baselines: each tuned on the tuning tasks over ``eval.learning_rates``, scored by the
   final loss on the whole training set (:func:`tune_baselines`);
3. runs: :func:`metamd_jax.evaluation.run`, the whole-training-set loss tracked;
4. statistics over the held-out tasks (:func:`summarize`, :func:`reach`,
   :func:`curves_summary`), JSON-ready ``[mean, std]`` pairs (:func:`report.pair`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging
from jax.typing import ArrayLike

from experiments import builders, kronecker_baselines, report
from metamd_jax import evaluation
from metamd_jax.tasks.base import TaskFamily
from metamd_jax.types import PyTree


def tune_baselines(names: Sequence[str], eval_config: ml_collections.ConfigDict,
                   family: TaskFamily, task_params: PyTree, num_steps: int
                   ) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]]:
  """Tune the learning rate of each named baseline (``builders.BASELINES``).

  Each grid is compiled once, its rates vmapped (mapped one after another for the
  baselines of ``kronecker_baselines.SEQUENTIAL_GRID``, which XLA cannot compile vmapped).

  Args:
    names: the baselines.
    eval_config: the config's ``eval`` section (``learning_rates``, ``window``).
    family: the meta-train family.
    task_params: the tuning tasks (:func:`metamd_jax.evaluation.tuning_tasks`).
    num_steps: the training steps of a tuning run.

  Returns:
    ``(learning_rates, scores)``: the best learning rate of each baseline (``None`` where
    every rate of the grid diverged, logged as a warning), and per baseline
    ``{'<lr>': mean final whole-set loss}`` (``None`` where it diverged).
  """
  learning_rates, scores = {}, {}
  for name in names:
    try:
      best, score = evaluation.tune_learning_rate(
          builders.BASELINES[name], eval_config.learning_rates, family, task_params,
          num_steps, eval_config.window, score='train_loss',
          sequential=name in kronecker_baselines.SEQUENTIAL_GRID)
    except evaluation.AllDivergedError as error:  # the baseline is left out of the comparison
      logging.warning('baseline %s: %s', name, error)
      best, score = None, {}
    learning_rates[name] = best
    scores[name] = {f'{lr:g}': (s if math.isfinite(s) else None) for lr, s in score.items()}
  return learning_rates, scores


def reach(curves: evaluation.Curves, target: ArrayLike,
          seconds_per_step: ArrayLike | None = None) -> dict:
  """How soon the runs of ``curves`` reach ``target`` (a loss per task).

  Returns:
    ``{'steps': pair, 'reached_fraction', 'steps_per_task': [steps or None, ...]}``, and
    ``'seconds'``: the pair of ``steps * seconds_per_step`` when that is given.
  """
  steps = evaluation.steps_to_loss(curves.train_losses, target, curves.every)
  result = {'steps': report.pair(steps)}
  if seconds_per_step is not None:
    result['seconds'] = report.pair(steps * np.asarray(seconds_per_step))
  result['reached_fraction'] = evaluation.reached_fraction(steps)
  result['steps_per_task'] = report.json_safe([float(s) for s in steps])
  return result


def summarize(curves: evaluation.Curves, target: ArrayLike | None = None,
              reference: str = '', seconds_per_step: ArrayLike | None = None) -> dict:
  """Statistics of one optimiser's runs on the held-out tasks, JSON-ready.

  Args:
    curves: the runs, with the whole-set training loss tracked.
    target: the loss per task to reach (the reference's final loss), or ``None``.
    reference: the reference's name, for the keys.
    seconds_per_step: per task, for seconds to the target (or ``None``).

  Returns:
    ``{'final_train_loss', 'steps_to_<reference>_final_loss',
    'seconds_to_<reference>_final_loss', 'reached_fraction', <metric>: ...}``: ``[mean,
    std]`` pairs, the steps and seconds only with a target (seconds only with
    ``seconds_per_step``), and every metric of ``task.evaluate`` on the final parameters.
  """
  entry = {'final_train_loss': report.pair(evaluation.final_train_loss(curves.train_losses))}
  if target is not None:
    reached = reach(curves, target, seconds_per_step)
    entry[f'steps_to_{reference}_final_loss'] = reached['steps']
    if 'seconds' in reached:
      entry[f'seconds_to_{reference}_final_loss'] = reached['seconds']
    entry['reached_fraction'] = reached['reached_fraction']
  for metric, values in curves.metrics.items():
    entry[metric] = report.pair(values)
  return entry


def curves_summary(curves: evaluation.Curves) -> dict:
  """The tracked whole-set loss, mean and std over tasks, JSON-ready.

  Returns:
    ``{'mean_curve', 'std_curve', 'curve_every'}``
    (:func:`metamd_jax.evaluation.curve_stats`; ``None`` where every task diverged).
  """
  mean, std = evaluation.curve_stats(curves.train_losses)
  return {'mean_curve': report.json_safe(mean.tolist()),
          'std_curve': report.json_safe(std.tolist()), 'curve_every': curves.every}


def outcomes(curves: evaluation.Curves) -> dict:
  """How many runs diverged (a non-finite whole-set loss) or ended above their start."""
  losses = np.asarray(curves.train_losses, np.float64)
  diverged = ~np.all(np.isfinite(losses), axis=-1)
  above = ~diverged & (losses[:, -1] > losses[:, 0])
  return {'diverged': int(diverged.sum()), 'above_initial_loss': int(above.sum()),
          'num_runs': int(losses.shape[0])}


def retuned_reference(reference: str) -> str:
  """The name of ``reference`` with its learning rate re-tuned under a change."""
  return f'{reference}_retuned'


def against_retuned(eval_config: ml_collections.ConfigDict, description: str,
                    tuning: tuple[TaskFamily, PyTree], testing: tuple[TaskFamily, PyTree],
                    num_steps: int, every: int, curves: dict[str, evaluation.Curves],
                    learning_rates: dict) -> tuple[dict, evaluation.Curves | None]:
  """Runs under a change, measured against the reference baseline re-tuned there.

  The reference (``eval_config.reference``) is re-tuned for ``num_steps`` steps on the
  ``tuning`` tasks (``(family, task_params)``) over ``eval_config.learning_rates`` and
  run on the ``testing`` tasks (its runs in ``curves`` reused when the rate did not
  change); every run of ``curves`` (``num_steps`` steps on those tasks, tracked every
  ``every`` steps) is then measured against the re-tuned reference's final loss
  (:func:`retuned_reference` names it, e.g. ``'adam_retuned'``).

  Returns:
    ``(check, runs)``: ``check`` is ``{'description', 'reference',
    '<reference>_learning_rate', 'num_steps', 'seconds' (the re-tuning and re-tuned runs),
    'optimizers': {name: {'learning_rate', 'diverged', 'above_initial_loss', 'num_runs',
    'final_train_loss', 'steps_to_<reference>_final_loss', 'reached_fraction',
    <metrics>}}}`` (no steps when every re-tuned learning rate diverged); ``runs`` the
    re-tuned reference's runs (``None`` then).
  """
  started = time.perf_counter()
  baseline = eval_config.reference
  reference = retuned_reference(baseline)
  tuned, _ = tune_baselines((baseline,), eval_config, *tuning, num_steps)
  retuned = tuned[baseline]
  curves, rates = dict(curves), dict(learning_rates)
  if retuned is not None:
    rates[reference] = retuned
    test_family, test_tasks = testing
    # The same rate as in distribution: the same runs (one compilation less).
    curves[reference] = (
        curves[baseline] if rates.get(baseline) == retuned and baseline in curves
        else evaluation.run(builders.BASELINES[baseline](retuned), test_family, test_tasks,
                            num_steps, track_every=every))
  target = (evaluation.final_train_loss(curves[reference].train_losses)
            if retuned is not None else None)
  entries = {name: {'learning_rate': rates[name], **outcomes(run),
                    **summarize(run, target, reference)}
             for name, run in curves.items()}
  check = {'description': description, 'reference': reference,
           f'{reference}_learning_rate': retuned, 'num_steps': num_steps,
           'seconds': time.perf_counter() - started, 'optimizers': entries}
  return check, curves.get(reference)


def beyond_horizon(eval_config: ml_collections.ConfigDict, multiplier: int, horizon: int,
                   tuning: tuple[TaskFamily, PyTree], testing: tuple[TaskFamily, PyTree],
                   curves: dict[str, evaluation.Curves],
                   learning_rates: dict) -> tuple[dict, evaluation.Curves | None]:
  """The check ``'<multiplier>T'``: runs of ``multiplier * horizon`` steps (``curves``,
  e.g. :func:`experiments.benchmark_runs.long_run`'s) against the reference re-tuned for
  that many steps (:func:`against_retuned`, whose ``(check, runs)`` it returns)."""
  steps = multiplier * horizon
  every = next(iter(curves.values())).every
  return against_retuned(
      eval_config, f'{multiplier} times the horizon ({steps} steps, the whole-set loss every '
      f'{every} steps; {eval_config.reference} re-tuned for {steps} steps)', tuning, testing,
      steps, every, curves, learning_rates)
