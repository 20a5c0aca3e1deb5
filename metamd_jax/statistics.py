"""Online statistics of the gradients: the online half of blended MetaMD.

Each transform here maps a gradient to ``K_t^{-1} g`` with a metric ``K_t`` built from
the gradients seen so far, and ``K_t`` never decreases (Loewner order): the property the
adaptive-mirror-descent bound of :mod:`metamd_jax.blended` needs of its online half.

- :func:`scale_by_factored_statistics`: the diagonal of Shampoo's metric from the row and
  column sums of ``g^2`` (``m + n`` numbers per ``m x n`` leaf), as running sums
  (AdaGrad's rule, ``'sum'``) or running maxima of moving averages (AMSGrad's,
  ``'peak_average'``).
- :func:`scale_by_kronecker_statistics`: Shampoo's full Kronecker statistics, with their
  roots refreshed on a schedule and on growth, and three ways to cheapen a long side:
  its diagonal (beyond ``max_dimension``), diagonal blocks (``block_size``) or a
  frequent-directions sketch (``sketch_rank``, :mod:`metamd_jax.sketch`).
- :func:`statistics_prior`: Shampoo's statistics started from a past gradient mass
  instead of empty (the handover of :func:`metamd_jax.guarded_switch`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax import adaptive, sketch, tree_utils
from metamd_jax.types import Array, PyTree

__all__ = [
    'FACTORED_STATISTICS',
    'FactoredStatisticsState',
    'KroneckerStatisticsState',
    'check_block_size',
    'check_positive',
    'check_positive_int',
    'check_refresh_growth',
    'check_sketch_interval',
    'check_sketch_rank',
    'factored_denominator',
    'scale_by_factored_statistics',
    'scale_by_kronecker_statistics',
    'statistics_prior',
]

def check_positive(value: Any, name: str) -> None:
  """``ValueError`` naming ``name`` unless ``value`` is a positive finite number."""
  if not (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a positive finite float, got {value!r}.')


def check_positive_int(value: Any, name: str) -> None:
  """``ValueError`` naming ``name`` unless ``value`` is an int ``>= 1`` (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be an int >= 1, got {value!r}.')


def check_block_size(block_size: Any) -> int | None:
  """Validate ``block_size``: ``None`` (one block per side) or an int ``>= 1``.

  Raises:
    ValueError: naming ``block_size`` otherwise.
  """
  if block_size is not None:
    check_positive_int(block_size, 'block_size (None: one block per side)')
  return block_size


def check_sketch_rank(sketch_rank: Any, block_size: int | None = None) -> int | None:
  """Validate ``sketch_rank``: ``None`` (no sketch) or an int ``>= 1``, and not together
  with ``block_size`` (two ways to cheapen a long side: take one).

  Raises:
    ValueError: naming ``sketch_rank`` otherwise.
  """
  if sketch_rank is None:
    return None
  check_positive_int(sketch_rank, 'sketch_rank (None: no sketch)')
  if block_size is not None:
    raise ValueError(f'sketch_rank={sketch_rank!r} and block_size={block_size!r} are two '
                     'ways to cheapen a long side: set one of them (the other None).')
  return sketch_rank


def check_sketch_interval(sketch_interval: Any) -> int:
  """Validate ``sketch_interval``: an int ``>= 0`` (1: a merge at every step; ``j > 1``:
  every ``j`` steps; 0: at the sketched leaf's root refreshes).

  Raises:
    ValueError: naming ``sketch_interval`` otherwise.
  """
  if isinstance(sketch_interval, bool) or not isinstance(sketch_interval, int) \
      or sketch_interval < 0:
    raise ValueError('sketch_interval must be an int >= 0 (1: the sketch merges every '
                     "step's gradient; j > 1: every j steps; 0: at its leaf's root refreshes), "
                     f'got {sketch_interval!r}.')
  return sketch_interval


def _row_and_column(squared: Array) -> tuple[Array, Array]:
  """Sums of ``g^2`` over the last axis (rows) and over every other axis (columns)."""
  if squared.ndim == 0:
    return squared, squared
  return jnp.sum(squared, axis=-1), jnp.sum(squared, axis=tuple(range(squared.ndim - 1)))


def factored_denominator(rows: Array, columns: Array, epsilon: float) -> Array:
  """``((r_i / n) (c_j / m))^{1/4} + delta``, the diagonal of ``K_t``, shaped like the leaf.

  ``m`` rows and ``n`` columns: the sums become means, so that gradients of one size
  ``gamma`` everywhere give ``K = gamma sqrt(t)`` on a leaf of any shape, as AdaGrad does.
  """
  num_rows, num_columns = max(rows.size, 1), (columns.shape[-1] if columns.ndim else 1)
  if rows.ndim == 0 and columns.ndim == 0:
    product = rows * columns
  else:
    product = rows[..., None] * columns
  return jnp.sqrt(jnp.sqrt(product / (num_rows * num_columns))) + epsilon


class FactoredStatisticsState(NamedTuple):
  """State of :func:`scale_by_factored_statistics`.

  Attributes:
    rows: per parameter leaf (a tree like the parameters' structure), ``r_t``: the
      running sum of ``g^2`` over the leaf's last axis (``statistics='sum'``) or its
      moving average (``'peak_average'``, before bias correction), shape
      ``leaf.shape[:-1]`` (``()`` for a scalar leaf), float32 or the leaf's wider dtype.
    columns: ``c_t``, the same over every axis but the last, shape ``leaf.shape[-1:]``.
    row_peaks: ``'peak_average'``: the running maximum of the bias-corrected ``r_t``
      (zeros and unused with ``'sum'``).
    column_peaks: the same for ``c_t``.
    count: number of updates taken, int32 ``()``.
  """

  rows: PyTree
  columns: PyTree
  row_peaks: PyTree
  column_peaks: PyTree
  count: Array


FACTORED_STATISTICS = ('sum', 'peak_average')
"""How :func:`scale_by_factored_statistics` accumulates ``g^2``."""

def scale_by_factored_statistics(epsilon: float = 1e-8, *, statistics: str = 'sum',
                                 decay: float = 0.99) -> optax.GradientTransformation:
  """Map gradients to ``K_t^{-1} g``, ``K_t = ((r_t / n) ⊗ (c_t / m))^{1/4} + epsilon``.

  The diagonal online half of :func:`metamd_jax.blended.scale_by_blended_mirror_descent`
  (its module docstring states the bound).
  ``statistics='sum'``: running sums, a diagonal Kronecker-factored AdaGrad whose
  statistics include the current gradient; ``(m n)^{1/4} K_t`` dominates AdaGrad's
  diagonal, and the step decays as ``1 / sqrt(t)``. ``'peak_average'``: the running
  maximum of the bias-corrected moving averages (``decay``) of the row and column sums,
  AMSGrad's rule on the factors (Reddi, Kale & Kumar 2018), so the step does not decay
  with ``t``. Either way ``K_t`` never decreases.

  Args:
    epsilon: ``delta > 0``, added to the denominator.
    statistics: ``'sum'`` or ``'peak_average'``.
    decay: the moving averages' decay with ``'peak_average'``, in ``[0, 1)``.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: if ``epsilon`` is not positive and finite, ``statistics`` is unknown or
      ``decay`` is outside ``[0, 1)``.
  """
  check_positive(epsilon, 'epsilon')
  if statistics not in FACTORED_STATISTICS:
    raise ValueError(f'statistics must be one of {FACTORED_STATISTICS}, got {statistics!r}.')
  decay = adaptive.check_decay(decay)

  def accumulator_dtype(leaf):
    return jnp.promote_types(leaf.dtype, jnp.float32)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    pairs = [_row_and_column(jnp.zeros(jnp.shape(x), accumulator_dtype(x))) for x in leaves]
    rows = treedef.unflatten([r for r, _ in pairs])
    columns = treedef.unflatten([c for _, c in pairs])
    return tree_utils.unaliased(FactoredStatisticsState(
        rows=rows, columns=columns, row_peaks=rows, column_peaks=columns,
        count=jnp.zeros((), jnp.int32)))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    leaves, treedef = jax.tree.flatten(updates)
    out = {name: [] for name in ('directions', 'rows', 'columns', 'row_peaks',
                                 'column_peaks')}
    for g, row, column, row_peak, column_peak in zip(
        leaves, *(treedef.flatten_up_to(x) for x in (state.rows, state.columns,
                                                      state.row_peaks, state.column_peaks))):
      new_row, new_column = _row_and_column(jnp.square(g.astype(row.dtype)))
      if statistics == 'sum':
        row, column = row + new_row, column + new_column
        denominator = factored_denominator(row, column, epsilon)
      else:
        row = decay * row + (1 - decay) * new_row
        column = decay * column + (1 - decay) * new_column
        correction = 1 - decay ** count.astype(row.dtype)
        row_peak = jnp.maximum(row_peak, row / correction)
        column_peak = jnp.maximum(column_peak, column / correction)
        denominator = factored_denominator(row_peak, column_peak, epsilon)
      out['directions'].append((g.astype(row.dtype) / denominator).astype(g.dtype))
      for name, value in (('rows', row), ('columns', column), ('row_peaks', row_peak),
                          ('column_peaks', column_peak)):
        out[name].append(value)
    trees = {name: treedef.unflatten(values) for name, values in out.items()}
    directions = trees.pop('directions')
    return directions, FactoredStatisticsState(count=count, **trees)

  return optax.GradientTransformation(init_fn, update_fn)


def _matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
  """``(m, n)``: a leaf seen as a matrix, rows every axis but the last (1 for a vector or
  a scalar), columns the last axis (1 for a scalar)."""
  if not shape:
    return 1, 1
  return math.prod(shape[:-1]), shape[-1]


@jax.custom_batching.custom_vmap
def _eigh(matrix: Array) -> tuple[Array, Array]:
  """``jnp.linalg.eigh``, one matrix at a time under ``vmap`` (see below)."""
  return tuple(jnp.linalg.eigh(matrix))


@_eigh.def_vmap
def _eigh_one_at_a_time(axis_size, in_batched, matrix):
  # Batched LAPACK eigendecompositions hung on the CPU (every thread waiting; seen with
  # two or more vmapped 784 x 784 factors): a vmapped call runs its matrices in sequence
  # instead (jax.lax.map). The CPU kernel loops over a batch anyway; on an accelerator
  # this gives up batching the roots.
  del axis_size
  if not in_batched[0]:
    return _eigh(matrix), (False, False)
  return jax.lax.map(_eigh, matrix), (True, True)


def _inverse_fourth_root(statistic: Array, other_size: int, epsilon: float,
                         relative_epsilon: float) -> Array:
  """``(S / k + (epsilon + rho lambda_max(S / k)) I)^{-1/4}`` of a full (square),
  diagonal (vector) or block-diagonal (``(blocks, b, b)``, one damping per block)
  statistic ``S``; ``k`` is the other side's size, so it is a mean."""
  if statistic.ndim == 3:
    return jax.vmap(lambda block: _inverse_fourth_root(block, other_size, epsilon,
                                                       relative_epsilon))(statistic)
  mean = statistic / other_size
  if statistic.ndim == 2:
    values, vectors = _eigh(jax.lax.stop_gradient(mean))
    values = jnp.maximum(values, 0)
    floor = epsilon + relative_epsilon * jnp.max(values, initial=0)  # 0 x 0: a zero-size leaf
    return (vectors * (values + floor) ** -0.25) @ vectors.T
  floor = epsilon + relative_epsilon * jnp.max(mean, initial=0)
  return (mean + floor) ** -0.25


def _trace(statistic: Array) -> Array:
  """The trace of a full, diagonal (vector) or block-diagonal ``(k, b, b)`` statistic."""
  if statistic.ndim == 1:
    return jnp.sum(statistic)
  return jnp.sum(jnp.diagonal(statistic, axis1=-2, axis2=-1))


def check_refresh_growth(refresh_growth: Any) -> float | None:
  """Validate ``refresh_growth``: ``None`` or ``inf`` (the schedule alone, returned as
  ``None``) or a float >= 0.

  Raises:
    ValueError: naming ``refresh_growth`` on anything else (a bool, a negative number,
      NaN, a string).
  """
  if refresh_growth is None:
    return None
  if (isinstance(refresh_growth, bool) or not isinstance(refresh_growth, (int, float))
      or not refresh_growth >= 0):
    raise ValueError(f'refresh_growth must be None or inf (refresh on the schedule alone) '
                     f'or a float >= 0 (0: every step), got {refresh_growth!r}.')
  return None if math.isinf(refresh_growth) else float(refresh_growth)


def _blocks(size: int, block_size: int | None) -> tuple[int, int]:
  """``(k, b)``: a side of ``size`` split into ``k`` blocks of ``b`` rows (the last
  padded), ``k = ceil(size / block_size)``; ``(1, size)`` without blocking."""
  if block_size is None or size <= block_size:
    return 1, size
  count = -(-size // block_size)
  return count, -(-size // count)


def _split(matrix: Array, count: int, width: int) -> Array:
  """The rows of ``matrix`` ``(m, n)``, zero-padded to ``count * width``, as
  ``(count, width, n)``."""
  padded = jnp.pad(matrix, ((0, count * width - matrix.shape[0]), (0, 0)))
  return padded.reshape(count, width, matrix.shape[1])


def _block_statistic(matrix: Array, count: int, width: int) -> Array:
  """The ``(count, width, width)`` diagonal blocks of ``matrix @ matrix.T``."""
  pieces = _split(matrix, count, width)
  return jnp.einsum('kin,kjn->kij', pieces, pieces)


def _apply_side(root: Array | sketch.SketchRoot, matrix: Array, side: str) -> Array:
  """``root @ matrix`` (``side='left'``) or ``matrix @ root``; a vector root scales the
  rows or the columns, a ``(k, b, b)`` root is block diagonal, a
  :class:`metamd_jax.sketch.SketchRoot` is identity plus low rank."""
  if isinstance(root, sketch.SketchRoot):
    return sketch.apply_root(root, matrix, side)
  if root.ndim == 1:
    return matrix * (root[:, None] if side == 'left' else root)
  if root.ndim == 3:
    rows = matrix if side == 'left' else matrix.T
    count, width = root.shape[:2]
    out = jnp.einsum('kij,kjn->kin', root, _split(rows, count, width))
    out = out.reshape(count * width, -1)[:rows.shape[0]]
    return out if side == 'left' else out.T
  return root @ matrix if side == 'left' else matrix @ root


def _add_statistic(old: Array, matrix: Array, side: str) -> Array:
  """A full, diagonal or block-diagonal side statistic plus ``G G^T`` (``'left'``) or
  ``G^T G`` (``'right'``) of ``matrix`` ``G``."""
  if old.ndim == 1:
    return old + jnp.sum(jnp.square(matrix), axis=1 if side == 'left' else 0)
  if old.ndim == 3:
    return old + _block_statistic(matrix if side == 'left' else matrix.T, *old.shape[:2])
  return old + (matrix @ matrix.T if side == 'left' else matrix.T @ matrix)


class KroneckerStatisticsState(NamedTuple):
  """State of :func:`scale_by_kronecker_statistics`.

  Attributes:
    left: per parameter leaf seen as an ``m x n`` matrix ``G``, ``L_t = sum G G^T``,
      ``(m, m)``; ``(m,)``, its diagonal, where ``m > max_dimension``; ``(k, b, b)``,
      its ``k`` diagonal blocks, where ``block_size < m <= max_dimension``.
    right: ``R_t = sum G^T G``, ``(n, n)`` (or its diagonal or blocks).
    left_root: ``(L / n + (epsilon + rho lambda_max) I)^{-1/4}`` at the last refresh.
    right_root: the same of ``R / m``.
    count: number of updates taken, int32 ``()``.
    refreshed: per leaf (``jax.tree.leaves`` order), float32 ``(L,)``: ``tr L = tr R =
      sum ||G||_F^2`` at the leaf's last refresh (0 at ``init``).
    merged: per leaf, ``(L,)`` (the widest accumulator dtype): the gradient mass
      ``sum ||G||_F^2`` up to the last merge of the leaf's sketch (0 at ``init`` and for a
      leaf without a sketch).
  """

  left: PyTree
  right: PyTree
  left_root: PyTree
  right_root: PyTree
  count: Array
  refreshed: Array
  merged: Array


def scale_by_kronecker_statistics(
    epsilon: float = 1e-8,
    *,
    relative_epsilon: float = 1e-4,
    refresh_every: int = 10,
    max_dimension: int = 1024,
    block_size: int | None = None,
    refresh_growth: float | None = None,
    sketch_rank: int | None = None,
    sketch_interval: int = 1,
) -> optax.GradientTransformation:
  """Map gradients to ``K_t^{-1} g``, Shampoo's full Kronecker statistics.

  Per leaf seen as an ``m x n`` matrix ``G`` (rows: every axis but the last), with
  ``L_t = sum_tau G_tau G_tau^T`` and ``R_t = sum_tau G_tau^T G_tau`` (Gupta, Koren &
  Singer 2018), the direction is ``A_t G B_t`` with

  .. math::

    A_t = \\big(L_t / n + \\lambda_L I\\big)^{-1/4}, \\qquad
    B_t = \\big(R_t / m + \\lambda_R I\\big)^{-1/4}, \\qquad
    \\lambda = \\epsilon + \\rho\\, \\lambda_{\\max}(\\cdot),

  that is ``K_t = A_t^{-1} \\otimes B_t^{-1}``. Dividing by ``n`` and ``m`` makes the
  statistics means, so that gradients with independent entries of one size ``gamma``
  give ``K_t ~ gamma sqrt(t)``, as AdaGrad and :func:`scale_by_factored_statistics` do.
  ``L_t`` never decreases, nor does its largest eigenvalue, so ``L_t / n + lambda_L I``
  never decreases; the fourth root is operator monotone and a Kronecker product of
  non-decreasing positive definite factors never decreases: ``K_t`` never decreases.

  The roots are recomputed (one symmetric eigendecomposition per factor) at every step
  of the first ``refresh_every`` and then every ``refresh_every`` steps; in between the
  last ones are used. A stale ``K`` is the ``K`` of an earlier step, so the sequence
  used still never decreases. A stale root is too long a step along a direction whose
  gradients have grown since it was computed (a rare input feature that shows up, a
  spike): with ``refresh_growth=kappa`` a leaf's roots are also recomputed at any step
  where its gradient mass ``tr L_t = sum ||G||_F^2`` exceeds ``(1 + kappa)`` times its
  mass at the leaf's last refresh (``kappa = 0``: every step). Gradients of a steady size
  then refresh at steps growing geometrically (about ``log(T) / log(1 + kappa)`` in ``T``
  steps), and a burst refreshes at once. Each leaf's roots are still those of an earlier
  statistic, refreshed in order, so ``K_t`` still never decreases. A side longer than
  ``max_dimension`` keeps the diagonal of its statistic instead (as
  :func:`scale_by_factored_statistics` does), so an embedding table or a wide layer
  costs ``m + n`` numbers on that side. A side longer than
  ``block_size`` (and at most ``max_dimension``) keeps ``k = ceil(m / block_size)``
  diagonal blocks of its statistic (consecutive indices, blocks of ``ceil(m / k)``, each
  with its own damping): ``k`` eigendecompositions of ``m / k`` rows instead of one of
  ``m``. Blocks of a non-decreasing statistic never decrease, so neither does ``K_t``.
  With ``sketch_rank=r`` a side of ``m`` rows with ``r + n < m <= max_dimension``
  (``n``: the other side) keeps a rank-``r`` frequent-directions sketch of its statistic
  instead (:mod:`metamd_jax.sketch`): ``hat L_t = B_t B_t^T + rho_t I``, which never
  decreases and is at least ``L_t``, so ``K_t`` still never decreases; its root is exact
  for the sketch at every step, with no ``m x m`` matrix or eigendecomposition (one of
  ``r + n`` rows instead). Its leaf's other side keeps the schedule.

  The eigendecomposition of ``r + n`` rows is most of a sketched side's cost. With
  ``sketch_interval=j > 1`` the sketch merges a gradient only every ``j`` steps (steps 1,
  ``1 + j``, ...), and with ``sketch_interval=0`` only at the steps where its leaf's
  roots are refreshed (the schedule and ``refresh_growth``). A merge takes the columns
  ``sqrt(c_t) G_t`` with ``c_t = (mu_t - mu_last) / ||G_t||_F^2``, ``mu`` the leaf's
  gradient mass ``sum_tau ||G_tau||_F^2`` (the trace of its other side, exact at every
  step) and ``mu_last`` its value at the last merge: the merged columns carry the mass of
  every gradient since the last merge, along the directions of the current one (a zero
  gradient merges nothing and its mass waits for the next merge). Between merges the side
  keeps its last root. A merge is a frequent-directions update, so the sketch still never
  decreases, and a root between merges is an earlier one: ``K_t`` still never decreases
  and the adaptive-mirror-descent bound holds. The sketch is then an estimate of ``L_t``
  (equal to it in trace at each merge, up to the escaped mass), no longer a bound on it.
  The roots are not
  differentiated: a derivative through an update treats them as constants (as the
  gradient statistics are in a training step).

  Args:
    epsilon: ``epsilon > 0``, the absolute part of each factor's damping.
    relative_epsilon: ``rho >= 0``, the part relative to the factor's largest
      eigenvalue: it bounds how much a direction with small statistics is amplified.
    refresh_every: ``k >= 1``, the steps between two refreshes of the roots.
    max_dimension: sides longer than this keep a diagonal statistic.
    block_size: sides longer than this (up to ``max_dimension``) keep block-diagonal
      statistics; ``None``: one block per side.
    refresh_growth: ``None`` (the schedule alone) or ``kappa >= 0``: also refresh a
      leaf whose gradient mass has grown by this fraction since its last refresh.
    sketch_rank: ``None`` (no sketch) or ``r >= 1``: sides longer than ``r`` plus the
      other side (up to ``max_dimension``) keep a rank-``r`` frequent-directions sketch.
      Not with ``block_size``.
    sketch_interval: with ``sketch_rank``, the steps between two merges of a gradient
      into a sketch: 1 (every step), ``j > 1``, or 0 (at the leaf's root refreshes).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: on a bad ``epsilon``, ``relative_epsilon``, ``refresh_every``,
      ``max_dimension``, ``block_size``, ``refresh_growth``, ``sketch_rank`` or
      ``sketch_interval`` (each named in the message), or both ``block_size`` and
      ``sketch_rank``.
  """
  check_positive(epsilon, 'epsilon')
  if not (isinstance(relative_epsilon, (int, float)) and not isinstance(relative_epsilon, bool)
          and math.isfinite(relative_epsilon) and relative_epsilon >= 0):
    raise ValueError(f'relative_epsilon must be a finite float >= 0, got {relative_epsilon!r}.')
  check_positive_int(refresh_every, 'refresh_every')
  check_positive_int(max_dimension, 'max_dimension')
  check_block_size(block_size)
  refresh_growth = check_refresh_growth(refresh_growth)
  check_sketch_rank(sketch_rank, block_size)
  check_sketch_interval(sketch_interval)

  def accumulator_dtype(leaf):
    return jnp.promote_types(leaf.dtype, jnp.float32)

  def sketched(size, other):
    return sketch_rank is not None and sketch_rank + other < size <= max_dimension

  def zeros(size, other, dtype):
    if size > max_dimension:
      return jnp.zeros((size,), dtype)
    if sketched(size, other):
      return sketch.init(size, sketch_rank, dtype)
    count, width = _blocks(size, block_size)
    return jnp.zeros((size, size) if count == 1 else (count, width, width), dtype)

  def zero_root(statistic):
    if isinstance(statistic, sketch.SketchState):
      basis = statistic.basis
      return sketch.SketchRoot(vectors=basis, weights=jnp.zeros(basis.shape[1:], basis.dtype),
                               identity=statistic.escaped)
    return statistic

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    sides = []
    for x in leaves:
      m, n = _matrix_view(jnp.shape(x))
      sides.append((zeros(m, n, accumulator_dtype(x)), zeros(n, m, accumulator_dtype(x))))
    left = treedef.unflatten([s[0] for s in sides])
    right = treedef.unflatten([s[1] for s in sides])
    return tree_utils.unaliased(KroneckerStatisticsState(
        left=left, right=right,
        left_root=treedef.unflatten([zero_root(s[0]) for s in sides]),
        right_root=treedef.unflatten([zero_root(s[1]) for s in sides]),
        count=jnp.zeros((), jnp.int32), refreshed=jnp.zeros((len(leaves),), jnp.float32),
        merged=jnp.zeros((len(leaves),), jnp.result_type(
            jnp.float32, *[accumulator_dtype(x) for x in leaves]))))

  def merge(old, matrix, side):
    """The sketch with ``matrix``'s columns (``G``, or ``G^T`` on a right side) merged, and
    its root (exact for the sketch)."""
    new, vectors, values = sketch.update(old, matrix if side == 'left' else matrix.T,
                                         eigh=_eigh)
    other = matrix.shape[1] if side == 'left' else matrix.shape[0]
    return new, sketch.inverse_fourth_root(vectors, values, new.escaped, other, epsilon,
                                           relative_epsilon)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    leaves, treedef = jax.tree.flatten(updates)
    lefts, rights = treedef.flatten_up_to(state.left), treedef.flatten_up_to(state.right)
    old_lefts = treedef.flatten_up_to(state.left_root)
    old_rights = treedef.flatten_up_to(state.right_root)
    matrices, new_lefts, new_rights = [], [], []
    for g, left, right in zip(leaves, lefts, rights):
      matrix = g.astype(accumulator_dtype(g)).reshape(_matrix_view(g.shape))
      matrices.append(matrix)
      for old, side, news in ((left, 'left', new_lefts), (right, 'right', new_rights)):
        # A sketch is merged below, once its leaf's mass (and refresh) is known.
        news.append(old if isinstance(old, sketch.SketchState)
                    else _add_statistic(old, matrix, side))

    due = (count <= refresh_every) | ((count - 1) % refresh_every == 0)
    # Per leaf: the schedule, or (with refresh_growth) its mass grown by more than 1 + kappa.
    # The mass is the trace of a side that is not sketched (at most one side of a leaf is).
    masses = jnp.stack([_trace(rs if isinstance(ls, sketch.SketchState) else ls)
                        for ls, rs in zip(new_lefts, new_rights)])
    leaf_due = jnp.broadcast_to(due, masses.shape)
    if refresh_growth is not None:
      leaf_due = leaf_due | (masses > (1 + refresh_growth) * state.refreshed)
    # A sketched side merges its gradient: every step (sketch_interval=1, its root fresh at
    # every step), every j steps (1, 1 + j, ...), or where its leaf's roots are refreshed
    # (0), its columns scaled to carry the leaf's gradient mass since the last merge.
    if sketch_interval == 1:
      merge_due = None  # unconditional, unscaled
    elif sketch_interval == 0:
      merge_due = leaf_due
    else:
      merge_due = jnp.broadcast_to((count - 1) % sketch_interval == 0, masses.shape)
    merged = state.merged
    sketch_lefts, sketch_rights = [], []
    for index, m in enumerate(matrices):
      for news, roots, old_roots, side in ((new_lefts, sketch_lefts, old_lefts, 'left'),
                                           (new_rights, sketch_rights, old_rights, 'right')):
        old = news[index]
        if not isinstance(old, sketch.SketchState):
          roots.append(None)
          continue
        if merge_due is None:
          news[index], root = merge(old, m, side)
          merged = merged.at[index].set(masses[index])
        else:
          mass = jnp.sum(jnp.square(m))
          gained = jnp.maximum(masses[index] - merged[index], 0)
          factor = jnp.where(mass > 0, jnp.sqrt(gained / jnp.where(mass > 0, mass, 1)), 0)

          def merge_scaled(_, old=old, m=m, side=side, factor=factor):
            return merge(old, factor.astype(m.dtype) * m, side)

          news[index], root = jax.lax.cond(
              merge_due[index], merge_scaled,
              lambda _, old=old, root=old_roots[index]: (old, root), None)
          merged = merged.at[index].set(
              jnp.where(merge_due[index] & (mass > 0), masses[index], merged[index]))
        roots.append(root)
    left_roots, right_roots = [], []
    for index, (s_left, s_right, m, a, b, fresh_a, fresh_b) in enumerate(
        zip(new_lefts, new_rights, matrices, old_lefts, old_rights, sketch_lefts,
            sketch_rights)):
      def refresh_leaf(_, s_left=s_left, s_right=s_right, m=m, a=a, b=b,
                       fresh_a=fresh_a, fresh_b=fresh_b):
        return (a if fresh_a is not None else
                _inverse_fourth_root(s_left, m.shape[1], epsilon, relative_epsilon),
                b if fresh_b is not None else
                _inverse_fourth_root(s_right, m.shape[0], epsilon, relative_epsilon))

      a, b = jax.lax.cond(leaf_due[index], refresh_leaf, lambda _, a=a, b=b: (a, b), None)
      left_roots.append(a if fresh_a is None else fresh_a)
      right_roots.append(b if fresh_b is None else fresh_b)
    refreshed = jnp.where(leaf_due, masses, state.refreshed)
    directions = [
        _apply_side(b, _apply_side(a, m, 'left'), 'right').reshape(g.shape).astype(g.dtype)
        for g, m, a, b in zip(leaves, matrices, left_roots, right_roots)]
    return treedef.unflatten(directions), KroneckerStatisticsState(
        left=treedef.unflatten(new_lefts), right=treedef.unflatten(new_rights),
        left_root=treedef.unflatten(left_roots), right_root=treedef.unflatten(right_roots),
        count=count, refreshed=refreshed.astype(jnp.float32), merged=merged)

  return optax.GradientTransformation(init_fn, update_fn)


def _isotropic(statistic: Any, size: int, mean: Array) -> Any:
  """``statistic`` plus ``mean I`` (``size x size``): full, diagonal, block diagonal (the
  padding left at zero) or a sketch (added to its escaped mass)."""
  if isinstance(statistic, sketch.SketchState):
    return statistic._replace(escaped=statistic.escaped + mean.astype(statistic.escaped.dtype))
  mean = mean.astype(statistic.dtype)
  if statistic.ndim == 1:
    return statistic + mean
  if statistic.ndim == 3:
    count, width = statistic.shape[:2]
    diagonal = (jnp.arange(count * width) < size).astype(statistic.dtype).reshape(count, width)
    return statistic + mean * jax.vmap(jnp.diag)(diagonal)
  return statistic + mean * jnp.eye(size, dtype=statistic.dtype)


def _with_prior(state: KroneckerStatisticsState, shapes: list[tuple[int, ...]],
                masses: Array) -> KroneckerStatisticsState:
  is_sketch = lambda x: isinstance(x, sketch.SketchState)
  lefts, treedef = jax.tree.flatten(state.left, is_leaf=is_sketch)
  rights = treedef.flatten_up_to(state.right)
  if len(lefts) != len(shapes):
    raise ValueError(f'params have {len(shapes)} leaves, the statistics {len(lefts)}.')
  new_lefts, new_rights, merged = [], [], state.merged
  for index, (left, right, shape) in enumerate(zip(lefts, rights, shapes)):
    m, n = _matrix_view(shape)
    mass = masses[index]
    new_lefts.append(_isotropic(left, m, mass / m))
    new_rights.append(_isotropic(right, n, mass / n))
    if is_sketch(left) or is_sketch(right):
      # The prior is in the sketch already: the first merge carries only the mass after it.
      merged = merged.at[index].set(mass.astype(merged.dtype))
  return state._replace(left=treedef.unflatten(new_lefts),
                        right=treedef.unflatten(new_rights), merged=merged)


def statistics_prior(state: Any, params: PyTree, masses: Any) -> Any:
  """Start every Shampoo statistic in an optimiser's state from a past gradient mass.

  Each :class:`KroneckerStatisticsState` found in ``state`` (e.g. in
  :func:`metamd_jax.blended_metamd`'s with ``statistics='kronecker'``, behind ``optax.chain`` or
  :func:`metamd_jax.doubling_restarts`) gets, per ``m x n`` leaf with mass ``mu``,

  .. math::

    L_0 = \\frac{\\mu}{m} I_m, \\qquad R_0 = \\frac{\\mu}{n} I_n :

  the statistics that gradients of total mass ``mu = sum_tau ||G_tau||_F^2`` spread evenly
  over the leaf's entries would have left (``tr L_0 = tr R_0 = mu``; gradients of one size
  ``gamma`` over ``t`` steps give ``mu = t m n gamma^2`` and ``K_0 = gamma sqrt(t)``, the
  ``K`` those steps give). A diagonal side gets ``mu / m`` per entry, a block-diagonal one
  the same on its blocks' real indices, a sketched one ``mu / m`` of escaped mass (``hat
  L_0 = L_0``; the first merge then carries only the mass after the prior). This is the
  handover of :func:`metamd_jax.guarded_switch`: the online half, started mid-run, takes
  steps scaled by the past gradients' size (as one run from the start would, though
  spread evenly over directions) instead of the unit first steps of empty statistics.
  Adding a constant to statistics that only grow keeps ``K_t`` non-decreasing, so the
  adaptive-mirror-descent bound holds from the handover on (with ``M_1`` the metric at the
  prior).

  Args:
    state: an optimiser state as its ``init`` returns it (statistics empty).
    params: the parameters (their leaves' shapes give ``m`` and ``n``).
    masses: ``mu``, one non-negative number per parameter leaf (``jax.tree.leaves``
      order), shape ``(L,)``.

  Returns:
    ``state`` with each :class:`KroneckerStatisticsState` started from the prior; the
    rest unchanged.

  Raises:
    ValueError: if ``masses`` is not ``(L,)``, or (where they are concrete, not traced)
      holds a negative or non-finite number, or ``state`` holds no Shampoo statistics (a
      prior would then be silently dropped: e.g. a diagonal online half).
  """
  shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(params)]
  masses = jnp.asarray(masses)
  if masses.shape != (len(shapes),):
    raise ValueError(f'masses must hold one gradient mass per parameter leaf '
                     f'({len(shapes)}), got shape {masses.shape}.')
  if not isinstance(masses, jax.core.Tracer):
    values = np.asarray(masses, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
      raise ValueError(f'masses must be finite and >= 0 (sums of squared gradient norms), '
                       f'got {values.tolist()}.')
  is_statistics = lambda x: isinstance(x, KroneckerStatisticsState)
  if not any(is_statistics(x) for x in jax.tree.leaves(state, is_leaf=is_statistics)):
    raise ValueError('statistics_prior found no Shampoo statistics (KroneckerStatisticsState) '
                     "in the state: it applies to blended_metamd(..., statistics='kronecker') "
                     'with a positive blend_rate.')
  return jax.tree.map(lambda x: _with_prior(x, shapes, masses) if is_statistics(x) else x,
                      state, is_leaf=is_statistics)
