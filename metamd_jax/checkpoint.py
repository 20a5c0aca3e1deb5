"""Meta-training checkpoints with orbax-checkpoint: the state and the metric history."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from metamd_jax.types import PyTree


class Checkpointer:
  """Save a meta-training state (and its metric history) every ``every`` steps.

  A checkpoint holds two items: ``state`` (any pytree of arrays, restored bit for bit into
  the structure of a template) and ``history`` (a JSON list of per-step metric records),
  so a resumed run returns the same history as an uninterrupted one. Saving is atomic
  (orbax writes to a temporary directory and renames it), so a run killed mid-save
  resumes from the previous complete checkpoint. In a multi-process job every process
  calls :meth:`save` and :meth:`restore`; orbax has process 0 write.

  Args:
    directory: where checkpoints live (created if missing).
    every: save when ``step % every == 0`` (and always when ``force=True``).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, every: int, max_to_keep: int = 2):
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f'checkpoint interval must be an integer >= 1, got {every!r}.')
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=every,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: PyTree, history: list[dict] | None = None, *,
           force: bool = False) -> bool:
    """Save ``state`` and ``history`` at ``step`` if the interval says so (or ``force``)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              history=ocp.args.JsonSave(list(history or [])))
    return self._manager.save(step, args=args, force=force)

  def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, list[dict]]:
    """``(state, history)`` of the checkpoint at ``step`` (latest if ``None``); the state
    takes the structure, shapes and dtypes of ``like``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}.')
    items = set(os.listdir(os.path.join(self.directory, str(step))))
    if not {'state', 'history'} <= items:
      raise ValueError(
          f'the checkpoint {os.path.join(self.directory, str(step))} has items {sorted(items)}, '
          "not 'state' and 'history': it was written by an older version of metamd_jax; "
          'meta-train in a new workdir.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      history=ocp.args.JsonRestore()))
    return restored.state, list(restored.history)

  def restore_intact(self, like: PyTree) -> tuple[PyTree, list[dict], list[tuple[int, str]]]:
    """The latest checkpoint that restores: ``(state, history, skipped)``, with
    ``skipped`` the later checkpoints that did not (``(step, error)``, latest first: a
    damaged or half-written folder), so a run resumes from the one before.

    Raises:
      FileNotFoundError: if there is no checkpoint.
      ValueError: if none restores, with the latest one's error (e.g. checkpoints of
        another meta-training state, or of an older version).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}.')
    skipped = []
    for step in steps:
      try:
        state, history = self.restore(like, step)
      except Exception as error:  # noqa: BLE001 (orbax and tensorstore raise plain Exception)
        skipped.append((step, f'{type(error).__name__}: {str(error).splitlines()[0][:300]}'))
        continue
      return state, history, skipped
    first = skipped[0][1]
    raise ValueError(f'no checkpoint in {self.directory} restores (steps '
                     f'{[step for step, _ in skipped]}); the latest: {first}')

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
