"""Tasks (one training problem) and task families (distributions over tasks)."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from metamd_jax.types import PyTree

Batch = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """One training problem, as pure functions that can be traced, vmapped and scanned.

  Attributes:
    init: ``() -> params``, this task's initial parameters.
    loss: ``(params, batch) -> scalar`` training loss.
    batch: ``(step) -> batch``, the training batch of inner step ``step`` (an int32
      scalar); its batch order is part of the task.
    evaluate: optional ``(params) -> dict`` of metrics on the task's held-out data.
    run_batches: optional ``(num_steps) -> (step -> batch)``: ``batch`` for the steps
      ``[0, num_steps)`` of one run, sampled once for the whole run (e.g. one permutation
      per epoch where ``batch`` draws one at every step; a task may return ``batch``
      itself for a run too long to precompute). Same batches as ``batch``;
      :func:`batches_of` picks it when present.
  """

  init: Callable[[], PyTree]
  loss: Callable[[PyTree, Batch], jax.Array]
  batch: Callable[[jax.Array], Batch]
  evaluate: Callable[[PyTree], dict] | None = None
  run_batches: Callable[[int], Callable[[jax.Array], Batch]] | None = None


def check_num_steps(num_steps: Any, name: str = 'num_steps') -> int:
  """``num_steps`` as an ``int`` if it is a whole number >= 1 (``3`` or ``3.0``; not a bool,
  a string or a fraction).

  Raises:
    ValueError: naming ``name`` and the value otherwise.
  """
  try:
    whole = (not isinstance(num_steps, (bool, np.bool_, str, bytes))
             and np.ndim(num_steps) == 0 and float(num_steps).is_integer()
             and num_steps >= 1)
  except (TypeError, ValueError):  # None, a container, a traced value
    whole = False
  if not whole:
    raise ValueError(f'{name} must be a positive integer, got {num_steps!r}.')
  return int(num_steps)


def batches_of(task: Task, num_steps: int) -> Callable[[jax.Array], Batch]:
  """``step -> batch`` for a run of ``num_steps`` steps: ``task.run_batches(num_steps)``
  when the task has it, else ``task.batch``. Call it inside the traced run, once, before
  its loop."""
  return task.batch if task.run_batches is None else task.run_batches(int(num_steps))


class TaskFamily(abc.ABC):
  """A distribution over tasks of one architecture.

  ``sample(key)`` returns the *task parameters*: a pytree of arrays (data subset,
  classes, initialisation and batch-order keys) so that a meta-batch of tasks is a
  stacked pytree that ``vmap`` and ``pmap`` can split; ``task(task_params)`` builds the
  :class:`Task` inside a traced function.

  ``dimension_numbers`` says how the model's leaves are viewed as matrices (the
  ``dimension_numbers`` argument of :func:`metamd_jax.init_divergence`); ``None``, the
  default, keeps :func:`metamd_jax.divergence.default_axes` for every leaf.
  """

  dimension_numbers: Any = None

  @abc.abstractmethod
  def sample(self, key: jax.Array) -> PyTree:
    """Task parameters of a random task."""

  @abc.abstractmethod
  def task(self, task_params: PyTree) -> Task:
    """The task with these task parameters."""

  def sample_batch(self, key: jax.Array, num_tasks: int) -> PyTree:
    """Stacked task parameters of ``num_tasks`` random tasks.

    Raises:
      ValueError: if ``num_tasks`` is not an integer >= 0 (0: an empty stack).
    """
    if isinstance(num_tasks, (bool, np.bool_)) or not isinstance(
        num_tasks, (int, np.integer)) or num_tasks < 0:
      raise ValueError(f'num_tasks must be an int >= 0, got {num_tasks!r}.')
    return jax.vmap(self.sample)(jax.random.split(key, num_tasks))

  def count_tasks(self, task_params: PyTree) -> int:
    """How many tasks stacked task parameters hold (:meth:`sample_batch`'s layout).

    Raises:
      ValueError: if ``task_params`` has another tree than :meth:`sample`'s, or naming a
        leaf that is not one task's leaf with a leading axis (e.g. one task's parameters,
        not stacked), or leaves whose leading axes differ.
    """
    one = jax.eval_shape(self.sample, jax.random.key(0))
    if jax.tree.structure(task_params) != jax.tree.structure(one):
      raise ValueError(f'task_params have the tree {jax.tree.structure(task_params)}, not '
                       f'that of the family\'s task parameters {jax.tree.structure(one)}.')
    sizes = set()
    for (path, leaf), single in zip(jax.tree_util.tree_leaves_with_path(task_params),
                                    jax.tree.leaves(one)):
      shape = tuple(getattr(leaf, 'shape', ()))
      if len(shape) != len(single.shape) + 1 or shape[1:] != tuple(single.shape):
        raise ValueError(
            f'task_params{jax.tree_util.keystr(path)} has the shape {shape}; stacked tasks '
            f'have (num_tasks,) + {tuple(single.shape)} (sample_batch, or '
            'metamd_jax.evaluation.tuning_tasks, stacks them).')
      sizes.add(shape[0])
    if len(sizes) > 1:
      raise ValueError(f'task_params leaves stack different numbers of tasks: {sorted(sizes)}.')
    count = sizes.pop() if sizes else 0
    if count < 1:
      raise ValueError('task_params hold no task.')
    return count

  def init_params(self) -> PyTree:
    """Parameters of one task, used to build a divergence with the right structure."""
    return self.task(self.sample(jax.random.key(0))).init()

  def param_shapes(self) -> PyTree:
    """:meth:`init_params` as ``jax.ShapeDtypeStruct`` leaves, traced but not run.

    Enough wherever only the structure matters (:func:`metamd_jax.init_divergence`,
    :func:`metamd_jax.artifact.check_compatible`), and far cheaper outside ``jax.jit``:
    running :meth:`init_params` eagerly compiles each of its operations.
    """
    return jax.eval_shape(self.init_params)
