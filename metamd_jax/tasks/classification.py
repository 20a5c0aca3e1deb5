"""Image/sequence classification task families over an in-memory :class:`Dataset`.

A task is "train ``model`` from its own random initialisation on its own random subset
of the training pool, with its own batch order". The task parameters are only keys and
subset indices; the data arrays are device constants shared by every task, so a vmapped
meta-batch of task parameters gathers minibatches from one copy of the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax.datasets import Dataset
from metamd_jax.tasks.base import Task, TaskFamily
from metamd_jax.types import PyTree

__all__ = ['RUN_INDICES_LIMIT', 'ClassificationFamily', 'as_typed_key', 'epoch_batch_indices',
           'epoch_run_batches', 'epoch_run_indices']


# --------------------------------------------------------------------------------------
# Helpers shared with the other task families.
# --------------------------------------------------------------------------------------


def as_typed_key(key: jax.Array) -> jax.Array:
  """A typed PRNG key from either a typed key or raw ``uint32`` key data.

  Args:
    key: A key from ``jax.random.key`` or raw key data (e.g. ``jax.random.PRNGKey``).

  Returns:
    The typed key (the same object when ``key`` is already typed).
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def epoch_batch_indices(
  order_key: jax.Array, step: jax.Array, num_examples: int, batch_size: int
) -> jax.Array:
  """Positions in ``[0, num_examples)`` of minibatch ``step`` of a shuffled example stream.

  The stream concatenates one random permutation of ``range(num_examples)`` per epoch
  (epoch ``e`` uses ``fold_in(order_key, e)``); minibatch ``step`` is stream positions
  ``[step * batch_size, (step + 1) * batch_size)``. Every epoch (every ``num_examples``
  consecutive stream positions starting at a multiple of ``num_examples``) therefore
  visits each example exactly once; when ``batch_size`` does not divide ``num_examples``
  a minibatch may straddle two epochs. Traceable in ``step`` (``jit``/``scan`` friendly),
  overflow-free for any int32 ``step``.

  Args:
    order_key: Typed PRNG key of the batch order.
    step: Integer scalar (may be traced), the minibatch number (>= 0).
    num_examples: Static number of examples ``n``.
    batch_size: Static minibatch size, ``1 <= batch_size <= n``.

  Returns:
    ``(batch_size,)`` int32 positions.
  """
  n, b = int(num_examples), int(batch_size)
  step = jnp.asarray(step, jnp.int32)
  if n % b == 0:  # Minibatches never straddle epochs: one permutation per step.
    per_epoch = n // b
    perm = jax.random.permutation(jax.random.fold_in(order_key, step // per_epoch), n)
    return jax.lax.dynamic_slice_in_dim(perm, (step % per_epoch) * b, b)
  # step * b = epoch * n + offset, computed without forming step * b (int32 overflow).
  epoch = (step // n) * b + ((step % n) * b) // n
  offset = ((step % n) * b) % n
  positions = offset + jnp.arange(b, dtype=jnp.int32)
  in_next = positions >= n
  positions = jnp.where(in_next, positions - n, positions)
  current = jax.random.permutation(jax.random.fold_in(order_key, epoch), n)
  following = jax.random.permutation(jax.random.fold_in(order_key, epoch + 1), n)
  return jnp.where(in_next, jnp.take(following, positions), jnp.take(current, positions))


RUN_INDICES_LIMIT = 2**24
"""The most minibatch rows (``num_steps * batch_size``) whose positions a task's
``run_batches`` precomputes (64 MB of int32); a longer run keeps ``batch(step)``."""


def epoch_run_indices(
  order_key: jax.Array, num_steps: int, num_examples: int, batch_size: int
) -> jax.Array:
  """The positions of minibatches ``0 .. num_steps - 1`` of :func:`epoch_batch_indices`'
  stream, all at once: row ``s`` equals ``epoch_batch_indices(order_key, s, ...)``.

  One permutation per epoch the run reaches (``ceil(num_steps * batch_size /
  num_examples)``), where :func:`epoch_batch_indices` draws one (or two, when a minibatch
  straddles two epochs) at every step: a run's batches cost a gather per step.

  Args:
    order_key: Typed PRNG key of the batch order.
    num_steps: Static number of steps ``>= 0``.
    num_examples: Static number of examples ``n``.
    batch_size: Static minibatch size, ``1 <= batch_size <= n``.

  Returns:
    ``(num_steps, batch_size)`` int32 positions.
  """
  n, b = int(num_examples), int(batch_size)
  if not _is_int(num_steps) or num_steps < 0:
    raise ValueError(f'num_steps must be an int >= 0, got {num_steps!r}')
  steps = int(num_steps)
  epochs = max(1, -(-steps * b // n))
  keys = jax.vmap(lambda e: jax.random.fold_in(order_key, e))(jnp.arange(epochs, dtype=jnp.int32))
  stream = jax.vmap(lambda key: jax.random.permutation(key, n))(keys).reshape(-1)
  return stream[:steps * b].reshape(steps, b).astype(jnp.int32)


def epoch_run_batches(
  order_key: jax.Array, num_steps: int, num_examples: int, batch_size: int, x: jax.Array,
  y: jax.Array, fallback: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
  rows: jax.Array | None = None,
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """``step -> (x, y)`` minibatches of a run of ``num_steps`` steps of
  :func:`epoch_batch_indices`' stream, their positions drawn once
  (:func:`epoch_run_indices`): a task's ``run_batches``.

  Args:
    order_key, num_steps, num_examples, batch_size: as :func:`epoch_run_indices`.
    x, y: the arrays the minibatches gather rows of.
    fallback: the task's per-step ``batch``, returned for a run of more than
      :data:`RUN_INDICES_LIMIT` rows (its positions would take too much memory).
    rows: maps a position to a row of ``x`` and ``y`` (a task's subset of a pool), or
      ``None`` (the positions are the rows).
  """
  if num_steps * batch_size > RUN_INDICES_LIMIT:
    return fallback
  indices = epoch_run_indices(order_key, num_steps, num_examples, batch_size)
  if rows is not None:
    indices = jnp.take(rows, indices)

  def batch_of_run(step: jax.Array) -> tuple[jax.Array, jax.Array]:
    idx = indices[step]
    return jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)

  return batch_of_run


def _is_int(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _l2_term(params: PyTree, l2: float) -> jax.Array:
  return 0.5 * l2 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------
# The family.
# --------------------------------------------------------------------------------------


class ClassificationFamily(TaskFamily):
  """Tasks that train a flax classifier on a random subset of a dataset.

  Task parameters (``sample(key)``), a dict of plain arrays:

  * ``'init_key'``: ``uint32`` key data of the model initialisation,
  * ``'order_key'``: ``uint32`` key data of the batch order,
  * ``'subset'``: ``(subset_size,)`` int32 indices into ``train``, distinct, drawn without
    replacement (the whole pool, in order, when ``subset_size`` is ``None``).

  The task (``task(task_params)``):

  * ``init()``: ``model.init(init_key, train.x[:1])['params']``;
  * ``batch(step)``: ``(x, y)``, minibatch ``step`` of the subset in a stream of
    per-epoch random permutations (:func:`epoch_batch_indices`): each epoch visits
    every subset example exactly once, the order is reshuffled every epoch, and
    ``batch_size`` need not divide ``subset_size``;
  * ``loss(params, (x, y))``: mean softmax cross-entropy, plus
    ``l2 / 2 * ||params||^2`` when ``l2 > 0``;
  * ``evaluate(params)``: ``{'train_loss', 'train_accuracy'}`` on the whole subset and,
    when ``test`` is given, ``{'test_loss', 'test_accuracy'}`` on the whole test set.
    The losses are the cross-entropy only; with ``l2 > 0`` ``'train_objective'`` (the
    cross-entropy plus the ``l2`` term, i.e. ``loss`` on the whole subset) is added.
    Evaluation runs in chunks of ``eval_batch_size`` examples (``lax.map``).

  Everything in :meth:`task` is traceable in the task parameters, so it can be built
  inside ``jit``/``vmap``.

  Args:
    train: The training pool.
    test: Held-out data for ``evaluate`` (``None``: no test metrics).
    model: A flax module mapping ``(batch, *input_shape)`` to ``(batch, num_classes)``
      logits; its ``num_classes`` must equal ``train.num_classes``.
    batch_size: Minibatch size, ``1 <= batch_size <= subset_size``.
    subset_size: Number of training examples per task; ``None`` uses the whole pool.
      Must satisfy ``batch_size <= subset_size <= len(train)``.
    l2: Non-negative weight-decay coefficient of the training loss.
    eval_batch_size: Chunk size of ``evaluate``; ``None`` evaluates in one pass.

  Raises:
    ValueError: On a bad argument; the message names it.
  """

  def __init__(
    self,
    train: Dataset,
    test: Dataset | None,
    model: nn.Module,
    batch_size: int,
    subset_size: int | None = None,
    l2: float = 0.0,
    eval_batch_size: int | None = 1024,
  ) -> None:
    if not isinstance(train, Dataset):
      raise ValueError(f'train must be a Dataset, got {type(train).__name__}')
    if len(train) < 1:
      raise ValueError(f'train dataset {train.name!r} is empty')
    if test is not None:
      if not isinstance(test, Dataset):
        raise ValueError(f'test must be a Dataset or None, got {type(test).__name__}')
      if len(test) < 1:
        raise ValueError(f'test dataset {test.name!r} is empty')
      if test.num_classes != train.num_classes:
        raise ValueError(
          f'test.num_classes ({test.num_classes}) != train.num_classes ({train.num_classes})'
        )
      if test.input_shape != train.input_shape:
        raise ValueError(
          f'test input shape {test.input_shape} != train input shape {train.input_shape}'
        )
    if not isinstance(model, nn.Module):
      raise ValueError(f'model must be a flax.linen.Module, got {type(model).__name__}')
    if not _is_int(batch_size) or batch_size < 1:
      raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
    pool = len(train)
    if subset_size is None:
      subset_size = pool
    elif not _is_int(subset_size):
      raise ValueError(f'subset_size must be an int or None, got {subset_size!r}')
    if not batch_size <= subset_size <= pool:
      raise ValueError(
        f'subset_size must satisfy batch_size ({batch_size}) <= subset_size <= pool size '
        f'({pool}, dataset {train.name!r}), got {subset_size}'
      )
    if isinstance(l2, bool) or not isinstance(l2, int | float | np.floating | np.integer):
      raise ValueError(f'l2 must be a float, got {l2!r}')
    if not (math.isfinite(float(l2)) and float(l2) >= 0.0):
      raise ValueError(f'l2 must be finite and >= 0, got {l2!r}')
    if eval_batch_size is not None and (not _is_int(eval_batch_size) or eval_batch_size < 1):
      raise ValueError(f'eval_batch_size must be a positive int or None, got {eval_batch_size!r}')

    self.train = train
    self.test = test
    self.model = model
    self.batch_size = int(batch_size)
    self.subset_size = int(subset_size)
    self.l2 = float(l2)
    self.eval_batch_size = None if eval_batch_size is None else int(eval_batch_size)
    # Device constants shared by every task (closed over, never vmapped).
    self._train_x = jnp.asarray(train.x)
    self._train_y = jnp.asarray(train.y)
    self._test_x = None if test is None else jnp.asarray(test.x)
    self._test_y = None if test is None else jnp.asarray(test.y)
    self._check_model_classes()

  def _check_model_classes(self) -> None:
    model_classes = getattr(self.model, 'num_classes', None)
    if model_classes is None:  # No attribute: read the width of the logits.
      out = jax.eval_shape(
        lambda: self.model.apply(
          self.model.init(jax.random.key(0), self._train_x[:1]), self._train_x[:1]
        )
      )
      model_classes = out.shape[-1]
    if int(model_classes) != self.train.num_classes:
      raise ValueError(
        f'model num_classes ({model_classes}) does not match the dataset num_classes '
        f'({self.train.num_classes}, dataset {self.train.name!r})'
      )

  @property
  def num_classes(self) -> int:
    """Number of classes of the dataset (and of the model's logits)."""
    return self.train.num_classes

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example, ``train.x.shape[1:]``."""
    return self.train.input_shape

  def sample(self, key: jax.Array) -> dict[str, jax.Array]:
    """Task parameters of a random task (see the class docstring).

    Args:
      key: A typed key (``jax.random.key``) or raw key data (``jax.random.PRNGKey``);
        both spellings of the same seed give the same task.

    Returns:
      ``{'init_key', 'order_key', 'subset'}``, plain arrays.
    """
    init_key, order_key, subset_key = jax.random.split(as_typed_key(key), 3)
    pool = len(self.train)
    if self.subset_size == pool:
      subset = jnp.arange(pool, dtype=jnp.int32)
    else:
      subset = jax.random.choice(subset_key, pool, (self.subset_size,), replace=False)
    return {
      'init_key': jax.random.key_data(init_key),
      'order_key': jax.random.key_data(order_key),
      'subset': subset.astype(jnp.int32),
    }

  def batch_indices(self, task_params: dict[str, jax.Array], step: jax.Array) -> jax.Array:
    """Indices into ``train`` of minibatch ``step`` of the task (traceable in both)."""
    order_key = jax.random.wrap_key_data(task_params['order_key'])
    positions = epoch_batch_indices(order_key, step, self.subset_size, self.batch_size)
    return jnp.take(task_params['subset'], positions)

  def logits(self, params: PyTree, x: jax.Array) -> jax.Array:
    """The model's logits."""
    return self.model.apply({'params': params}, x)

  def _cross_entropy(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(self.logits(params, x), y)

  def _metrics(
    self, params: PyTree, x: jax.Array, y: jax.Array, indices: jax.Array | None
  ) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy on ``x[indices]`` (all of ``x`` if ``None``)."""
    n = int(x.shape[0] if indices is None else indices.shape[0])
    chunk = n if self.eval_batch_size is None else min(self.eval_batch_size, n)

    def sums(idx, mask):
      bx = x if idx is None else jnp.take(x, idx, axis=0)
      by = y if idx is None else jnp.take(y, idx, axis=0)
      logits = self.logits(params, bx)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, by)
      correct = (jnp.argmax(logits, axis=-1) == by).astype(ce.dtype)
      return jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(jnp.where(mask, correct, 0.0))

    if chunk == n:
      total_ce, total_correct = sums(indices, True)
    else:
      idx = jnp.arange(n, dtype=jnp.int32) if indices is None else indices
      num_chunks = -(-n // chunk)
      pad = num_chunks * chunk - n
      idx = jnp.concatenate([idx, jnp.zeros((pad,), jnp.int32)]).reshape(num_chunks, chunk)
      mask = (jnp.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk)
      per_chunk = jax.lax.map(lambda args: sums(*args), (idx, mask))
      total_ce, total_correct = (jnp.sum(s) for s in per_chunk)
    return total_ce / n, total_correct / n

  def task(self, task_params: dict[str, jax.Array]) -> Task:
    """The task with these task parameters (traceable; see the class docstring)."""
    init_key = jax.random.wrap_key_data(task_params['init_key'])
    subset = task_params['subset']

    def init() -> PyTree:
      return self.model.init(init_key, self._train_x[:1])['params']

    def batch(step: jax.Array) -> tuple[jax.Array, jax.Array]:
      idx = self.batch_indices(task_params, step)
      return jnp.take(self._train_x, idx, axis=0), jnp.take(self._train_y, idx, axis=0)

    def run_batches(num_steps: int):
      return epoch_run_batches(jax.random.wrap_key_data(task_params['order_key']), num_steps,
                               self.subset_size, self.batch_size, self._train_x,
                               self._train_y, batch, rows=subset)

    def loss(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
      x, y = batch
      value = jnp.mean(self._cross_entropy(params, x, y))
      if self.l2 > 0.0:
        value = value + _l2_term(params, self.l2)
      return value

    def evaluate(params: PyTree) -> dict[str, jax.Array]:
      train_loss, train_accuracy = self._metrics(params, self._train_x, self._train_y, subset)
      metrics = {'train_loss': train_loss, 'train_accuracy': train_accuracy}
      if self.l2 > 0.0:
        metrics['train_objective'] = train_loss + _l2_term(params, self.l2)
      if self._test_x is not None:
        test_loss, test_accuracy = self._metrics(params, self._test_x, self._test_y, None)
        metrics.update(test_loss=test_loss, test_accuracy=test_accuracy)
      return metrics

    return Task(init=init, loss=loss, batch=batch, evaluate=evaluate,
                run_batches=run_batches)
