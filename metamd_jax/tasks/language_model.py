"""Byte-level language-model task families over a :class:`metamd_jax.text.Text`.

A task is "train ``model`` from its own random initialisation on its own contiguous
slice of the training text, with its own order of minibatch windows". The task
parameters are only keys and the slice's start; the text is a device constant shared by
every task, so a vmapped meta-batch gathers its windows from one copy.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax.divergence import DimensionNumbers
from metamd_jax.tasks.base import Task, TaskFamily
from metamd_jax.tasks.classification import as_typed_key
from metamd_jax.text import Text
from metamd_jax.types import PyTree

__all__ = ['LanguageModelFamily']


def _is_int(value) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _evenly_spaced(first: int, last: int, count: int) -> np.ndarray:
  """``count`` int32 positions from ``first`` to ``last`` (inclusive), evenly spaced."""
  return np.round(np.linspace(first, last, count)).astype(np.int32)


class LanguageModelFamily(TaskFamily):
  """Tasks that train a next-byte model on a random slice of a text.

  Task parameters (``sample(key)``), a dict of plain arrays:

  * ``'init_key'``: ``uint32`` key data of the model initialisation,
  * ``'order_key'``: ``uint32`` key data of the window order,
  * ``'start'``: int32 offset of the task's slice, ``slice_size`` bytes of ``train``.

  The task (``task(task_params)``):

  * ``init()``: ``model.init(init_key, tokens[:1])['params']``;
  * ``batch(step)``: ``(x, y)``, ``batch_size`` windows of ``context + 1`` bytes at
    uniformly random offsets inside the slice (drawn from ``fold_in(order_key, step)``),
    ``x`` the first ``context`` bytes, ``y`` the next-byte targets (int32);
  * ``loss(params, (x, y))``: mean next-byte cross-entropy in nats;
  * ``evaluate(params)``: ``'train_loss'`` (and ``'train_bits_per_byte'``) on
    ``eval_windows`` evenly spaced windows covering the slice and, when ``test`` is
    given, ``'test_loss'`` and ``'test_bits_per_byte'`` on ``test_windows`` evenly
    spaced windows of the test text (the same for every task).

  Args:
    train: the text task slices are cut from.
    test: held-out evaluation text (``None``: no test metrics).
    model: a flax module mapping ``(batch, context)`` int tokens to ``(batch, context,
      256)`` logits (e.g. :class:`metamd_jax.models.TransformerLM`).
    batch_size: windows per minibatch.
    context: tokens per window (the model's input length).
    slice_size: bytes of text per task, ``context + 1 <= slice_size <= len(train)``.
    eval_windows: windows of the slice behind ``'train_loss'``.
    test_windows: windows of ``test`` behind the test metrics.
    dimension_numbers: Kronecker views of the model's leaves (e.g.
      :func:`metamd_jax.models.transformer_axes`); pass ``family.dimension_numbers`` to
      :func:`metamd_jax.init_divergence`.

  Raises:
    ValueError: on a bad argument; the message names it.
  """

  def __init__(self, train: Text, test: Text | None, model: nn.Module, batch_size: int,
               context: int, slice_size: int, eval_windows: int = 32,
               test_windows: int = 64, dimension_numbers: DimensionNumbers = None) -> None:
    if not isinstance(train, Text):
      raise ValueError(f'train must be a metamd_jax.text.Text, got {type(train).__name__}')
    if test is not None and not isinstance(test, Text):
      raise ValueError(f'test must be a Text or None, got {type(test).__name__}')
    if not isinstance(model, nn.Module):
      raise ValueError(f'model must be a flax.linen.Module, got {type(model).__name__}')
    for name, value in (('batch_size', batch_size), ('context', context),
                        ('slice_size', slice_size), ('eval_windows', eval_windows),
                        ('test_windows', test_windows)):
      if not _is_int(value) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    if not context + 1 <= slice_size <= len(train):
      raise ValueError(
          f'slice_size must satisfy context + 1 ({context + 1}) <= slice_size <= the '
          f'training text length ({len(train)} bytes of {train.name!r}), got {slice_size}')
    if test is not None and len(test) < context + 1:
      raise ValueError(f'the test text {test.name!r} has {len(test)} bytes, fewer than '
                       f'context + 1 ({context + 1})')
    model_context = getattr(model, 'context', None)
    if model_context is not None and int(model_context) < context:
      raise ValueError(f'the model context ({model_context}) is shorter than context '
                       f'({context})')
    self.train, self.test, self.model = train, test, model
    self.batch_size, self.context = int(batch_size), int(context)
    self.slice_size, self.eval_windows = int(slice_size), int(eval_windows)
    self.test_windows = int(test_windows)
    self.dimension_numbers = dimension_numbers
    self._train = jnp.asarray(train.tokens)
    self._test = None if test is None else jnp.asarray(test.tokens)
    self._window = jnp.arange(self.context + 1, dtype=jnp.int32)
    # Offsets inside a slice of the windows behind 'train_loss'; of the test windows.
    self._eval_offsets = jnp.asarray(
        _evenly_spaced(0, self.slice_size - self.context - 1, self.eval_windows))
    self._test_offsets = None if test is None else jnp.asarray(
        _evenly_spaced(0, len(test) - self.context - 1, self.test_windows))

  def sample(self, key: jax.Array) -> dict[str, jax.Array]:
    """Task parameters of a random task (see the class docstring)."""
    init_key, order_key, start_key = jax.random.split(as_typed_key(key), 3)
    start = jax.random.randint(start_key, (), 0, len(self.train) - self.slice_size + 1)
    return {'init_key': jax.random.key_data(init_key),
            'order_key': jax.random.key_data(order_key),
            'start': start.astype(jnp.int32)}

  def _windows(self, tokens: jax.Array, starts: jax.Array) -> tuple[jax.Array, jax.Array]:
    windows = jnp.take(tokens, starts[:, None] + self._window, axis=0).astype(jnp.int32)
    return windows[:, :-1], windows[:, 1:]

  def logits(self, params: PyTree, x: jax.Array) -> jax.Array:
    """The model's next-byte logits."""
    return self.model.apply({'params': params}, x)

  def _loss(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(self.logits(params, x), y))

  def task(self, task_params: dict[str, jax.Array]) -> Task:
    """The task with these task parameters (traceable; see the class docstring)."""
    init_key = jax.random.wrap_key_data(task_params['init_key'])
    order_key = jax.random.wrap_key_data(task_params['order_key'])
    start = task_params['start']

    def init() -> PyTree:
      return self.model.init(init_key, jnp.zeros((1, self.context), jnp.int32))['params']

    def batch(step: jax.Array) -> tuple[jax.Array, jax.Array]:
      offsets = jax.random.randint(jax.random.fold_in(order_key, step), (self.batch_size,),
                                   0, self.slice_size - self.context)
      return self._windows(self._train, start + offsets)

    def loss(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
      return self._loss(params, *batch)

    def evaluate(params: PyTree) -> dict[str, jax.Array]:
      train_loss = self._loss(params, *self._windows(self._train, start + self._eval_offsets))
      metrics = {'train_loss': train_loss, 'train_bits_per_byte': train_loss / math.log(2)}
      if self._test is not None:
        test_loss = self._loss(params, *self._windows(self._test, self._test_offsets))
        metrics.update(test_loss=test_loss, test_bits_per_byte=test_loss / math.log(2))
      return metrics

    return Task(init=init, loss=loss, batch=batch, evaluate=evaluate)
