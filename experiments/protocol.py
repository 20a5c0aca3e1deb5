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
