"""The benchmark's own runs, next to the shared protocol of :mod:`experiments.protocol`.

Meta-training the learned variants, timing, training beyond the horizon, the held-out
dataset and the convex guarantee. Every statistic is a ``[mean, std]`` pair over the
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


def beyond_horizon(optimizer: optax.GradientTransformation, family: TaskFamily,
                   task_params: PyTree, horizon: int, multiplier: int,
                   blow_up_factor: float) -> dict:
  """Train for ``multiplier * horizon`` steps; the loss at ``T`` and at the end, blow-ups.

  The whole-set loss is tracked every ``multiplier`` steps (every step if that does not
  divide the horizon). A task blows up when its final loss is not finite or above
  ``blow_up_factor`` times its initial loss.
  """
  long_steps = multiplier * horizon
  every = multiplier if horizon % multiplier == 0 else 1
  curves = evaluation.run(optimizer, family, task_params, long_steps, track_every=every)
  tracked = np.asarray(curves.train_losses, np.float64)
  at_long = evaluation.final_train_loss(tracked)
  blew_up = ~np.isfinite(at_long) | (at_long > blow_up_factor * tracked[:, 0])
  return {
      'steps': long_steps,
      'loss_at_T': report.pair(tracked[:, horizon // every]),
      'loss_at_long': report.pair(at_long),
      'blew_up_fraction': float(np.mean(blew_up)),
      'any_non_finite': bool(not np.all(np.isfinite(curves.losses))),
      **{f'{metric}_at_long': report.pair(v) for metric, v in curves.metrics.items()},
      **protocol.curves_summary(curves),
  }


def heldout_report(family_cfg: ml_collections.ConfigDict, family: ClassificationFamily,
                   learned: dict, optimizers: dict, reference: str, horizon: int) -> dict:
  """All optimisers (learning rates tuned on the meta-train family) on another dataset."""
  for divergence in learned.values():
    metamd_jax.artifact.check_compatible(divergence, family.init_params())
  tasks = evaluation.held_out_tasks(family, family_cfg.seed, family_cfg.eval.num_tasks)
  curves = {opt: evaluation.run(optimizer, family, tasks, horizon, track_every=1)
            for opt, optimizer in optimizers.items()}
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
  return metamd_jax.init_divergence(family.init_params(), float(learning_rate),
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
