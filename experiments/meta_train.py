"""Meta-training from a config: the config's arguments to :func:`metamd_jax.meta_train.fit`.

Writes to the workdir ``metrics.jsonl`` (one line per meta-step, from the trainer's
callback), orbax checkpoints (the trainer's; rerunning resumes) and the kept divergence
as the artifact ``divergence.npz``. Only the writing process (``parallel.is_writer``)
writes the log and the artifact.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_collections

import metamd_jax
from experiments import builders
from metamd_jax import meta_train as meta_train_lib
from metamd_jax import parallel

ARTIFACT = 'divergence.npz'
METRICS = 'metrics.jsonl'


class MetricsLog:
  """Appends metric records to a JSON-lines file as meta-training runs.

  On the first record it drops the logged records from that step on (a resumed run
  redoes the meta-steps after its last checkpoint), so the file always ends up with one
  line per meta-step. A last line cut short (a launch killed while writing it) is of a
  step after the last checkpoint and is dropped too; a damaged line before it is an error
  naming it.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self._started = False
    self._logged = self._read() if self.path.exists() else []

  def _read(self) -> list[tuple[int, str]]:
    """``(step, line)`` of each logged record; checked before any meta-step runs."""
    lines = [line for line in self.path.read_text().splitlines() if line.strip()]
    logged = []
    for number, line in enumerate(lines, start=1):
      try:
        logged.append((int(json.loads(line)['step']), line))
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        if number == len(lines):
          break  # cut short by a kill mid-write: a step the resumed run redoes
        raise ValueError(f'{self.path} line {number} is not a metric record ({error}); '
                         'move the file aside to log afresh.') from error
    return logged

  def __call__(self, record: dict) -> None:
    if not self._started:
      self._started = True
      kept = [line for step, line in self._logged if step < record['step']]
      self.path.write_text(''.join(line + '\n' for line in kept))
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')


# Fields a resumed run may change: they do not change its meta-steps (where the data
# files are, what it is evaluated on, how long it runs and how it is checkpointed).
RESUMABLE_FIELDS = {'task': ('data_dir', 'eval_dataset', 'eval_classes', 'eval_text'),
                    'meta': ('num_meta_steps', 'checkpoint_every', 'select', 'num_devices')}


def run_info(config: ml_collections.ConfigDict) -> dict:
  """What of ``config`` defines a meta-training run (``fit``'s ``run_info``, compared when
  a workdir's checkpoints are resumed): the seed, the task and the meta-training settings
  but :data:`RESUMABLE_FIELDS`."""
  return {'seed': config.seed, **{
      section: {k: v for k, v in config[section].to_dict().items()
                if k not in RESUMABLE_FIELDS[section]} for section in ('task', 'meta')}}


def meta_train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               *, progress: bool = True) -> meta_train_lib.FitResult:
  """Meta-train the divergence of ``config`` in ``workdir``; resume if checkpoints exist.

  Raises:
    ValueError: on a bad config, checkpoints another run wrote (another seed, task or
      meta-training setting than :func:`run_info`'s), or a workdir that holds an artifact
      but no checkpoints to resume.

  Returns:
    The trainer's :class:`metamd_jax.meta_train.FitResult` (``.divergence`` is the
    divergence kept by ``config.meta.select``, also saved as ``workdir/divergence.npz``).
  """
  builders.validate_config(config)
  solver_options = builders.build_solver_options(config)
  workdir = pathlib.Path(workdir)
  checkpoints = workdir / 'checkpoints'
  if (workdir / ARTIFACT).exists() and not (checkpoints.is_dir() and any(
      path.name.isdigit() for path in checkpoints.iterdir())):
    raise ValueError(f'{workdir} holds the {ARTIFACT} of a run whose checkpoints are gone: '
                     'meta-training would start afresh and replace it. Use a new workdir, or '
                     f'move {ARTIFACT} aside.')
  workdir.mkdir(parents=True, exist_ok=True)
  family, _ = builders.build_families(config)
  meta = config.meta
  writer = parallel.is_writer()
  result = meta_train_lib.fit(
      family, builders.build_divergence(config, family), builders.build_meta_optimizer(config),
      num_meta_steps=meta.num_meta_steps, horizon=meta.horizon,
      meta_batch_size=meta.meta_batch_size, key=jax.random.key(config.seed), workdir=workdir,
      checkpoint_every=meta.checkpoint_every, select=meta.select, objective=meta.objective,
      adjoint=meta.adjoint, solver=meta.solver, solver_options=solver_options,
      score_decay=meta.score_decay, num_devices=meta.num_devices,
      callback=MetricsLog(workdir / METRICS) if writer else None, progress=progress,
      run_info=run_info(config))
  state = result.state
  if writer:
    if int(state.skipped_updates) or int(state.dropped_tasks):
      print(f'meta-training skipped {int(state.skipped_updates)} non-finite meta-gradients '
            f'and dropped {int(state.dropped_tasks)} diverged inner runs.')
    if meta.select == 'best':
      print(f'selected the divergence of meta-step {int(state.best_step)}, the lowest smoothed '
            f'inner training loss ({float(state.best_score):.4g}; last {float(state.score):.4g}).')
    metamd_jax.save_divergence(workdir / ARTIFACT, result.divergence, family.param_shapes(),
                               config=config)
  return result


def learned_divergence(workdir: str | os.PathLike, family, divergence=None):
  """``divergence``, or else the artifact ``workdir/divergence.npz``, checked against the
  parameters of ``family``'s model (:func:`metamd_jax.artifact.check_compatible`)."""
  if divergence is None:
    divergence, _ = metamd_jax.load_divergence(pathlib.Path(workdir) / ARTIFACT)
  metamd_jax.artifact.check_compatible(divergence, family.param_shapes())
  return divergence
