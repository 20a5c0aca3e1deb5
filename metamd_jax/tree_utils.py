"""Trees: a divergence (a pytree of per-leaf metrics) paired with trees of arrays, the
library's dataclasses registered as pytrees, states with each buffer once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import serialization

from metamd_jax.types import PyTree


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _describe(paths) -> str:
  shown = ', '.join(jax.tree_util.keystr(p) for p in list(paths)[:5])
  return shown + (', ...' if len(paths) > 5 else '')


def matching_leaves(
    divergence: PyTree,
    tree: PyTree,
    *,
    is_leaf: Callable[[Any], bool],
    name: str = 'params',
) -> list:
  """The leaves of ``tree``, one per divergence node, after checking that they match.

  ``tree`` must have the structure the divergence was built for and the same leaf shapes
  (read from ``.shape``, so abstract ``jax.ShapeDtypeStruct`` leaves work); leaves that
  are ``optax.MaskedNode`` (from ``optax.masked``) are accepted as they are. Nothing is
  computed.

  Raises:
    ValueError: naming the leaf path (and both shapes) where ``tree`` does not match.
  """
  nodes_with_path, treedef = jax.tree_util.tree_flatten_with_path(divergence, is_leaf=is_leaf)
  leaves_with_path, tree_def = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  if tree_def != treedef:
    div_paths = {p for p, _ in nodes_with_path}
    tree_paths = {p for p, _ in leaves_with_path}
    only_div = sorted(div_paths - tree_paths, key=str)
    only_tree = sorted(tree_paths - div_paths, key=str)
    detail = []
    if only_div:
      detail.append(f'leaves only in the divergence: {_describe(only_div)}')
    if only_tree:
      detail.append(f'leaves only in {name}: {_describe(only_tree)}')
    if not detail:
      detail.append(f'divergence structure {treedef} vs {name} structure {tree_def}')
    raise ValueError(
        f'{name} do not have the structure the divergence was built for; '
        + '; '.join(detail) + '.')
  for (path, node), (_, leaf) in zip(nodes_with_path, leaves_with_path):
    if _is_masked(leaf):
      continue
    shape = tuple(getattr(leaf, 'shape', ()))
    if shape != tuple(node.shape):
      raise ValueError(
          f'{name} leaf {jax.tree_util.keystr(path)} has shape {shape} but the '
          f'divergence was built for shape {tuple(node.shape)}.')
  return [leaf for _, leaf in leaves_with_path]


def map_metrics(
    fn: Callable[..., Any],
    divergence: PyTree,
    *trees: PyTree,
    is_leaf: Callable[[Any], bool],
    name: str = 'params',
) -> PyTree:
  """``fn(node, *leaves)`` for each divergence node and the matching leaves of ``trees``.

  Every tree is checked with :func:`matching_leaves` first; a node where any tree has an
  ``optax.MaskedNode`` passes the first tree's leaf through.

  Raises:
    ValueError: naming the leaf path (and both shapes) where a tree does not match.
  """
  nodes, treedef = jax.tree_util.tree_flatten(divergence, is_leaf=is_leaf)
  flat_trees = [matching_leaves(divergence, tree, is_leaf=is_leaf, name=name)
                for tree in trees]
  outputs = []
  for i, node in enumerate(nodes):
    leaves = [flat[i] for flat in flat_trees]
    if any(_is_masked(leaf) for leaf in leaves):
      outputs.append(leaves[0])
    else:
      outputs.append(fn(node, *leaves))
  return jax.tree_util.tree_unflatten(treedef, outputs)


def unaliased(tree: PyTree) -> PyTree:
  """``tree`` with every concrete array that appears in it more than once copied, so that
  each leaf has its own buffer: a state passed to ``jax.jit(..., donate_argnums=...)`` may
  not hold one buffer twice (an optimiser's ``init`` that starts two fields at the same
  zeros would otherwise fail at its first donated step)."""
  seen = set()

  def one(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      if id(x) in seen:
        return jnp.copy(x)
      seen.add(id(x))
    return x

  return jax.tree.map(one, tree)


def register_dataclass(cls: type, data_fields: list[str], meta_fields: list[str]) -> None:
  """Register a frozen dataclass of the library (a metric, an operator) as a JAX pytree
  (``data_fields`` the leaves, ``meta_fields`` static) and with flax's serialization, so
  that an optimiser state holding it is saved like optax's own (``flax.serialization``,
  a flax ``TrainState``)."""
  jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)

  def to_state_dict(value):
    return {name: serialization.to_state_dict(getattr(value, name)) for name in data_fields}

  def from_state_dict(target, state):
    return dataclasses.replace(target, **{
        name: serialization.from_state_dict(getattr(target, name), state[name], name=name)
        for name in data_fields})

  serialization.register_serialization_state(cls, to_state_dict, from_state_dict)

