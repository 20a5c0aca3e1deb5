"""Diagnostic (not a test): the overshoot check's factor per layer along one training run.

Adaptive MetaMD's overshoot check (:func:`metamd_jax.blended_metamd`, ``overshoot_decay``)
divides the learned half of each layer by a factor ``sigma_t >= 1`` that never decreases.
This script trains one validation task of a config's family (a meta-train tuning task,
:func:`metamd_jax.evaluation.tuning_tasks`, as in :mod:`experiments.choose_variant`), as
it is or under one of the everyday changes, with the config's adaptive optimiser on a
learned divergence, and prints every ``--every`` steps the whole-set training loss and
``sigma_t`` of each layer: how much of the learned half is left.

Usage (from the repository root)::

  python -m scripts.trace_overshoot --config configs/digits_mlp.py --workdir runs/digits
  python -m scripts.trace_overshoot ... --shift features_permuted --task 2
  python -m scripts.trace_overshoot ... --steps 1000 --every 50 --set adaptive_overshoot_cap=inf

``--workdir`` holds the learned ``divergence.npz`` (a main job's or meta-training's);
``--set FIELD=VALUE`` changes one ``eval`` field first (its type is the config's).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

# One OpenBLAS thread, as the experiments run (set before numpy loads; a user's value wins).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import builders, evaluate  # noqa: E402
from experiments import meta_train as meta_train_exp  # noqa: E402
from metamd_jax import evaluation, overshoot  # noqa: E402
from scripts.benchmark_parallel import load_config  # noqa: E402

_BOOLEANS = {'true': True, 'false': False}


def _fail(message: str):
  raise SystemExit(f'trace_overshoot: {message}')


def apply_settings(config, pairs: list[str]) -> None:
  """``['FIELD=VALUE', ...]``: set ``config.eval.FIELD``, typed as the config's value."""
  for pair in pairs:
    field, sep, value = pair.partition('=')
    if not sep or field not in config.eval:
      _fail(f'--set takes FIELD=VALUE with FIELD a field of the config\'s eval, got {pair!r}.')
    current = config.eval[field]
    if not isinstance(current, (bool, int, float, str)):
      _fail(f'--set {field}: only number, bool and string fields can be set, it holds '
            f'{current!r}.')
    try:
      if isinstance(current, bool):
        typed = _BOOLEANS[value.lower()]
      elif isinstance(current, (int, float)):
        typed = type(current)(float(value) if isinstance(current, float) else int(value))
      else:
        typed = type(current)(value)
    except (KeyError, ValueError):
      _fail(f'--set {field} takes a value like {current!r}, got {value!r}.')
    config.eval[field] = typed


def _overshoot_state(state):
  """The :class:`metamd_jax.overshoot.OvershootState` inside an optimiser state, or None."""
  if isinstance(state, overshoot.OvershootState):
    return state
  if isinstance(state, (tuple, list)):
    for part in state:
      found = _overshoot_state(part)
      if found is not None:
        return found
  return None


def calibrated_adaptive(config, workdir: str | os.PathLike, script: str):
  """``((meta-train family, meta-test family), divergence, optimizer)``: the config's
  adaptive optimiser on ``workdir``'s learned divergence, calibrated on the meta-train
  tuning tasks as the experiments do; exits naming ``script`` where calibration fails."""
  families = builders.build_families(config)
  divergence = meta_train_exp.learned_divergence(workdir, families[0])
  tune_tasks = evaluation.tuning_tasks(families[0], config.seed, config.eval.num_tune_tasks)
  calibration = evaluate.calibrate(config, divergence, families[0], tune_tasks)
  optimizer = evaluate.adaptive_optimizer(config, divergence, calibration)
  if optimizer is None:
    raise SystemExit(f'{script}: calibration failed: frozen MetaMD does not train a '
                     'tuning task (it diverges or ends at or above its initial loss).')
  return families, divergence, optimizer


def trace(config, workdir: str | os.PathLike, shift: str | None, task_index: int,
          num_steps: int, every: int) -> dict:
  """Train one validation task; the whole-set loss and ``sigma`` every ``every`` steps.

  Returns:
    ``{'steps': [0, every, ...], 'train_loss': [...], 'sigma': [[per layer], ...],
    'layers': [layer names], 'settings'}``: ``sigma`` after each recorded step (1 before
    the first).
  """
  if num_steps < 1 or every < 1 or num_steps % every:
    _fail(f'--steps ({num_steps}) must be a positive multiple of --every ({every}).')
  if task_index < 0:
    _fail(f'--task must be >= 0, got {task_index}.')
  builders.validate_config(config)
  ev = config.eval
  if not ev.get('adaptive_overshoot', False):
    _fail('the config has eval.adaptive_overshoot=False: no check to trace '
          '(--set adaptive_overshoot=true).')
  (family, _), divergence, optimizer = calibrated_adaptive(config, workdir, 'trace_overshoot')
  changed = family if shift is None else builders.shifted_family(config, family, shift,
                                                                  'meta_train')
  tasks = evaluation.tuning_tasks(changed, config.seed, task_index + 1)
  task = changed.task(jax.tree.map(lambda x: x[task_index], tasks))
  params = task.init()
  layers = [jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_leaves_with_path(params)]

  def step(carry, index):
    params, state = carry
    grads = jax.grad(task.loss)(params, task.batch(index))
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  @jax.jit
  def chunk(carry, start):
    carry, _ = jax.lax.scan(step, carry, start + jnp.arange(every, dtype=jnp.int32))
    return carry, task.evaluate(carry[0])['train_loss'], _overshoot_state(carry[1]).scale

  carry = (params, optimizer.init(params))
  losses = [float(task.evaluate(params)['train_loss'])]
  sigmas = [np.ones(len(layers)).tolist()]
  for start in range(0, num_steps, every):
    carry, loss, sigma = chunk(carry, jnp.int32(start))
    losses.append(float(loss))
    sigmas.append(np.asarray(sigma, np.float64).tolist())
  return {'steps': list(range(0, num_steps + 1, every)), 'train_loss': losses,
          'sigma': sigmas, 'layers': layers,
          'settings': {'shift': shift, 'task': task_index,
                       'overshoot_decay': ev.adaptive_overshoot_decay,
                       'overshoot_cap': ev.get('adaptive_overshoot_cap', float('inf'))}}


def format_trace(result: dict) -> str:
  """A table: step, whole-set loss, ``sigma`` per layer."""
  lines = ['| step | train loss | ' + ' | '.join(f'sigma {name}' for name in result['layers'])
           + ' |', '| --- ' * (2 + len(result['layers'])) + '|']
  for step, loss, sigma in zip(result['steps'], result['train_loss'], result['sigma']):
    lines.append(f'| {step} | {loss:.4g} | ' + ' | '.join(f'{s:.3g}' for s in sigma) + ' |')
  return '\n'.join(lines)


def report(result: dict, table: str, json_path: str | None) -> dict:
  """Print ``table``; write ``result`` as JSON to ``json_path`` where given; ``result``."""
  print(table)
  if json_path:
    pathlib.Path(json_path).write_text(json.dumps(result, indent=1))
  return result


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--workdir', required=True, help='holds the learned divergence.npz')
  parser.add_argument('--shift', default=None, help=f'one of {tuple(builders.SHIFTS)}')
  parser.add_argument('--task', type=int, default=0, help='index of the validation task')
  parser.add_argument('--steps', type=int, default=None, help="default: the config's T")
  parser.add_argument('--every', type=int, default=10)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--json', default=None, help='also write the trace here')
  args = parser.parse_args(argv)
  if not pathlib.Path(args.config).is_file():
    _fail(f'--config {args.config} is not a file.')
  if args.shift is not None and args.shift not in builders.SHIFTS:
    _fail(f'--shift must be one of {tuple(builders.SHIFTS)}, got {args.shift!r}.')
  config = load_config(args.config)
  apply_settings(config, args.set)
  result = trace(config, args.workdir, args.shift, args.task,
                 args.steps or config.eval.num_steps, args.every)
  return report(result, format_trace(result), args.json)


if __name__ == '__main__':
  main()
