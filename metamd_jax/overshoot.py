"""The overshoot check: a secant test that shortens a step which passed its minimum.

The online scales of adaptive MetaMD react to the size of the gradients; they do not see
a learned step that is too long for the curvature it meets, which passes the minimum
along its own direction and makes the loss rise. Per leaf, the slopes along the last
direction ``d_{t-1}`` before and after the step give the secant ratio ``rho_t`` of two
moving averages, and the direction is divided by the non-decreasing factor
``sigma_t = min(c, sigma_{t-1} max(1, 1 - rho_t))`` (:func:`check`). Where and why it is
used, and the guarantee it keeps (``sigma_t`` never decreases, so neither does the
metric), are in :mod:`metamd_jax.blended`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metamd_jax import adaptive, tree_utils
from metamd_jax.types import Array, PyTree

__all__ = [
    'SCOPES',
    'OvershootState',
    'check',
    'check_cap',
    'check_decay',
    'init',
]

SCOPES = ('learned', 'step')
"""What the overshoot check shortens: the learned half, or the whole blended step."""


class OvershootState(NamedTuple):
  """State of the overshoot check (:func:`check`).

  Attributes:
    previous: ``d_{t-1}``, the last direction the check shortened (the learned half's, or
      the whole step's with ``overshoot_scope='step'``; after ``sigma``), like the
      parameters.
    slope: ``<g_{t-1}, d_{t-1}>``, float32 ``(L,)``, one per leaf in ``jax.tree.leaves``
      order.
    after: the moving average of ``<g_t, d_{t-1}>``, float32 ``(L,)`` (0 at ``init``).
    before: the moving average of ``<g_{t-1}, d_{t-1}>``, float32 ``(L,)``.
    scale: ``sigma_t >= 1``, float32 ``(L,)``: the learned half (or the whole step) is
      divided by it.

  At ``init`` the last direction and every average are 0, so the first step has no slope
  and keeps ``sigma = 1``.
  """

  previous: PyTree
  slope: Array
  after: Array
  before: Array
  scale: Array


def check_decay(overshoot_decay: Any) -> float | None:
  """Validate ``overshoot_decay``: ``None`` (no overshoot check) or a float in ``[0, 1)``.

  Raises:
    TypeError: if it is not ``None`` or a real number (a bool is not one).
    ValueError: if it is outside ``[0, 1)`` or NaN.
  """
  if overshoot_decay is None:
    return None
  if isinstance(overshoot_decay, bool) or not isinstance(overshoot_decay, (int, float)):
    raise TypeError(f'overshoot_decay must be None (no overshoot check) or a float in '
                    f'[0, 1), got {overshoot_decay!r}.')
  if not 0 <= overshoot_decay < 1:
    raise ValueError(f'overshoot_decay must be in [0, 1) (0: the last step alone), got '
                     f'{overshoot_decay!r}.')
  return float(overshoot_decay)


def check_cap(overshoot_cap: Any) -> float | None:
  """Validate ``overshoot_cap``: ``None`` or ``inf`` (no cap) or a float ``>= 1``.

  Returns ``None`` for no cap.

  Raises:
    TypeError: if it is not ``None`` or a real number (a bool is not one).
    ValueError: if it is below 1 or NaN.
  """
  if overshoot_cap is None:
    return None
  if isinstance(overshoot_cap, bool) or not isinstance(overshoot_cap, (int, float)):
    raise TypeError(f'overshoot_cap must be None (no cap) or a float >= 1, got '
                    f'{overshoot_cap!r}.')
  if not overshoot_cap >= 1:
    raise ValueError(f'overshoot_cap must be >= 1 (the largest factor by which the check '
                     f'shortens the learned half; None or inf: no cap), got '
                     f'{overshoot_cap!r}.')
  return None if math.isinf(overshoot_cap) else float(overshoot_cap)


def _leaf_dots(a: PyTree, b: PyTree) -> Array:
  """``<a_l, b_l>`` per leaf, float32 ``(L,)``."""
  return jnp.stack([jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])


def init(params: PyTree) -> OvershootState:
  """The check's state before the first step: no last direction, ``sigma = 1``."""
  zeros = jnp.zeros((len(jax.tree.leaves(params)),), jnp.float32)
  return tree_utils.unaliased(OvershootState(
      previous=jax.tree.map(jnp.zeros_like, params), slope=zeros, after=zeros, before=zeros,
      scale=jnp.ones_like(zeros)))


def check(grads: PyTree, direction: PyTree, state: OvershootState,
                     decay: float, cap: float | None = None) -> tuple[PyTree, OvershootState]:
  """``direction`` divided by ``sigma_t`` per leaf, and the new state.

  Args:
    grads: the gradient ``g_t``.
    direction: the direction to check (the learned half's, or the whole step's), like
      ``grads``.
    state: the check's state (:func:`init`).
    decay: ``beta`` in ``[0, 1)``, the moving averages' decay (:func:`check_decay`).
    cap: ``None`` or the largest ``sigma`` (:func:`check_cap`).
  """
  after = decay * state.after + (1 - decay) * _leaf_dots(grads, state.previous)
  before = decay * state.before + (1 - decay) * state.slope
  # A non-finite gradient (or a non-finite last direction) leaves the averages and sigma
  # as they were.
  finite = jnp.isfinite(after) & jnp.isfinite(before)
  after = jnp.where(finite, after, state.after)
  before = jnp.where(finite, before, state.before)
  # rho = after / before: the same weights on both sums, so no bias correction. A leaf
  # whose last direction had no slope (a zero gradient) keeps its scale.
  usable = finite & (before > 0) & (state.slope > 0)
  ratio = jnp.where(usable, after / jnp.where(usable, before, 1.0), 0.0)
  ratio = jnp.where(jnp.isfinite(ratio), ratio, 0.0)
  scale = state.scale * jnp.maximum(1.0, 1.0 - ratio)
  if cap is not None:  # still non-decreasing: the last scale is at most the cap
    scale = jnp.minimum(scale, cap)
  direction = adaptive.divide_leaves(grads, direction, scale)
  slope = _leaf_dots(grads, direction)
  return direction, OvershootState(previous=direction,
                                   slope=jnp.where(jnp.isfinite(slope), slope, 0.0),
                                   after=after, before=before, scale=scale)
