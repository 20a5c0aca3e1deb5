"""Meta-training from a config: checkpointed, resumable, with a progress bar and metrics."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import jax
import ml_collections
import tqdm

import metamd_jax
from experiments import builders
from metamd_jax import checkpoint, parallel
from metamd_jax import meta_train as meta_train_lib

ARTIFACT = 'divergence.npz'
METRICS = 'metrics.jsonl'


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Drop logged meta-steps after ``last_step`` (they are redone after a resume)."""
  if not path.exists():
    return
  kept = [line for line in path.read_text().splitlines()
          if line.strip() and json.loads(line)['step'] <= last_step]
  path.write_text(''.join(line + '\n' for line in kept))


def _build_meta_step(family, meta_optimizer, config, solver_options, axis_name):
  return meta_train_lib.make_meta_step(
      family, meta_optimizer, num_steps=config.meta.horizon, objective=config.meta.objective,
      adjoint=config.meta.adjoint, solver=config.meta.solver, solver_options=solver_options,
      axis_name=axis_name, score_decay=config.meta.score_decay)


def meta_train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               *, progress: bool = True):
  """Meta-train the divergence of ``config`` in ``workdir``; resume if checkpoints exist.

  Writes ``metrics.jsonl`` (one line per meta-step), orbax checkpoints every
  ``config.meta.checkpoint_every`` meta-steps, and the learned divergence as the
  artifact ``divergence.npz``.

  Returns:
    The learned divergence.
  """
  builders.validate_config(config)
  solver_options = builders.build_solver_options(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  family, _ = builders.build_families(config)
  meta_optimizer = builders.build_meta_optimizer(config)
  state = meta_train_lib.init_state(builders.build_divergence(config, family), meta_optimizer)

  checkpointer = checkpoint.Checkpointer(workdir / 'checkpoints',
                                         every=config.meta.checkpoint_every)
  state, resumed = checkpointer.restore_or(state)
  start = int(state.step)
  metrics_path = workdir / METRICS
  _truncate_metrics(metrics_path, start)

  runner = parallel.MetaStepRunner(
      functools.partial(_build_meta_step, family, meta_optimizer, config, solver_options),
      config.meta.meta_batch_size, config.meta.num_devices)
  is_writer = jax.process_index() == 0  # only process 0 writes logs and artifacts
  device_state = runner.to_devices(state)
  key = jax.random.key(config.seed)
  total = config.meta.num_meta_steps
  log = open(metrics_path, 'a') if is_writer else None
  bar = tqdm.tqdm(total=total, initial=start, desc='meta-train',
                  disable=not (progress and is_writer), dynamic_ncols=True)
  if resumed:
    bar.write(f'resumed from meta-step {start} ({checkpointer.directory})')
  try:
    for step in range(start, total):
      task_params = meta_train_lib.sample_tasks(family, key, step,
                                                config.meta.meta_batch_size)
      started = time.perf_counter()
      device_state, metrics = runner.step(device_state, task_params)
      record = {'step': step + 1, **metrics, 'seconds': time.perf_counter() - started}
      if log is not None:
        log.write(json.dumps(record) + '\n')
        log.flush()
      bar.set_postfix(meta_loss=f"{record['meta_loss']:.4g}",
                      final_loss=f"{record['final_loss']:.4g}")
      bar.update()
      if checkpointer.should_save(step + 1):
        checkpointer.save(step + 1, runner.to_host(device_state))
  finally:
    bar.close()
    if log is not None:
      log.close()
  state = runner.to_host(device_state)
  if checkpointer.latest_step() != int(state.step):
    checkpointer.save(int(state.step), state, force=True)
  checkpointer.close()
  if is_writer and (int(state.skipped_updates) or int(state.dropped_tasks)):
    print(f'meta-training skipped {int(state.skipped_updates)} non-finite meta-gradients and '
          f'dropped {int(state.dropped_tasks)} diverged inner runs.')
  # 'best': the divergence with the lowest smoothed inner training loss (early stopping on
  # training data, see metamd_jax.meta_train); 'last': the final meta-iterate.
  chosen = state.best_divergence if config.meta.select == 'best' else state.divergence
  if is_writer and config.meta.select == 'best':
    print(f'selected the divergence of the lowest smoothed inner training loss '
          f'({float(state.best_score):.4g}; last {float(state.score):.4g}).')
  divergence = jax.tree.map(jax.numpy.asarray, chosen)
  if is_writer:
    metamd_jax.save_divergence(workdir / ARTIFACT, divergence, family.init_params(),
                               config=config)
  return divergence
