"""Diagnostic (not a test): where guarded MetaMD hands over, and what the loss does there.

Guarded MetaMD (:func:`metamd_jax.guarded_switch`, ``eval.adaptive_guard_margin``) runs
frozen MetaMD until its gradients leave their calibrated levels or a step count (or its
progress) says so, then the config's adaptive optimiser, started afresh. This script trains
tasks of a config's family with that optimiser on a learned divergence and prints, per
task: the update at which the guard switched (0: never), the whole-set training loss
just before it and the highest in the 5 steps from it (a jump at the handover), and the
steps each of the guarded run and the fast step alone (frozen MetaMD, at
``eval.frozen_rank`` where set) take to reach the final whole-set loss of Adam at
``--adam-lr`` on the same task.

Usage (from the repository root)::

  python -m scripts.trace_guard --config configs/default.py --workdir runs/bench \\
      --margin 2 --switch-after 20 --adam-lr 0.03
  python -m scripts.trace_guard ... --tasks held_out --num-tasks 5 --set adaptive_blend_rate=0
  python -m scripts.trace_guard ... --shift features_permuted --adam-lr 0.03

``--tasks validation`` trains meta-train tuning tasks (:func:`metamd_jax.evaluation.tuning_tasks`,
as :mod:`experiments.choose_variant` does), ``held_out`` the meta-test family's held-out
tasks (reporting only). ``--shift NAME`` trains them under one everyday change of
:data:`experiments.builders.SHIFTS` (Adam's target then comes from the same changed tasks:
pass the learning rate re-tuned for that change). ``--set FIELD=VALUE`` changes one
``eval`` field first (its type is the config's; ``none`` sets ``None``).
"""

from __future__ import annotations

import argparse
import os
import pathlib

# One OpenBLAS thread, as the experiments run (set before numpy loads; a user's value wins).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import builders, evaluate  # noqa: E402
from metamd_jax import evaluation  # noqa: E402
from metamd_jax.tasks.base import batches_of  # noqa: E402
from scripts.benchmark_parallel import load_config  # noqa: E402
from scripts.trace_overshoot import apply_settings, calibrated_adaptive, report  # noqa: E402

AFTER = 5  # steps from the switch in which the highest loss is reported
TASKS = ('validation', 'held_out')


def _fail(message: str):
  raise SystemExit(f'trace_guard: {message}')


def _steps_to(curve: np.ndarray, target: float) -> int | None:
  """:func:`metamd_jax.evaluation.steps_to_loss` of one curve, ``None`` if never."""
  steps = float(evaluation.steps_to_loss(curve, target))
  return None if np.isnan(steps) else int(steps)


def _guarded_runs(optimizer, family, tasks, num_steps: int):
  """Per task, whole-set losses ``(num_steps + 1,)`` (the first at the start) and the
  guard's ``switched`` flag after each update ``(num_steps,)``: one compiled run, taken
  task by task (each in its own program, so the guard's conditional runs one branch)."""
  update = optax.with_extra_args_support(optimizer).update

  @jax.jit
  def run(task_params):
    task = family.task(task_params)
    batch = batches_of(task, num_steps)

    def body(carry, step):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, batch(step))
      updates, state = update(grads, state, params, value=loss)
      params = optax.apply_updates(params, updates)
      return (params, state), (task.evaluate(params)['train_loss'], state.switched)

    params = task.init()
    _, (losses, switched) = jax.lax.scan(body, (params, optimizer.init(params)),
                                         jnp.arange(num_steps, dtype=jnp.int32))
    return jnp.concatenate([task.evaluate(params)['train_loss'][None], losses]), switched

  num_tasks = jax.tree.leaves(tasks)[0].shape[0]
  for index in range(num_tasks):
    losses, switched = run(jax.tree.map(lambda x, i=index: x[i], tasks))
    yield np.asarray(losses, np.float64), np.asarray(switched)


def trace(config, workdir: str | os.PathLike, which: str, num_tasks: int,
          num_steps: int, adam_lr: float, shift: str | None = None) -> dict:
  """Per task: the switch, the loss around it and the steps to Adam's final loss.

  Returns:
    ``{'tasks': [{'switch', 'loss_before', 'highest_after', 'guarded_steps',
    'fast_steps', 'target'}, ...], 'settings'}``: ``switch`` 0 where the guard never
    switched (then ``loss_before`` and ``highest_after`` are ``None``); steps ``None``
    where a run never reaches the target.
  """
  if which not in TASKS:
    _fail(f'--tasks must be one of {TASKS}, got {which!r}.')
  if num_tasks < 1 or num_steps < 1:
    _fail(f'--num-tasks and --steps must be >= 1, got {num_tasks} and {num_steps}.')
  if not adam_lr > 0:
    _fail(f'--adam-lr must be positive, got {adam_lr}.')
  if shift is not None and shift not in builders.SHIFTS:
    _fail(f'--shift must be one of {tuple(builders.SHIFTS)}, got {shift!r}.')
  builders.validate_config(config)
  ev = config.eval
  if ev.get('adaptive_guard_margin', None) is None:
    _fail('the config has no guard (eval.adaptive_guard_margin is None): pass --margin.')
  (train_family, test_family), divergence, guarded = calibrated_adaptive(config, workdir,
                                                                         'trace_guard')
  fast = evaluate.low_rank_optimizer(config, divergence) or metamd_jax.metamd(divergence)
  family = train_family if which == 'validation' else test_family
  if shift is not None:
    applicable = builders.applicable_shifts(family, tuple(builders.SHIFTS))
    if shift not in applicable:
      _fail(f'--shift {shift!r} does not apply to this family (it takes {applicable}).')
    family = builders.shifted_family(config, family, shift,
                                     'meta_train' if which == 'validation' else 'meta_test')
  tasks = (evaluation.tuning_tasks(family, config.seed, num_tasks) if which == 'validation'
           else evaluation.held_out_tasks(family, config.seed, num_tasks))
  targets = evaluation.final_train_loss(
      evaluation.run(optax.adam(adam_lr), family, tasks, num_steps, track_every=1).train_losses)
  fast_curves = np.asarray(
      evaluation.run(fast, family, tasks, num_steps, track_every=1).train_losses, np.float64)
  rows = []
  for (losses, switched), target, fast_losses in zip(
      _guarded_runs(guarded, family, tasks, num_steps), targets, fast_curves):
    target = float(target)
    switch = int(np.argmax(switched)) + 1 if switched.any() else 0
    rows.append({
        'switch': switch, 'target': target,
        # losses[t]: after t updates; update `switch` is the fallback's first.
        'loss_before': float(losses[switch - 1]) if switch else None,
        'highest_after': float(np.max(losses[switch:switch + AFTER])) if switch else None,
        'guarded_steps': _steps_to(losses, target),
        'fast_steps': _steps_to(fast_losses, target)})
  return {'tasks': rows,
          'settings': {'tasks': which, 'shift': shift, 'num_steps': num_steps,
                       'adam_lr': adam_lr,
                       'margin': ev.adaptive_guard_margin,
                       'switch_after': ev.get('adaptive_guard_steps', None),
                       'min_progress': ev.get('adaptive_guard_progress', None),
                       'prior': ev.get('adaptive_guard_prior', False)}}


def format_trace(result: dict) -> str:
  """A table: one row per task."""
  fmt = lambda x: 'n/a' if x is None else (f'{x:.4g}' if isinstance(x, float) else str(x))
  lines = ['| task | switch | loss before | highest in the 5 steps from it | guarded: steps '
           "to adam's loss | fast alone | adam's loss |", '| --- ' * 7 + '|']
  for index, row in enumerate(result['tasks']):
    lines.append(f"| {index} | {row['switch']} | {fmt(row['loss_before'])} | "
                 f"{fmt(row['highest_after'])} | {fmt(row['guarded_steps'])} | "
                 f"{fmt(row['fast_steps'])} | {row['target']:.4g} |")
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--workdir', required=True, help='holds the learned divergence.npz')
  parser.add_argument('--tasks', default='validation', help=f'one of {TASKS}')
  parser.add_argument('--num-tasks', type=int, default=10)
  parser.add_argument('--shift', default=None,
                      help='one everyday change of experiments.builders.SHIFTS (default: none)')
  parser.add_argument('--steps', type=int, default=None, help="default: the config's T")
  parser.add_argument('--adam-lr', type=float, required=True,
                      help="Adam's learning rate for the target loss (the tuned one)")
  parser.add_argument('--margin', type=float, default=None,
                      help='eval.adaptive_guard_margin (default: the config\'s)')
  parser.add_argument('--switch-after', type=int, default=None,
                      help='eval.adaptive_guard_steps (default: the config\'s)')
  parser.add_argument('--min-progress', type=float, default=None,
                      help='eval.adaptive_guard_progress (default: the config\'s)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--json', default=None, help='also write the trace here')
  args = parser.parse_args(argv)
  if not pathlib.Path(args.config).is_file():
    _fail(f'--config {args.config} is not a file.')
  config = load_config(args.config)
  for field, value in (('adaptive_guard_margin', args.margin),
                       ('adaptive_guard_steps', args.switch_after),
                       ('adaptive_guard_progress', args.min_progress)):
    if value is not None:
      config.eval[field] = value
  nones = [pair for pair in args.set if pair.partition('=')[2].lower() == 'none']
  for pair in nones:
    field = pair.partition('=')[0]
    if field not in config.eval:
      _fail(f'--set takes FIELD=VALUE with FIELD a field of the config\'s eval, got {pair!r}.')
    config.eval[field] = None
  apply_settings(config, [pair for pair in args.set if pair not in nones])
  try:
    result = trace(config, args.workdir, args.tasks, args.num_tasks,
                   args.steps or config.eval.num_steps, args.adam_lr, args.shift)
  except ValueError as error:  # a bad config value, named by experiments.builders
    _fail(str(error))
  return report(result, format_trace(result), args.json)


if __name__ == '__main__':
  main()
