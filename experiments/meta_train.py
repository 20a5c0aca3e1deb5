"""Meta-training from a config: checkpointed, resumable, with a progress bar and metrics."""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import ml_collections
import numpy as np
import tqdm

import metamd_jax
from experiments import builders
from metamd_jax import checkpoint
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

  meta_step = jax.jit(meta_train_lib.make_meta_step(
      family, meta_optimizer, num_steps=config.meta.horizon, objective=config.meta.objective,
      solver=config.meta.solver, solver_options=solver_options))
  key = jax.random.key(config.seed)
  total = config.meta.num_meta_steps
  with open(metrics_path, 'a') as log, tqdm.tqdm(
      total=total, initial=start, desc='meta-train', disable=not progress,
      dynamic_ncols=True) as bar:
    if resumed:
      bar.write(f'resumed from meta-step {start} ({checkpointer.directory})')
    for step in range(start, total):
      task_params = meta_train_lib.sample_tasks(family, key, step,
                                                config.meta.meta_batch_size)
      started = time.perf_counter()
      state, metrics = meta_step(state, task_params)
      record = {'step': step + 1, **{k: float(np.asarray(v)) for k, v in metrics.items()},
                'seconds': time.perf_counter() - started}
      log.write(json.dumps(record) + '\n')
      log.flush()
      bar.set_postfix(meta_loss=f"{record['meta_loss']:.4g}",
                      final_loss=f"{record['final_loss']:.4g}")
      bar.update()
      checkpointer.save(step + 1, state)
  if checkpointer.latest_step() != int(state.step):
    checkpointer.save(int(state.step), state, force=True)
  checkpointer.close()
  if int(state.skipped_updates) or int(state.dropped_tasks):
    print(f'meta-training skipped {int(state.skipped_updates)} non-finite meta-gradients and '
          f'dropped {int(state.dropped_tasks)} diverged inner runs.')
  metamd_jax.save_divergence(workdir / ARTIFACT, state.divergence, family.init_params(),
                             config=config)
  return state.divergence
