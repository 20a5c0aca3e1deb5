"""What the benchmarks run on: a model's initial parameters and a perturbed divergence."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import metamd_jax
from metamd_jax.types import PyTree


def init_params(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> PyTree:
  """The model's initial parameters for float32 inputs of ``input_shape`` (no batch axis)."""
  return model.init(jax.random.key(seed), jnp.zeros((1, *input_shape), jnp.float32))['params']


def perturbed_divergence(params: PyTree, learning_rate: float = 0.1, scale: float = 0.1,
                         seed: int = 1) -> PyTree:
  """``init_divergence(params, learning_rate)`` with every meta-parameter mildly perturbed.

  A dense raw factor ``gap * I`` becomes ``gap * I + scale * N / sqrt(d)`` (dense and well
  conditioned, so random training runs stay finite); diagonal and scalar raw factors get
  ``scale * N`` added (``N`` standard normal). ``L = A A^T + eps I`` stays positive definite
  whatever ``A`` is.
  """
  base = metamd_jax.init_divergence(params, learning_rate)
  leaves, treedef = jax.tree_util.tree_flatten(base)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for key, leaf in zip(keys, leaves):
    noise = jax.random.normal(key, leaf.shape, leaf.dtype)
    if leaf.ndim == 2:
      noise = noise / math.sqrt(leaf.shape[0])
    out.append(leaf + scale * noise)
  return jax.tree_util.tree_unflatten(treedef, out)
