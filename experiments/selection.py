"""Which meta-step's divergence to keep: the initial, the best-scoring or the last one.

  python -m experiments.selection --config configs/default.py --workdir runs/selection \
      --config.meta.num_meta_steps=200

Meta-trains the config in the workdir (:func:`experiments.meta_train.meta_train`, so a
rerun resumes), restores the final meta-training state and trains held-out tasks (the keys
of :mod:`experiments.evaluate`) with three divergences of that one run: the initial one,
``best_divergence`` (the lowest moving average of the mean inner training loss, what
``meta.select='best'`` keeps) and the last meta-iterate (``meta.select='last'``), next to
Adam tuned on meta-train tasks. Reports the whole-training-set loss at ``T`` and at
``10 T``, steps to Adam's loss at ``T`` and test accuracy; writes ``selection.json`` and
prints a markdown table.
"""

from __future__ import annotations

import json
import os
import pathlib

# One OpenBLAS thread, as in experiments/main.py (set before numpy loads; a user's
# value wins).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import builders  # noqa: E402
from experiments import meta_train as meta_train_exp  # noqa: E402
from experiments.evaluate import TEST_KEY_OFFSET, TUNE_KEY_OFFSET  # noqa: E402
from metamd_jax import checkpoint, evaluation  # noqa: E402
from metamd_jax import meta_train as meta_train_lib  # noqa: E402

REFERENCE = 'adam'


def _restore_state(config: ml_collections.ConfigDict, workdir: pathlib.Path, family):
  template = meta_train_lib.init_state(builders.build_divergence(config, family),
                                       builders.build_meta_optimizer(config))
  checkpointer = checkpoint.Checkpointer(workdir / 'checkpoints',
                                         every=config.meta.checkpoint_every)
  try:
    state, resumed = checkpointer.restore_or(template)
  finally:
    checkpointer.close()
  if not resumed:
    raise FileNotFoundError(f'no meta-training checkpoint in {workdir / "checkpoints"}.')
  return template.divergence, state


def _summary(curves: evaluation.Curves, target: np.ndarray) -> dict:
  final = np.asarray(curves.train_losses[:, -1], np.float64)
  steps = evaluation.steps_to_loss(curves.train_losses, target, curves.every)
  row = {'final_train_loss': final.tolist(), 'steps_to_reference': steps.tolist(),
         'reached_fraction': float(np.mean(np.isfinite(steps)))}
  if 'test_accuracy' in curves.metrics:
    row['test_accuracy'] = curves.metrics['test_accuracy'].tolist()
  return row


def compare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Meta-train (or resume), then compare the initial, best and last divergences."""
  workdir = pathlib.Path(workdir)
  meta_train_exp.meta_train(config, workdir, progress=True)
  train_family, test_family = builders.build_families(config)
  initial, state = _restore_state(config, workdir, train_family)
  ev, horizon = config.eval, config.meta.horizon
  tune_tasks = meta_train_lib.sample_tasks(
      train_family, jax.random.key(config.seed + TUNE_KEY_OFFSET), 0, ev.num_tune_tasks)
  test_tasks = meta_train_lib.sample_tasks(
      test_family, jax.random.key(config.seed + TEST_KEY_OFFSET), 0, ev.num_tasks)
  lr, _ = evaluation.tune_learning_rate(builders.BASELINES[REFERENCE], ev.learning_rates,
                                        train_family, tune_tasks, horizon, ev.window,
                                        score='train_loss')
  optimizers = {REFERENCE: builders.BASELINES[REFERENCE](lr),
                'initial': metamd_jax.metamd(initial),
                'best': metamd_jax.metamd(state.best_divergence),
                'last': metamd_jax.metamd(state.divergence)}
  at_t = {n: evaluation.run(o, test_family, test_tasks, horizon, track_every=1)
          for n, o in optimizers.items()}
  target = np.asarray(at_t[REFERENCE].train_losses[:, -1], np.float64)
  records = [json.loads(line) for line in
             (workdir / meta_train_exp.METRICS).read_text().splitlines() if line.strip()]
  scores = np.asarray([r.get('score', np.inf) for r in records], np.float64)
  result = {'num_meta_steps': int(state.step), 'reference_learning_rate': lr,
            'best_meta_step': int(records[int(np.nanargmin(scores))]['step']),
            'best_score': float(state.best_score), 'last_score': float(state.score),
            'dropped_tasks': int(state.dropped_tasks), 'optimizers': {}}
  for name, optimizer in optimizers.items():
    row = _summary(at_t[name], target)
    long = evaluation.run(optimizer, test_family, test_tasks, 10 * horizon, track_every=10)
    row['final_train_loss_at_10T'] = np.asarray(long.train_losses[:, -1], np.float64).tolist()
    result['optimizers'][name] = row
  return result


def format_table(result: dict) -> str:
  def stat(values):
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    return 'n/a' if x.size == 0 else f'{np.mean(x):.4g} ± {np.std(x):.2g}'

  lines = [f"{result['num_meta_steps']} meta-steps; best meta-step {result['best_meta_step']} "
           f"(score {result['best_score']:.4g}, last {result['last_score']:.4g}); "
           f"{result['dropped_tasks']} inner runs dropped.", '',
           f'| divergence | train loss at T | steps to {REFERENCE} at T | train loss at 10T | '
           'test accuracy |', '| --- | --- | --- | --- | --- |']
  for name, row in result['optimizers'].items():
    reached = row['reached_fraction']
    steps = stat(row['steps_to_reference']) + ('' if reached == 1 else f' ({reached:.0%})')
    lines.append(f"| {name} | {stat(row['final_train_loss'])} | {steps} | "
                 f"{stat(row['final_train_loss_at_10T'])} | "
                 f"{stat(row.get('test_accuracy', []))} |")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  if not flag_values['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = flag_values.config
  builders.validate_config(config)
  result = compare(config, flag_values.workdir)
  pathlib.Path(flag_values.workdir, 'selection.json').write_text(json.dumps(result, indent=1))
  print(format_table(result))


if __name__ == '__main__':
  # Flags are defined only when run as a script, so importing this module next to the
  # other experiments (which define --workdir and --config too) does not clash.
  flags.DEFINE_string('workdir', None, 'Meta-training directory (resumed if it has '
                      'checkpoints).')
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
