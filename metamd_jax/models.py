"""Flax models for the task families: MLP, small CNN, a small ResNet and a byte-level
decoder-only transformer (with the Kronecker views of its leaves)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metamd_jax.divergence import KroneckerAxes


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs."""

  hidden_sizes: Sequence[int] = (256, 256)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Small convolutional network (conv-relu-pool blocks, then a dense head)."""

  channels: Sequence[int] = (16, 32)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 2:  # (batch, length) sequences such as MNIST-1D: one channel, 1-D convs.
      x = x[..., None]
    window = (3,) * (x.ndim - 2)
    pool = (2,) * (x.ndim - 2)
    for width in self.channels:
      x = nn.relu(nn.Conv(width, window)(x))
      x = nn.avg_pool(x, pool, strides=pool)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
  """Pre-activation residual block without batch statistics (LayerNorm)."""

  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x
    y = nn.relu(nn.LayerNorm()(x))
    y = nn.Conv(self.channels, (3, 3), strides=self.strides)(y)
    y = nn.relu(nn.LayerNorm()(y))
    y = nn.Conv(self.channels, (3, 3))(y)
    if shortcut.shape != y.shape:
      shortcut = nn.Conv(self.channels, (1, 1), strides=self.strides)(shortcut)
    return shortcut + y


class ResNet(nn.Module):
  """A small ResNet (one block per stage) for 32x32 images such as CIFAR-10."""

  stage_channels: Sequence[int] = (16, 32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.stage_channels[0], (3, 3))(x)
    for i, width in enumerate(self.stage_channels):
      x = ResidualBlock(width, strides=1 if i == 0 else 2)(x)
    x = nn.relu(nn.LayerNorm()(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm decoder block: causal multi-head self-attention, then a GELU MLP."""

  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    width = x.shape[-1]
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, use_bias=False,
                                            name='attention')(y, mask=mask)
    y = nn.LayerNorm()(x)
    y = nn.gelu(nn.Dense(self.mlp_ratio * width, name='mlp_in')(y))
    return x + nn.Dense(width, name='mlp_out')(y)


class TransformerLM(nn.Module):
  """Decoder-only transformer language model over bytes (GPT-style, pre-LayerNorm).

  Token embedding plus a learned position embedding, ``depth`` blocks of causal
  multi-head attention and an MLP, a final LayerNorm and an untied output head. Maps
  ``(batch, length)`` integer tokens, ``length <= context``, to ``(batch, length,
  vocab_size)`` next-token logits.
  """

  vocab_size: int = 256
  context: int = 64
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    if length > self.context:
      raise ValueError(f'sequence length {length} exceeds the context {self.context}')
    x = nn.Embed(self.vocab_size, self.width, name='embedding')(tokens)
    positions = self.param('position', nn.initializers.normal(0.02),
                           (self.context, self.width))
    x = x + positions[:length]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.depth):
      x = TransformerBlock(self.num_heads, self.mlp_ratio, name=f'block_{i}')(x, mask)
    x = nn.LayerNorm(name='final_norm')(x)
    return nn.Dense(self.vocab_size, name='head')(x)


def transformer_axes(path: tuple, leaf) -> KroneckerAxes | None:
  """Kronecker views of :class:`TransformerLM` leaves (``dimension_numbers`` callable).

  Attention ``query``/``key``/``value`` kernels ``(width, heads, head_dim)`` are viewed
  as ``width x (heads * head_dim)`` (rows: the input features). Every other leaf keeps
  :func:`metamd_jax.divergence.default_axes` (``None``): the attention ``out`` kernel
  ``(heads, head_dim, width)`` is ``(heads * head_dim) x width``, dense kernels
  ``in x out``, the embedding table ``vocab x width``, the position table
  ``context x width``, LayerNorm scales and biases one factor over their length.
  """
  names = [getattr(entry, 'key', getattr(entry, 'name', None)) for entry in path]
  if (len(leaf.shape) == 3 and len(names) >= 2 and names[-1] == 'kernel'
      and names[-2] in ('query', 'key', 'value')):
    return KroneckerAxes(rows=(0,), cols=(1, 2))
  return None
