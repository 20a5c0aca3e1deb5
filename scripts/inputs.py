"""What the benchmarks run on: a model's initial parameters and a perturbed divergence.

Also the byte-level transformer language model of ``configs/transformer_lm.py`` (its sizes
in :data:`TRANSFORMER`, the same flags in both benchmark scripts to shrink them).
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import metamd_jax
from metamd_jax import models
from metamd_jax.divergence import DimensionNumbers
from metamd_jax.types import PyTree

TRANSFORMER = {'context': 64, 'width': 64, 'depth': 2, 'num_heads': 4}
"""The sizes of ``configs/transformer_lm.py`` (``task.context``, ``width``, ``depth``,
``num_heads``): bytes per window, model width, blocks, attention heads."""
TRANSFORMER_WINDOWS = 8
"""Windows (of ``context`` bytes) per minibatch: ``task.batch_size`` of that config."""
TRANSFORMER_HORIZON = 50
"""Its inner horizon ``meta.horizon``."""
TRANSFORMER_SLICE_SIZE = 32768
"""Bytes of text per task: its ``task.slice_size``."""
TRANSFORMER_LEARNING_RATE = 0.3
"""Its ``meta.init_learning_rate``: the SGD rate the initial divergence reproduces."""


def init_params(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0,
                dtype=jnp.float32) -> PyTree:
  """The model's initial parameters for inputs of ``input_shape`` (no batch axis).

  ``dtype``: of the (zero) example input; an integer dtype for token models. The
  initialisation is jitted: one compilation instead of one per operation and shape.
  """
  init = jax.jit(model.init)
  return init(jax.random.key(seed), jnp.zeros((1, *input_shape), dtype))['params']


def perturbed_divergence(params: PyTree, learning_rate: float = 0.1, scale: float = 0.1,
                         seed: int = 1, dimension_numbers: DimensionNumbers = None) -> PyTree:
  """``init_divergence(params, learning_rate)`` with every meta-parameter mildly perturbed.

  A dense raw factor ``gap * I`` becomes ``gap * I + scale * N / sqrt(d)`` (dense and well
  conditioned, so random training runs stay finite); diagonal and scalar raw factors get
  ``scale * N`` added (``N`` standard normal, from numpy: no compilation per leaf shape).
  ``L = A A^T + eps I`` stays positive definite whatever ``A`` is. ``dimension_numbers``
  is passed to ``init_divergence`` (e.g. :func:`metamd_jax.models.transformer_axes`).
  """
  base = metamd_jax.init_divergence(params, learning_rate, dimension_numbers=dimension_numbers)
  leaves, treedef = jax.tree_util.tree_flatten(base)
  rng = np.random.default_rng(seed)
  out = []
  for leaf in leaves:
    noise = jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
    if leaf.ndim == 2:
      noise = noise / math.sqrt(leaf.shape[0])
    out.append(leaf + scale * noise)
  return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------
# The transformer language model.
# ---------------------------------------------------------------------------


def add_transformer_flags(parser: argparse.ArgumentParser) -> None:
  """``--context``, ``--width``, ``--depth``, ``--heads``: the transformer's sizes."""
  group = parser.add_argument_group('transformer (defaults: configs/transformer_lm.py)')
  group.add_argument('--context', type=int, default=TRANSFORMER['context'],
                     help='bytes per window (the model\'s input length)')
  group.add_argument('--width', type=int, default=TRANSFORMER['width'], help='model width')
  group.add_argument('--depth', type=int, default=TRANSFORMER['depth'],
                     help='transformer blocks')
  group.add_argument('--heads', type=int, default=TRANSFORMER['num_heads'],
                     help='attention heads (must divide --width)')


def transformer(args: argparse.Namespace) -> models.TransformerLM:
  """The :class:`metamd_jax.models.TransformerLM` of the flags of :func:`add_transformer_flags`."""
  if args.width % args.heads:
    raise ValueError(f'--heads ({args.heads}) must divide --width ({args.width})')
  return models.TransformerLM(context=args.context, width=args.width, depth=args.depth,
                              num_heads=args.heads)


def transformer_params(model: models.TransformerLM, seed: int = 0) -> PyTree:
  """Initial parameters of the transformer (int32 byte tokens of ``model.context``)."""
  return init_params(model, (model.context,), seed, dtype=jnp.int32)


def transformer_divergence(params: PyTree) -> PyTree:
  """The perturbed divergence of the transformer, its attention kernels as
  ``width x (heads * head_dim)`` matrices (:func:`metamd_jax.models.transformer_axes`)."""
  return perturbed_divergence(params, TRANSFORMER_LEARNING_RATE,
                              dimension_numbers=models.transformer_axes)


def describe_transformer(model: models.TransformerLM, size: int) -> str:
  """``'TransformerLM context 64, width 64, depth 2, 4 heads, <size> parameters'``."""
  return (f'TransformerLM context {model.context}, width {model.width}, depth {model.depth}, '
          f'{model.num_heads} heads, {size} parameters')
