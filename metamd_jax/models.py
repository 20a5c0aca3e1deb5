"""Flax models for the task families: MLP, small CNN and a small ResNet."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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
