"""Frozen MetaMD with its long factors' inverses kept at low rank plus a level.

A learned Kronecker leaf steps ``-P G Q`` with ``P = L^{-1}`` of shape ``(m, m)``: on a
wide input layer (the MNIST MLP's 784 rows) the ``m^2 n`` product is most of a step's
cost. With ``P = sum_i p_i v_i v_i^T`` (``p_1 >= ... >= p_m``), this keeps the ``rank``
longest steps exactly and gives every other direction one level ``c``:

.. math::

  P' = c I + V_r (\\Lambda_r - c) V_r^\\top,

so a step costs ``4 m r n + m n`` flops instead of ``2 m^2 n``. ``P'`` is the inverse of
the positive-definite factor ``L' = V_r \\Lambda_r^{-1} V_r^\\top + c^{-1}(I - V_r
V_r^\\top)``: the optimiser is exactly mirror descent with the frozen Kronecker divergence
``R (x) L'``, so it keeps mirror descent's guarantee, with the bound of that divergence.
The level ``c`` (``fill``) decides how it compares with the learned one:

- ``'min'``: the smallest eigenvalue of ``P``. Then ``P' <= P``: no step is longer than
  the learned divergence's in any direction, ``L' >= L`` keeps its strong convexity, and
  every gradient term ``||g||^2_{M'^{-1}}`` of the bound is at most the learned one's.
- ``'mean'``: the mean of the dropped eigenvalues (the trace of ``P`` kept).
- ``'max'``: the largest dropped eigenvalue. Then ``P' >= P``: no step is shorter.

A factor of at most ``rank`` rows, a diagonal factor and an elementwise leaf are kept as
they are; with ``rank`` at least every factor's size the optimiser is :func:`metamd`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from metamd_jax import divergence as divergence_lib
from metamd_jax import transform, tree_utils
from metamd_jax.types import Array, PyTree

FILLS = ('min', 'mean', 'max')


@dataclasses.dataclass(frozen=True)
class LowRankInverse:
  """``P' = level I + basis diag(gains) basis^T``: an inverse factor at low rank.

  Attributes:
    basis: ``(m, r)``, orthonormal columns: the eigenvectors of the ``r`` longest steps.
    gains: ``(r,)``, their eigenvalues minus ``level``.
    level: ``()``, the eigenvalue every other direction gets.
  """

  basis: Array
  gains: Array
  level: Array

  @property
  def dtype(self):
    return self.basis.dtype

  def matmul(self, x: Array, side: str) -> Array:
    """``P' @ x`` (side='left') or ``x @ P'`` (side='right')."""
    if side == 'left':
      return self.level * x + self.basis @ (self.gains[:, None] * (self.basis.T @ x))
    return self.level * x + ((x @ self.basis) * self.gains[None, :]) @ self.basis.T

  def dense(self) -> Array:
    """``P'`` as an ``(m, m)`` matrix (for checks; a step never forms it)."""
    m = self.basis.shape[0]
    return (self.level * jnp.eye(m, dtype=self.dtype)
            + (self.basis * self.gains[None, :]) @ self.basis.T)


def _matmul(factor: Array | LowRankInverse, x: Array, side: str) -> Array:
  if isinstance(factor, LowRankInverse):
    return factor.matmul(x, side)
  return divergence_lib.factor_matmul(factor, x, side)


@dataclasses.dataclass(frozen=True)
class LowRankKroneckerOperator:
  """A Kronecker leaf's inverse factors, each dense, diagonal or :class:`LowRankInverse`.

  Attributes:
    left_inverse: ``P'`` (rows side).
    right_inverse: ``Q'`` (columns side).
    shape: shape of the parameter leaf (static).
    rows: axes of the leaf forming the matrix rows (static).
    cols: axes of the leaf forming the matrix columns (static).
  """

  left_inverse: Array | LowRankInverse
  right_inverse: Array | LowRankInverse
  shape: tuple[int, ...]
  rows: tuple[int, ...]
  cols: tuple[int, ...]

  def solve(self, x: Array) -> Array:
    """``M'^{-1} x = P' X Q'`` on the leaf's matrix view."""
    xm = divergence_lib.to_matrix(x.astype(self.left_inverse.dtype), self.shape, self.rows,
                                  self.cols)
    out = _matmul(self.right_inverse, _matmul(self.left_inverse, xm, 'left'), 'right')
    return divergence_lib.from_matrix(out, self.shape, self.rows, self.cols)


tree_utils.register_dataclass(LowRankInverse, data_fields=['basis', 'gains', 'level'],
                              meta_fields=[])
tree_utils.register_dataclass(LowRankKroneckerOperator,
                              data_fields=['left_inverse', 'right_inverse'],
                              meta_fields=['shape', 'rows', 'cols'])


def _is_operator(x) -> bool:
  return isinstance(x, (LowRankKroneckerOperator, divergence_lib.ElementwiseOperator))


def check_rank(rank) -> int:
  """``rank`` as an int >= 1; ``ValueError`` naming it otherwise."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f'rank must be an int >= 1, got {rank!r}.')
  return rank


def check_fill(fill) -> str:
  if fill not in FILLS:
    raise ValueError(f'fill must be one of {FILLS}, got {fill!r}.')
  return fill


def truncate_inverse(inverse: Array, rank: int, fill: str = 'min') -> Array | LowRankInverse:
  """A dense inverse factor longer than ``rank`` at rank ``rank`` plus a level (module
  docstring); a diagonal one, or one of at most ``rank`` rows, as it is."""
  check_rank(rank)
  check_fill(fill)
  if inverse.ndim != 2 or inverse.shape[0] <= rank:
    return inverse
  values, vectors = jnp.linalg.eigh(inverse)  # ascending
  dropped = values[:-rank]
  level = {'min': values[0], 'mean': jnp.mean(dropped), 'max': dropped[-1]}[fill]
  kept = values[-rank:]
  return LowRankInverse(basis=vectors[:, -rank:], gains=kept - level, level=level)


def low_rank_preconditioner(divergence: PyTree, rank: int, fill: str = 'min') -> PyTree:
  """:func:`metamd_jax.divergence.preconditioner` with every dense inverse factor longer
  than ``rank`` truncated (:func:`truncate_inverse`)."""
  check_rank(rank)
  check_fill(fill)
  return _low_rank_preconditioner(divergence, rank, fill)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _low_rank_preconditioner(divergence: PyTree, rank: int, fill: str) -> PyTree:
  # One compiled program per divergence structure, rank and fill, as
  # metamd_jax.divergence.operators: init calls it outside jax.jit.

  def truncate(operator):
    if not isinstance(operator, divergence_lib.KroneckerOperator):
      return operator
    return LowRankKroneckerOperator(
        left_inverse=truncate_inverse(operator.left_inverse, rank, fill),
        right_inverse=truncate_inverse(operator.right_inverse, rank, fill),
        shape=operator.shape, rows=operator.rows, cols=operator.cols)

  return jax.tree.map(truncate, divergence_lib.preconditioner(divergence),
                      is_leaf=divergence_lib.is_operator)


class ScaleByLowRankMirrorDescentState(NamedTuple):
  """State of :func:`scale_by_low_rank_mirror_descent`: the truncated inverse factors
  (:func:`low_rank_preconditioner`), computed once at ``init``."""

  preconditioner: PyTree


def scale_by_low_rank_mirror_descent(divergence: PyTree, rank: int, fill: str = 'min'
                                     ) -> optax.GradientTransformation:
  """:func:`metamd_jax.scale_by_mirror_descent` with the long factors at rank ``rank``.

  The inverse factors and their eigendecompositions are computed in ``init`` (for a
  concrete divergence once, when ``init`` is traced, as in
  :func:`metamd_jax.scale_by_mirror_descent`); each ``update`` is matrix products only.

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence` (learned or not).
    rank: the directions of each long dense factor kept exactly (an int >= 1).
    fill: the level of the other directions, one of :data:`FILLS` (module docstring).

  Returns:
    An ``optax.GradientTransformation``.
  """
  divergence_lib.check_divergence(divergence)
  check_rank(rank)
  check_fill(fill)

  def init_fn(params):
    divergence_lib.check_structure(divergence, params)
    with jax.ensure_compile_time_eval():
      preconditioner = low_rank_preconditioner(divergence, rank, fill)
    return ScaleByLowRankMirrorDescentState(preconditioner=preconditioner)

  def update_fn(updates, state, params=None):
    del params
    updates = tree_utils.map_metrics(lambda p, g: p.solve(g).astype(g.dtype),
                                     state.preconditioner, updates, is_leaf=_is_operator,
                                     name='updates')
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def low_rank_metamd(divergence: PyTree, rank: int, learning_rate: optax.ScalarOrSchedule = 1.0,
                    fill: str = 'min') -> optax.GradientTransformation:
  """Frozen MetaMD whose long factors step at rank ``rank`` plus a level (module docstring):
  ``-learning_rate * M'^{-1} g``.

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence`.
    rank: the directions of each dense factor longer than ``rank`` kept exactly.
    learning_rate: a positive float or an optax schedule; multiplies the step.
    fill: ``'min'`` (no step longer than the learned one's), ``'mean'`` or ``'max'``.

  Returns:
    An ``optax.GradientTransformation``.
  """
  transform.check_learning_rate(learning_rate)
  return optax.chain(scale_by_low_rank_mirror_descent(divergence, rank, fill),
                     optax.scale_by_learning_rate(learning_rate))
