"""Meta-training checkpoints with orbax-checkpoint."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """Save a meta-training state every ``every`` steps and restore the latest one.

  Saving is atomic (orbax writes to a temporary directory and renames it), so a run
  killed mid-save resumes from the previous complete checkpoint. In a multi-process job
  every process calls :meth:`save` and :meth:`restore`; orbax has process 0 write.

  Args:
    directory: where checkpoints live (created if missing).
    every: save when ``step % every == 0`` (and always when ``force=True``).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, every: int, max_to_keep: int = 2):
    if every < 1:
      raise ValueError(f'checkpoint interval must be >= 1, got {every}.')
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=every,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Save ``state`` at ``step`` if the interval says so (or ``force``)."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, like: PyTree, step: int | None = None) -> PyTree:
    """Restore the checkpoint at ``step`` (latest if ``None``) into the structure of ``like``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_or(self, state: PyTree) -> tuple[PyTree, bool]:
    """``(latest checkpoint, True)`` if there is one, else ``(state, False)``."""
    if self.latest_step() is None:
      return state, False
    return self.restore(state), True

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
