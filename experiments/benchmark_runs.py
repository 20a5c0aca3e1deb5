"""The benchmark's own runs, next to the shared protocol of :mod:`experiments.protocol`.

Meta-training the learned variants, timing, training beyond the horizon, the held-out
dataset and the convex guarantee; :mod:`experiments.benchmark` reuses the long and
held-out runs for its robustness checks. Every statistic is a ``[mean, std]`` pair over the
held-out tasks (:func:`experiments.report.pair`).
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.typing import ArrayLike

import metamd_jax
from experiments import benchmark_setup, protocol, report
from experiments import meta_train as meta_train_exp
from metamd_jax import evaluation, inner_loop
from metamd_jax.tasks import ClassificationFamily, LeastSquaresFamily
from metamd_jax.tasks.base import TaskFamily
from metamd_jax.types import PyTree


def meta_train_variants(config: ml_collections.ConfigDict,
                        family_cfg: ml_collections.ConfigDict, workdir: pathlib.Path,
                        progress: bool) -> tuple[dict, dict]:
  """Meta-train every learned variant in ``workdir / <variant>`` (a rerun resumes).

  Returns:
    ``(divergences, info)``: the kept divergence of each variant, and its meta-training
    summary (settings, seconds, first and last meta-loss, dropped tasks, back-offs and,
    once a selection score was finite, the kept meta-step and its score).
  """
  learned, info = {}, {}
  for name in config.variant_names:
    vconfig = benchmark_setup.variant_config(family_cfg, config.variants[name])
    started = time.perf_counter()
    fit = meta_train_exp.meta_train(vconfig, workdir / name, progress=progress)
    learned[name] = fit.divergence
    history, state = fit.history, fit.state
    info[name] = {
        'structure': vconfig.meta.structure,
        'objective': vconfig.meta.objective,
        'num_meta_steps': vconfig.meta.num_meta_steps,
        'horizon': vconfig.meta.horizon,
        'seconds_this_run': time.perf_counter() - started,
        'seconds_logged': float(sum(r['seconds'] for r in history)),
        'first_meta_loss': history[0]['meta_loss'] if history else None,
        'last_meta_loss': history[-1]['meta_loss'] if history else None,
        'select': vconfig.meta.select,
        'dropped_tasks': int(sum(r['dropped_tasks'] for r in history)),
        'backed_off': int(sum(r['backed_off'] for r in history)),
    }
    if int(state.best_step) > 0:
      # The divergence kept under select='best' is the one evaluated at this meta-step.
      info[name].update(best_meta_step=int(state.best_step),
                        best_score=float(state.best_score), last_score=float(state.score))
  return learned, info


def _task(task_params: PyTree, index: int) -> PyTree:
  return jax.tree.map(lambda x: x[index], task_params)


def time_runs(optimizer: optax.GradientTransformation, family: TaskFamily,
              task_params: PyTree, num_steps: int, repeats: int) -> np.ndarray:
  """Seconds per task of a ``num_steps``-step training run (:func:`evaluation.train`).

  Each task runs on its own, compiled once (a warm-up call); the median over ``repeats``
  timed runs (``block_until_ready``) is kept. Nothing but training is timed.
  """
  train = jax.jit(lambda tp: evaluation.train(optimizer, family.task(tp), num_steps))
  num_tasks = jax.tree.leaves(task_params)[0].shape[0]
  jax.block_until_ready(train(_task(task_params, 0)))  # compile once
  seconds = []
  for index in range(num_tasks):
    tp = _task(task_params, index)
    times = []
    for _ in range(repeats):
      started = time.perf_counter()
      jax.block_until_ready(train(tp))
      times.append(time.perf_counter() - started)
    seconds.append(float(np.median(times)))
  return np.asarray(seconds)


def elapsed_to(optimizer: optax.GradientTransformation, family: TaskFamily,
               task_params: PyTree, curves: evaluation.Curves, target: ArrayLike,
               repeats: int) -> np.ndarray:
  """Per task, the seconds of a run stopped at the step where ``curves`` first reach
  ``target`` (a loss per task), timed as :func:`time_runs` times (compiled per step
  count); ``nan`` where never reached, 0 for 0 steps.

  The steps to a loss times the mean seconds per step of a ``T``-step run is right for a
  step of constant cost; this measures a step whose cost varies along the run (roots
  refreshed at every early step) or a fixed cost per run (factors inverted at ``init``).
  """
  steps = evaluation.steps_to_loss(curves.train_losses, target, curves.every)
  seconds = np.full(steps.shape, np.nan)
  for index, count in enumerate(steps):
    if np.isfinite(count):
      one = jax.tree.map(lambda x, i=index: x[i:i + 1], task_params)
      seconds[index] = (float(time_runs(optimizer, family, one, int(count), repeats)[0])
                        if count > 0 else 0.0)
  return seconds


def elapsed_summary(elapsed: np.ndarray, reference_seconds: float) -> dict:
  """The figures of :func:`elapsed_to`'s per-task seconds against the reference's ``T``-step
  seconds: ``{'elapsed_seconds_to_reference_final_loss': [mean, std],
  'elapsed_seconds_per_task', 'reached_fraction', 'elapsed_fraction_of_reference_T_seconds'}``
  (the mean and the fraction over the tasks that reach the loss; ``None`` where none does).
  """
  pair = report.pair(elapsed)
  return {'elapsed_seconds_to_reference_final_loss': pair,
          'elapsed_seconds_per_task': report.json_safe([float(s) for s in elapsed]),
          'reached_fraction': float(np.mean(np.isfinite(elapsed))),
          'elapsed_fraction_of_reference_T_seconds': (
              None if pair[0] is None else pair[0] / reference_seconds)}


def long_run(optimizer: optax.GradientTransformation, family: TaskFamily,
             task_params: PyTree, horizon: int, multiplier: int) -> evaluation.Curves:
  """Train for ``multiplier * horizon`` steps, the whole-set loss tracked.

  Every ``multiplier`` steps (every step if that does not divide the horizon), so that
  the loss at ``T`` is among the records.
  """
  every = multiplier if horizon % multiplier == 0 else 1
  return evaluation.run(optimizer, family, task_params, multiplier * horizon,
                        track_every=every)


def long_run_summary(curves: evaluation.Curves, horizon: int, blow_up_factor: float) -> dict:
  """The loss at ``T`` and at the end of a :func:`long_run`, and its blow-ups.

  A task blows up when its final loss is not finite or above ``blow_up_factor`` times
  its initial loss.
  """
  tracked = np.asarray(curves.train_losses, np.float64)
  at_long = evaluation.final_train_loss(tracked)
  blew_up = ~np.isfinite(at_long) | (at_long > blow_up_factor * tracked[:, 0])
  return {
      'steps': curves.every * (tracked.shape[1] - 1),
      'loss_at_T': report.pair(tracked[:, horizon // curves.every]),
      'loss_at_long': report.pair(at_long),
      'blew_up_fraction': float(np.mean(blew_up)),
      'any_non_finite': bool(not np.all(np.isfinite(curves.losses))),
      **{f'{metric}_at_long': report.pair(v) for metric, v in curves.metrics.items()},
      **protocol.curves_summary(curves),
  }


def beyond_horizon(optimizer: optax.GradientTransformation, family: TaskFamily,
                   task_params: PyTree, horizon: int, multiplier: int,
                   blow_up_factor: float) -> dict:
  """Train for ``multiplier * horizon`` steps; the loss at ``T`` and at the end, blow-ups.

  :func:`long_run_summary` of a :func:`long_run`.
  """
  return long_run_summary(long_run(optimizer, family, task_params, horizon, multiplier),
                          horizon, blow_up_factor)


def heldout_runs(family_cfg: ml_collections.ConfigDict, family: ClassificationFamily,
                 learned: dict, optimizers: dict, horizon: int
                 ) -> tuple[PyTree, dict[str, evaluation.Curves]]:
  """Every optimiser, as tuned on the meta-train family, on another dataset's tasks.

  Returns:
    ``(tasks, curves)``: the held-out tasks of ``family``
    (:func:`metamd_jax.evaluation.held_out_tasks`) and each optimiser's runs, the
    whole-set loss tracked every step.
  """
  for divergence in learned.values():
    metamd_jax.artifact.check_compatible(divergence, family.param_shapes())
  tasks = evaluation.held_out_tasks(family, family_cfg.seed, family_cfg.eval.num_tasks)
  curves = {opt: evaluation.run(optimizer, family, tasks, horizon, track_every=1)
            for opt, optimizer in optimizers.items()}
  return tasks, curves


def heldout_report(family_cfg: ml_collections.ConfigDict, family: ClassificationFamily,
                   curves: dict[str, evaluation.Curves], reference: str) -> dict:
  """The :func:`heldout_runs` against the reference's (tuned on meta-train) final loss."""
  spec = family_cfg.heldout
  target = (evaluation.final_train_loss(curves[reference].train_losses)
            if reference in curves else None)
  return {'dataset': spec.dataset, 'generator': dict(spec.generator),
          'train': family.train.name, 'test': family.test.name,
          'optimizers': {opt: protocol.summarize(run, target, reference)
                         for opt, run in curves.items()}}


def sgd_divergence(family_cfg: ml_collections.ConfigDict, family: TaskFamily,
                   learning_rate: float) -> PyTree:
  """The Kronecker divergence whose mirror step is SGD with ``learning_rate``."""
  meta = family_cfg.meta
  return metamd_jax.init_divergence(family.param_shapes(), float(learning_rate),
                                    structure='kronecker', eps=meta.eps,
                                    max_factor_size=meta.max_factor_size)


def convex_report(family: LeastSquaresFamily, divergences: dict, test_tasks: PyTree,
                  num_steps: int) -> dict:
  """Strong convexity, bound and observed suboptimality of each divergence (held-out)."""

  def one(divergence, tp):
    task = family.task(tp)
    rollout = inner_loop.rollout(divergence, task, num_steps, return_trajectory=True)
    x, y, _ = family.data(tp)
    _, optimal = family.optimum(tp)
    params_seq, grads_seq = rollout.trajectory
    full_loss = jax.vmap(lambda p: family.loss(p, (x, y)))(params_seq)  # (T + 1,)
    average = jax.tree.map(lambda p: jnp.mean(p[1:], axis=0), params_seq)
    final = rollout.final_params
    # Linearised regret against the final iterate: what the bound bounds.
    regret = sum(jnp.sum(g * (p[:-1] - f[None]))
                 for g, p, f in zip(jax.tree.leaves(grads_seq), jax.tree.leaves(params_seq),
                                    jax.tree.leaves(final))) / num_steps
    return {
        'bound': rollout.bound,
        'linearised_regret_vs_final': regret,
        'suboptimality_final': full_loss[-1] - optimal,
        'suboptimality_average_iterate': family.loss(average, (x, y)) - optimal,
        'suboptimality_mean_over_steps': jnp.mean(full_loss[1:] - optimal),
        'optimal_loss': optimal,
    }

  run = jax.jit(jax.vmap(one, in_axes=(None, 0)))
  result = {}
  for name, divergence in divergences.items():
    sigma, floor = metamd_jax.strong_convexity(divergence)
    values = {k: np.asarray(v) for k, v in run(divergence, test_tasks).items()}
    result[name] = {'strong_convexity': float(sigma), 'strong_convexity_floor': float(floor),
                    **{k: report.pair(v) for k, v in values.items()}}
  return result
