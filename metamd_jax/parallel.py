"""All device mapping: collectives that are no-ops outside ``pmap``.

Per-task maths (tasks, objectives, the meta-step) is written once, device-agnostic; it
calls these helpers with an ``axis_name`` that is ``None`` on a single device.
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


def psum_if_pmap(tree: PyTree, axis_name: str | None) -> PyTree:
  """``lax.psum`` over ``axis_name`` inside ``pmap``; the identity when it is ``None``."""
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def pmean_if_pmap(tree: PyTree, axis_name: str | None) -> PyTree:
  """``lax.pmean`` over ``axis_name`` inside ``pmap``; the identity when it is ``None``."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)
