"""Meta-testing from a config: the learned divergence against tuned optax baselines.

The protocol (tasks, tuning, statistics) is :mod:`experiments.protocol`'s; the table and
JSON are :mod:`experiments.report`'s and the figure :mod:`experiments.plots`'.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

import metamd_jax
from experiments import builders, plots, protocol, report
from experiments.meta_train import ARTIFACT
from metamd_jax import evaluation, parallel


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             divergence=None) -> dict:
  """Compare MetaMD with tuned baselines on held-out tasks; write table, plot, JSON.

  Baselines are tuned on meta-train tasks (:func:`metamd_jax.evaluation.tuning_tasks`);
  one whose every learning rate diverged is left out (with a warning). Every optimiser
  then trains the held-out tasks (:func:`metamd_jax.evaluation.held_out_tasks`) for
  ``eval.num_steps`` steps.

  Args:
    config: the experiment config.
    workdir: where the artifact is read (if ``divergence`` is None) and outputs go:
      ``results.json``, ``results.md`` and ``loss_curves.png``.
    divergence: the learned divergence (default: ``workdir/divergence.npz``).

  Returns:
    The results dictionary written to ``results.json``: ``{'reference', 'num_steps',
    'num_tasks', 'optimizers': {name: {'learning_rate', 'final_train_loss',
    'steps_to_<reference>_final_loss', 'reached_fraction', 'final_minibatch_loss',
    <metrics>, 'mean_curve'}}}``, statistics as ``[mean, std]`` over the held-out tasks
    (``None`` where no task has a finite value).
  """
  builders.validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  meta_train_family, meta_test_family = builders.build_families(config)
  if divergence is None:
    divergence, _ = metamd_jax.load_divergence(workdir / ARTIFACT)
  metamd_jax.artifact.check_compatible(divergence, meta_test_family.init_params())

  ev = config.eval
  tune_tasks = evaluation.tuning_tasks(meta_train_family, config.seed, ev.num_tune_tasks)
  test_tasks = evaluation.held_out_tasks(meta_test_family, config.seed, ev.num_tasks)
  tuned, _ = protocol.tune_baselines(ev.baselines, ev, meta_train_family, tune_tasks,
                                     ev.num_steps)
  learning_rates = {'metamd': None, **{n: lr for n, lr in tuned.items() if lr is not None}}
  optimizers = {name: metamd_jax.metamd(divergence) if lr is None
                else builders.BASELINES[name](lr) for name, lr in learning_rates.items()}
  curves = {name: evaluation.run(optimizer, meta_test_family, test_tasks, ev.num_steps,
                                 track_every=1)
            for name, optimizer in optimizers.items()}

  reference = 'adam' if 'adam' in curves else next(iter(curves))
  # Training loss = the loss on each task's whole training set, after every step.
  target = evaluation.final_train_loss(curves[reference].train_losses)
  results = {'reference': reference, 'num_steps': ev.num_steps, 'num_tasks': ev.num_tasks,
             'optimizers': {}}
  for name, run in curves.items():
    results['optimizers'][name] = {
        'learning_rate': learning_rates[name],
        **protocol.summarize(run, target, reference),
        'final_minibatch_loss': report.pair(evaluation.final_loss(run.losses, ev.window)),
        'mean_curve': protocol.curves_summary(run)['mean_curve'],
    }

  if not parallel.is_writer():  # every process evaluates; one writes
    return results
  table = report.format_evaluation(results)
  report.write_json(workdir / 'results.json', results)
  (workdir / 'results.md').write_text(table + '\n')
  print(table)
  plots.plot_evaluation(results, workdir / 'loss_curves.png', title=report.title(config))
  return results
