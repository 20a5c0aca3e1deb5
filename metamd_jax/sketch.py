"""Frequent-directions sketches of one side of Shampoo's statistics.

Shampoo's side statistic ``L_t = sum_tau G_tau G_tau^T`` of an ``m x n`` leaf is ``m x m``,
and each refresh of its inverse fourth root is an ``m x m`` symmetric eigendecomposition
(``m^3``): on a 784-pixel input layer that eigendecomposition costs more than a whole
training step. A frequent-directions sketch (Liberty 2013; Ghashami, Liberty, Phillips &
Woodruff 2016), as Sketchy (Feinberg, Chen, Sun, Anil & Hazan 2023) applies it to
Shampoo, keeps instead an ``m x r`` matrix ``B_t`` and a scalar ``rho_t``, the *escaped
mass*, and stands for

.. math::

  \\hat L_t = B_t B_t^T + \\rho_t I.

Update. With ``C = [B_{t-1}, G_t]`` (``m x (r + n)``) and ``C C^T = sum_i w_i u_i u_i^T``
(``w`` in decreasing order, from the eigendecomposition of the small Gram matrix
``C^T C``),

.. math::

  \\delta_t = w_{r+1}, \\qquad B_t = \\big[\\sqrt{w_i - \\delta_t}\\, u_i\\big]_{i \\le r},
  \\qquad \\rho_t = \\rho_{t-1} + \\delta_t.

Every direction ``i > r`` has ``w_i <= delta_t``, so

.. math::

  \\hat L_t = \\sum_{i \\le r} w_i u_i u_i^T + \\delta_t \\big(I - \\sum_{i \\le r} u_i
  u_i^T\\big) + \\rho_{t-1} I \\succeq C C^T + \\rho_{t-1} I = \\hat L_{t-1} + G_t G_t^T :

the sketch never decreases, and ``hat L_t >= L_t`` (by induction from ``hat L_0 = 0``).
Directions whose ``w_i`` is at rounding level (fewer than ``r`` directions seen so far)
are not kept; ``delta_t`` is then raised to the largest of them, so the inequality above
holds as stated.

Root. ``hat L_t`` has eigenvalues ``w_i - delta_t + rho_t`` along the ``u_i`` and
``rho_t`` on their complement, so, with ``k`` the other side's size (the statistic as a
mean, as :func:`metamd_jax.statistics.scale_by_kronecker_statistics` takes it) and the same
damping ``lambda = epsilon + relative_epsilon * lambda_max``,

.. math::

  (\\hat L_t / k + \\lambda I)^{-1/4} = c^{-1/4} I + \\sum_{i \\le r}
  \\big((\\hat\\ell_i + \\lambda)^{-1/4} - c^{-1/4}\\big) u_i u_i^T, \\qquad
  c = \\rho_t / k + \\lambda,

applied to a matrix in ``2 m r n`` flops, without forming an ``m x m`` matrix.

Cost per step of an ``m x n`` leaf's sketched side: the Gram matrix (``m (r + n)^2``), one
eigendecomposition of ``r + n`` rows, the new basis (``m (r + n) r``) and the root's two
thin products (``2 m r n``), against Shampoo's ``2 m^2 n`` for the statistic and the
root's product, plus ``m^3`` at each refresh. The root is exact for the sketch at every
step: no refresh schedule is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metamd_jax.types import Array

__all__ = ['SketchRoot', 'SketchState', 'apply_root', 'init', 'inverse_fourth_root', 'update']

# Directions of the Gram matrix below this fraction of its largest eigenvalue are at the
# rounding level of float32 (their u_i = C v_i / sqrt(w_i) would be noise) and are not kept.
_RELATIVE_TOLERANCE = 1e-6


class SketchState(NamedTuple):
  """A frequent-directions sketch ``hat L = B B^T + rho I`` of an ``m x m`` statistic.

  Attributes:
    basis: ``B``, ``(m, r)``, orthogonal columns (zero columns allowed).
    escaped: ``rho >= 0``, ``()``: the mass the sketch dropped, added back as ``rho I``.
  """

  basis: Array
  escaped: Array


class SketchRoot(NamedTuple):
  """``c^{-1/4} I + U diag(weights) U^T``: the damped inverse fourth root of a sketch.

  Attributes:
    vectors: ``U``, ``(m, r)``, orthonormal columns (zero columns allowed).
    weights: ``(r,)``, ``(ell_i + lambda)^{-1/4} - c^{-1/4}`` (0 on a zero column).
    identity: ``c^{-1/4}``, ``()``.
  """

  vectors: Array
  weights: Array
  identity: Array


def init(size: int, rank: int, dtype) -> SketchState:
  """An empty sketch (``hat L = 0``) of a ``size x size`` statistic, of rank ``rank``."""
  return SketchState(basis=jnp.zeros((size, rank), dtype), escaped=jnp.zeros((), dtype))


def update(state: SketchState, columns: Array, *,
           eigh: Callable[[Array], tuple[Array, Array]] = jnp.linalg.eigh
           ) -> tuple[SketchState, Array, Array]:
  """Add ``columns @ columns.T`` to the sketch.

  Args:
    state: the sketch of ``L_{t-1}``.
    columns: ``(m, n)``: ``G`` for a left side, ``G^T`` for a right one.
    eigh: the symmetric eigendecomposition (ascending eigenvalues), e.g. one that runs a
      vmapped batch one matrix at a time.

  Returns:
    ``(state, vectors, values)``: the sketch of ``L_t``, and its ``r`` directions ``U``
    (orthonormal, zero where none is kept) with their eigenvalues ``w_i - delta_t``
    (``hat L_t`` is ``U diag(values + rho_t) U^T + rho_t (I - U U^T)``). Not
    differentiated (a derivative treats the statistics as constants).
  """
  basis = jax.lax.stop_gradient(state.basis)
  columns = jax.lax.stop_gradient(columns).astype(basis.dtype)
  width = columns.shape[1]
  stacked = jnp.concatenate([basis, columns], axis=1)
  gram = stacked.T @ stacked
  values, vectors = eigh((gram + gram.T) / 2)  # ascending, r + n of them
  values = jnp.maximum(values, 0)
  top, top_vectors = values[width:], vectors[:, width:]
  kept = top > _RELATIVE_TOLERANCE * values[-1]
  # delta: the largest direction not kept (the (r+1)-th, or one at rounding level).
  delta = jnp.maximum(values[width - 1], jnp.max(jnp.where(kept, 0, top)))
  inverse_sqrt = jnp.where(kept, jax.lax.rsqrt(jnp.where(kept, top, 1)), 0)
  directions = stacked @ (top_vectors * inverse_sqrt)
  shrunk = jnp.where(kept, top - delta, 0)
  new_state = SketchState(basis=directions * jnp.sqrt(shrunk),
                          escaped=jax.lax.stop_gradient(state.escaped) + delta)
  return new_state, directions, shrunk


def inverse_fourth_root(vectors: Array, values: Array, escaped: Array, other_size: int,
                        epsilon: float, relative_epsilon: float) -> SketchRoot:
  """``(hat L / k + (epsilon + rho lambda_max(hat L / k)) I)^{-1/4}`` of a sketch.

  Args:
    vectors, values: the directions and eigenvalues :func:`update` returns.
    escaped: the sketch's ``rho``.
    other_size: ``k``, the other side's size: the statistic is taken as a mean.
    epsilon, relative_epsilon: the damping, as in
      :func:`metamd_jax.statistics.scale_by_kronecker_statistics`.
  """
  means = (values + escaped) / other_size
  rest = escaped / other_size
  floor = epsilon + relative_epsilon * jnp.maximum(jnp.max(means), rest)
  identity = (rest + floor) ** -0.25
  weights = jnp.where(values > 0, (means + floor) ** -0.25 - identity, 0)
  return SketchRoot(vectors=vectors, weights=weights, identity=identity)


def apply_root(root: SketchRoot, matrix: Array, side: str) -> Array:
  """``root @ matrix`` (``side='left'``, ``matrix`` ``(m, n)``) or ``matrix @ root``
  (``side='right'``, ``matrix`` ``(n, m)``), in ``2 m r n`` flops."""
  u = root.vectors
  if side == 'left':
    return root.identity * matrix + u @ (root.weights[:, None] * (u.T @ matrix))
  return root.identity * matrix + ((matrix @ u) * root.weights) @ u.T
