"""Meta-testing from a config: the learned divergence against tuned optax baselines."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_collections
import numpy as np

import metamd_jax
from experiments import builders
from experiments.meta_train import ARTIFACT
from metamd_jax import evaluation
from metamd_jax import meta_train as meta_train_lib

TUNE_KEY_OFFSET = 1_000_003  # tuning tasks: meta-train tasks not used by meta-training
TEST_KEY_OFFSET = 2_000_003  # held-out tasks: keys meta-training never uses


def _mean_std(x) -> tuple[float, float]:
  """Mean and standard deviation over the finite entries (``nan`` if there are none)."""
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  if x.size == 0:
    return float('nan'), float('nan')
  return float(np.mean(x)), float(np.std(x))


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             divergence=None) -> dict:
  """Compare MetaMD with tuned baselines on held-out tasks; write table, plot, JSON.

  Args:
    config: the experiment config.
    workdir: where the artifact is read (if ``divergence`` is None) and outputs go:
      ``results.json``, ``results.md`` and ``loss_curves.png``.
    divergence: the learned divergence (default: ``workdir/divergence.npz``).

  Returns:
    The results dictionary written to ``results.json``.
  """
  builders.validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  meta_train_family, meta_test_family = builders.build_families(config)
  if divergence is None:
    divergence, _ = metamd_jax.load_divergence(workdir / ARTIFACT)
  metamd_jax.artifact.check_compatible(divergence, meta_test_family.init_params())

  ev = config.eval
  tune_tasks = meta_train_lib.sample_tasks(
      meta_train_family, jax.random.key(config.seed + TUNE_KEY_OFFSET), 0, ev.num_tune_tasks)
  test_tasks = meta_train_lib.sample_tasks(
      meta_test_family, jax.random.key(config.seed + TEST_KEY_OFFSET), 0, ev.num_tasks)

  curves, learning_rates = {}, {}
  curves['metamd'] = evaluation.run(metamd_jax.metamd(divergence), meta_test_family, test_tasks,
                                    ev.num_steps, track_every=1)
  learning_rates['metamd'] = None
  for name in ev.baselines:
    best, _ = evaluation.tune_learning_rate(builders.BASELINES[name], ev.learning_rates,
                                            meta_train_family, tune_tasks, ev.num_steps,
                                            ev.window, score='train_loss')
    learning_rates[name] = best
    curves[name] = evaluation.run(builders.BASELINES[name](best), meta_test_family, test_tasks,
                                  ev.num_steps, track_every=1)

  reference = 'adam' if 'adam' in curves else next(iter(curves))
  # Training loss = the loss on each task's whole training set, after every step.
  finals = {name: evaluation.final_train_loss(run.train_losses)
            for name, run in curves.items()}
  target = finals[reference]
  results = {'reference': reference, 'num_steps': ev.num_steps, 'num_tasks': ev.num_tasks,
             'optimizers': {}}
  for name, run in curves.items():
    steps = evaluation.steps_to_loss(run.train_losses, target)
    entry = {
        'learning_rate': learning_rates[name],
        'final_train_loss': _mean_std(finals[name]),
        f'steps_to_{reference}_final_loss': _mean_std(steps),
        'reached_fraction': float(np.mean(np.isfinite(steps))),
        'final_minibatch_loss': _mean_std(evaluation.final_loss(run.losses, ev.window)),
    }
    for metric, values in run.metrics.items():
      entry[metric] = _mean_std(values)
    entry['mean_curve'] = evaluation.curve_stats(run.train_losses)[0].tolist()
    results['optimizers'][name] = entry

  table = format_table(results)
  if jax.process_index() != 0:  # every process evaluates; process 0 writes
    return results
  (workdir / 'results.json').write_text(json.dumps(results, indent=1))
  (workdir / 'results.md').write_text(table + '\n')
  print(table)
  plot_curves(results, workdir / 'loss_curves.png', title=_title(config))
  return results


def _title(config) -> str:
  task = config.task
  if task.family == 'classification':
    return f'{task.model.upper()} on {task.dataset}: held-out tasks'
  return f'{task.family}: held-out tasks'


def format_table(results: dict) -> str:
  reference = results['reference']
  steps_key = f'steps_to_{reference}_final_loss'
  lines = [f'| optimiser | learning rate | steps to {reference} final loss | '
           'final train loss | test accuracy |', '| --- | --- | --- | --- | --- |']
  for name, entry in results['optimizers'].items():
    lr = 'learned' if entry['learning_rate'] is None else f"{entry['learning_rate']:g}"
    steps, steps_std = entry[steps_key]
    reached = entry['reached_fraction']
    steps_text = (f'{steps:.1f} ± {steps_std:.1f}' if reached == 1.0 else
                  f'{steps:.1f} ({reached:.0%} reached)' if reached > 0 else 'not reached')
    loss, loss_std = entry['final_train_loss']
    acc = entry.get('test_accuracy')
    acc_text = f'{acc[0]:.3f} ± {acc[1]:.3f}' if acc else 'n/a'
    lines.append(f'| {name} | {lr} | {steps_text} | {loss:.4f} ± {loss_std:.4f} | {acc_text} |')
  return '\n'.join(lines)


def plot_curves(results: dict, path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, entry in results['optimizers'].items():
    curve = np.asarray(entry['mean_curve'])
    label = name if entry['learning_rate'] is None else f"{name} (lr {entry['learning_rate']:g})"
    ax.plot(np.arange(curve.size), curve, label=label, lw=2 if name == 'metamd' else 1.2)
  ax.set_xlabel('training step')
  ax.set_ylabel('training loss, whole training set (mean over tasks)')
  ax.set_yscale('log')
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
