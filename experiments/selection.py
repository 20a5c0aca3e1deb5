"""Which meta-step's divergence to keep: the initial, the best-scoring or the last one.

  python -m experiments.selection --config configs/default.py --workdir runs/selection \
      --config.meta.num_meta_steps=200

Meta-trains the config in the workdir (:func:`experiments.meta_train.meta_train`, so a
rerun resumes) and, with its final meta-training state, trains the held-out tasks
(:func:`metamd_jax.evaluation.held_out_tasks`) with three divergences of that one run:
the initial one, ``best_divergence`` (the lowest moving average of the mean inner
training loss, what ``meta.select='best'`` keeps) and the last meta-iterate
(``meta.select='last'``), next to Adam tuned on meta-train tasks. Reports the
whole-training-set loss at ``T`` and at ``10 T``, steps to Adam's loss at ``T`` and test
accuracy; writes ``selection.json`` and prints a markdown table
(:func:`experiments.report.format_selection`).
"""

from __future__ import annotations

import os
import pathlib

# One OpenBLAS thread, as in experiments/main.py (set before numpy loads; a user's
# value wins).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import builders, cli, protocol, report  # noqa: E402
from experiments import meta_train as meta_train_exp  # noqa: E402
from metamd_jax import evaluation  # noqa: E402

REFERENCE = 'adam'


def _per_task(curves: evaluation.Curves, target: np.ndarray) -> dict:
  """One entry per held-out task: final whole-set loss, steps to ``target``, accuracy."""
  reached = protocol.reach(curves, target)
  row = {'final_train_loss': evaluation.final_train_loss(curves.train_losses).tolist(),
         'steps_to_reference': reached['steps_per_task'],
         'reached_fraction': reached['reached_fraction']}
  if 'test_accuracy' in curves.metrics:
    row['test_accuracy'] = curves.metrics['test_accuracy'].tolist()
  return row


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Meta-train (or resume), then compare the initial, best and last divergences.

  Returns:
    ``{'num_meta_steps', 'reference', 'reference_learning_rate', 'best_meta_step',
    'best_score', 'last_score', 'dropped_tasks', 'optimizers': {name: {...}}}`` with one
    entry per held-out task in each optimiser's lists (``final_train_loss``,
    ``steps_to_reference``, ``final_train_loss_at_10T``, ``test_accuracy``).
  """
  workdir = pathlib.Path(workdir)
  state = meta_train_exp.meta_train(config, workdir, progress=True).state
  train_family, test_family = builders.build_families(config)
  ev, horizon = config.eval, config.meta.horizon
  tune_tasks = evaluation.tuning_tasks(train_family, config.seed, ev.num_tune_tasks)
  test_tasks = evaluation.held_out_tasks(test_family, config.seed, ev.num_tasks)
  learning_rates, _ = protocol.tune_baselines((REFERENCE,), ev, train_family, tune_tasks,
                                              horizon)
  lr = learning_rates[REFERENCE]
  if lr is None:
    raise ValueError(f'{REFERENCE} diverged at every learning rate of '
                     f'config.eval.learning_rates {tuple(ev.learning_rates)}.')
  optimizers = {REFERENCE: builders.BASELINES[REFERENCE](lr),
                'initial': metamd_jax.metamd(builders.build_divergence(config, train_family)),
                'best': metamd_jax.metamd(state.best_divergence),
                'last': metamd_jax.metamd(state.divergence)}
  at_t = {n: evaluation.run(o, test_family, test_tasks, horizon, track_every=1)
          for n, o in optimizers.items()}
  target = evaluation.final_train_loss(at_t[REFERENCE].train_losses)
  result = {'num_meta_steps': int(state.step), 'reference': REFERENCE,
            'reference_learning_rate': lr, 'best_meta_step': int(state.best_step),
            'best_score': float(state.best_score), 'last_score': float(state.score),
            'dropped_tasks': int(state.dropped_tasks), 'optimizers': {}}
  for name, optimizer in optimizers.items():
    row = _per_task(at_t[name], target)
    long = evaluation.run(optimizer, test_family, test_tasks, 10 * horizon, track_every=10)
    row['final_train_loss_at_10T'] = evaluation.final_train_loss(long.train_losses).tolist()
    result['optimizers'][name] = row
  return result


def main(argv):
  flag_values = cli.start(argv)
  config = flag_values.config
  builders.validate_config(config)
  result = compare(config, flag_values.workdir)
  report.write_json(pathlib.Path(flag_values.workdir, 'selection.json'), result)
  print(report.format_selection(result))


if __name__ == '__main__':
  # Flags are defined only when run as a script, so importing this module next to the
  # other experiments (which define --workdir and --config too) does not clash.
  flags.DEFINE_string('workdir', None, 'Meta-training directory (resumed if it has '
                      'checkpoints).')
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
