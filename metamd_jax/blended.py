"""Blended MetaMD: the learned geometry plus online Kronecker statistics.

Adaptive MetaMD (:mod:`metamd_jax.adaptive`) can only *shorten* the learned steps: it
keeps a run finite where the gradients grow beyond anything seen in meta-training, but it
cannot lengthen a step the learned metric makes too short, nor correct a geometry that no
longer fits (features reordered or standardised, a dataset never seen). Blended MetaMD
adds to the learned direction an online one from running Kronecker statistics of the
gradients, so that what the learned metric does not cover is still trained, and the
online scale of adaptive MetaMD shortens both:

.. math::

  u_t = \\frac{M^{-1} g_t + \\eta\\, K_t^{-1} g_t}{s_t}, \\qquad
  K_t = \\mathrm{diag}\\Big(\\big(\\tfrac{r_t}{n} \\otimes \\tfrac{c_t}{m}\\big)^{1/4}\\Big)
        + \\delta,

with ``s_t >= 1`` the non-decreasing online scale of adaptive MetaMD (one per leaf with
``per_leaf=True``; 1 while the gradients stay at their in-distribution level), ``eta`` the
``blend_rate`` and, per leaf viewed as an ``m x n`` matrix (rows: every axis but the
last; columns: the last axis, so a dense or convolution kernel's output channels),

.. math::

  r_t = \\sum_{\\tau \\le t} \\sum_j g_{\\tau, ij}^2, \\qquad
  c_t = \\sum_{\\tau \\le t} \\sum_i g_{\\tau, ij}^2 :

the diagonals of Shampoo's statistics ``sum G G^T`` and ``sum G^T G``, whose Kronecker
product's fourth root is Shampoo's metric restricted to its diagonal; dividing by ``n``
and ``m`` makes them means, so that ``eta`` is a step size like AdaGrad's on a leaf of any
shape (gradients of one size ``gamma`` give ``K_t = gamma sqrt(t)``). A leaf with one
axis (a bias) is one row; a scalar leaf is its own row and column. The statistics cost
``m + n`` numbers per ``m x n`` leaf (Adam keeps ``2 m n``).

The metric. The step ``theta_{t+1} = theta_t - u_t`` is mirror descent with

.. math::

  M_t = s_t \\big(M^{-1} + \\eta K_t^{-1}\\big)^{-1}.

Both ``s_t`` and ``K_t`` never decrease, so ``M_t^{-1}`` never increases and ``M_t`` never
decreases (Loewner order: inversion reverses it; per leaf with one scale per leaf, the
metric being block diagonal): the adaptive-mirror-descent regret bound of METHOD.md
section 7 applies,

.. math::

  \\sum_t \\langle g_t, \\theta_t - u \\rangle \\le
      \\tfrac12 \\|u - \\theta_1\\|^2_{M_1}
      + \\tfrac12 \\sum_{t \\ge 2} \\|u - \\theta_t\\|^2_{M_t - M_{t-1}}
      + \\tfrac12 \\sum_t \\|g_t\\|^2_{M_t^{-1}}.

In closed form: with ``||u - theta_t||_2 <= D`` the first two terms are at most
``1/2 D^2 tr(M_T) <= 1/2 s_T D^2 tr(M)`` (``x^T A x <= |x|^2 tr A`` for ``A >= 0``, the
traces telescope, and ``M_T <= s_T M``, with ``s_T`` the largest scale); the gradient
term is ``1/2 sum_t (||g_t||^2_{M^{-1}} + eta ||g_t||^2_{K_t^{-1}}) / s_t``; and since
``(r_t)_i (c_t)_j >= (sum_tau g_{tau,ij}^2)^2``, ``K_t >= H_t / (m n)^{1/4}`` on each
leaf, with ``H_t = diag(sqrt(sum_tau g_tau^2)) + delta`` AdaGrad's diagonal, so (Duchi,
Hazan & Singer 2011, lemma 4, and ``s_t >= 1``) for convex ``f_t``

.. math::

  \\sum_t f_t(\\theta_t) - f_t(u) \\le \\tfrac12 s_T D^2 \\mathrm{tr}(M)
      + \\tfrac12 \\sum_t \\frac{\\|g_t\\|^2_{M^{-1}}}{s_t}
      + \\eta \\sum_l (m_l n_l)^{1/4} \\mathrm{tr}(H^l_T):

adaptive MetaMD's terms plus an AdaGrad gradient term that grows as ``sqrt(T)``. With
``eta = 0`` the optimiser is exactly :func:`metamd_jax.adaptive_metamd`.

``statistics='peak_average'`` replaces the running sums by the running maxima of their
bias-corrected moving averages (AMSGrad's rule on the row and column statistics), so the
online steps do not decay as ``1 / sqrt(t)``. ``K_t`` still never decreases, so the
adaptive-mirror-descent bound above still holds; its online gradient term is then
``eta/2 sum_t ||g_t||^2_{K_t^{-1}} / s_t``, at most linear in ``T`` (a constant step),
instead of AdaGrad's ``sqrt(T)``.

``online_power=p`` divides the online half by ``s_t^p`` instead of ``s_t`` (``p`` in
``[0, 1]``; 0: the online half is never shortened): ``M_t = (M^{-1} / s_t + eta K_t^{-1}
/ s_t^p)^{-1}``, still non-decreasing since ``s_t^p`` never decreases, so the bound above
holds with the online gradient term divided by ``s_t^p``. Where the learned geometry no
longer fits (a reordering of the inputs) the learned scales rise and, with ``p = 1``,
shorten the online half too, although it is then the half that trains.

``statistics='kronecker'`` takes Shampoo's full statistics instead of their diagonals
(:func:`scale_by_kronecker_statistics`): ``K_t = (L_t / n + lambda I)^{1/4} ⊗
(R_t / m + lambda I)^{1/4}`` with ``L_t = sum G G^T``, ``R_t = sum G^T G`` and a damping
``lambda`` that grows with the largest eigenvalue, the roots refreshed every
``refresh_every`` steps (every step during the first ``refresh_every``) and, with
``refresh_growth=kappa``, also at any step where a leaf's gradient mass has grown by a
fraction ``kappa`` since its last refresh. ``K_t`` still
never decreases (the fourth root is operator monotone; a stale root is an earlier
``K``), so the adaptive-mirror-descent bound above holds; with ``refresh_every=1`` its
online gradient term is Shampoo's, which Gupta, Koren & Singer (2018) bound by
``O(sqrt(T))``; with stale roots only the adaptive-MD bound is claimed. Unlike the
diagonal statistics it follows correlated directions, and it is equivariant to any
rotation of a layer's inputs or outputs (the diagonal ones to a reordering only). It
costs, per ``m x n`` leaf, two matrix products for the direction and two for the
statistics (``2 (m^2 n + m n^2)`` flops per step, about twice the learned half's
products) and, at each refresh, two symmetric eigendecompositions (``m^3`` and ``n^3``);
sides longer than ``max_dimension`` (1024) keep their diagonals. With ``block_size=b``
a side longer than ``b`` (and at most ``max_dimension``) keeps the ``k = ceil(m / b)``
diagonal blocks of its statistic instead (consecutive indices, blocks of ``ceil(m / k)``),
as distributed Shampoo partitions a large factor: the refresh then costs ``k``
eigendecompositions of about ``m / k`` rows (``m^3 / k^2``) and the products ``m^2 n /
k``. The blocks of a non-decreasing statistic never decrease (each is a compression
``E^T L E``), each block's damping grows with its own largest eigenvalue, so ``K_t``
still never decreases and the adaptive-mirror-descent bound holds (Shampoo's
``O(sqrt(T))`` term is not claimed for blocks); the factor is zero outside its blocks, so
the direction follows correlations within a block only. With ``sketch_rank=r`` a side of
``m`` rows, ``r + n < m`` (``n``: the other side), keeps a rank-``r`` frequent-directions
sketch ``B_t B_t^T + rho_t I`` of its statistic instead (:mod:`metamd_jax.sketch`, as
Sketchy does for Shampoo): the sketch never decreases and is at least the statistic, so
``K_t`` still never decreases and the adaptive-mirror-descent bound holds; the side's
root is exact for its sketch at every step, at ``m (r + n)^2`` flops and one
eigendecomposition of ``r + n`` rows per step, with no ``m x m`` matrix. Directions
outside the sketch's ``r`` share the escaped mass ``rho_t``: the direction follows the
``r`` largest directions of the side's gradients. With ``sketch_interval=j`` (every ``j``
steps) or 0 (at the leaf's root refreshes) the sketch merges fewer gradients, each scaled
to carry the gradient mass since the last merge, and keeps its root in between: still
non-decreasing, so the same bound holds (the sketch is then an estimate of the statistic,
not a bound on it).

``overshoot_decay=beta`` adds the overshoot check to the learned half. The online scales
react to the size of the gradients in the learned geometry; they do not see a learned step
that is too long for the curvature it meets (features reordered, a noisier gradient),
which passes the minimum along its own direction and makes the loss rise. Per leaf, with
``d_t`` the learned half's direction (after the check) and ``g_t`` the gradient, the
directional derivative along the last direction before and after the step gives the
secant estimate

.. math::

  \\rho_t = \\frac{\\bar a_t}{\\bar b_t}, \\qquad
  \\bar a_t = \\beta \\bar a_{t-1} + (1 - \\beta) \\langle g_t, d_{t-1} \\rangle, \\qquad
  \\bar b_t = \\beta \\bar b_{t-1} + (1 - \\beta) \\langle g_{t-1}, d_{t-1} \\rangle

(both moving averages start at 0, so their ratio needs no bias correction). On a
quadratic the loss along ``d_{t-1}`` is least at ``1 / (1 - rho_t)`` of the step taken:
``rho_t < 0`` means the step passed that minimum, and ``rho_t <= -1`` that it did not
decrease the loss along it. The learned half is divided by

.. math::

  \\sigma_t = \\sigma_{t-1} \\max(1, 1 - \\rho_t), \\qquad \\sigma_0 = 1,

so that, with ``beta = 0``, a step that passed the minimum by a factor ``1 - rho`` is
shortened by that factor and the next one lands on it; a step short of it (``rho >= 0``)
is never lengthened. With ``beta > 0`` the ratio of moving averages smooths the noise of
minibatch gradients, and a past overshoot goes on shortening the steps until later
slopes outweigh it. A leaf whose last direction had no slope (zero gradients) keeps its
``sigma``. The metric is ``M_t = (M^{-1}_t / sigma_t + eta K_t^{-1} / s_t^p)^{-1}``, with
``M^{-1}_t`` the learned half's inverse metric before the check: ``sigma_t`` never
decreases, so ``M_t`` never decreases and the adaptive-mirror-descent bound above
holds, whatever the gradients that drove ``sigma``. Its closed form has ``sigma_T`` in
the learned terms (``M_T <= sigma_T s_T M``), and ``M_T <= s_T^p K_T / eta`` whatever
``sigma_T``: with ``eta > 0`` the online half caps the bound when the check has
shortened the learned half away. The check costs two inner products per leaf per step
and keeps the last learned direction (one number per parameter).

``overshoot_scope='step'`` applies the check to the whole step instead of the learned half:
``d_t`` is then the blended direction, and both halves are divided by ``sigma_t``. The
online half has no check of its own, and its direction does not shrink with the gradient
(with fresh statistics Shampoo's is about ``(mn)^{1/4}`` times the polar factor of ``G``),
so at a larger blend rate it can carry a run above its start where the learned half would
not (experiments/RESULTS.md section 28). The metric is ``M_t = sigma_t (M^{-1}_t + eta
K_t^{-1} / s_t^p)^{-1}``: the product of a non-decreasing scalar and a non-decreasing
metric, so it never decreases and the adaptive-mirror-descent bound above holds, with
``sigma_T`` multiplying both halves' terms. The cost is the learned-half check's.

``overshoot_cap=c`` bounds the check: ``sigma_t = min(c, sigma_{t-1} max(1, 1 - rho_t))``,
still non-decreasing (``sigma_{t-1} <= c``), so the bound above holds with
``M_T <= c s_T M`` in the learned terms. The slope after a step is measured on another
minibatch, so ``rho_t`` also falls below 0 from the noise alone, and without a cap
``sigma`` compounds over a long run, in distribution too, until the learned half is
gone; a cap keeps the learned half at least ``1 / c`` of its length.

Cost per step, against :func:`metamd_jax.adaptive_metamd`, with the diagonal statistics
(the default): per leaf, two reductions of
``g^2`` (over the rows and over the columns) and four elementwise operations per
parameter (the outer product's fourth root, two divisions, the sum of the two
directions); no matrix product, inverse or root is added. Adam does about ten
elementwise operations per parameter.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax import adaptive, eigenbasis, sketch, transform
from metamd_jax.types import Array, PyTree

__all__ = [
    'FactoredStatisticsState',
    'FACTORED_STATISTICS',
    'KroneckerStatisticsState',
    'OVERSHOOT_SCOPES',
    'OvershootState',
    'STATISTICS',
    'ScaleByBlendedMirrorDescentState',
    'blended_metamd',
    'check_blend_rate',
    'check_block_size',
    'check_online_power',
    'check_overshoot_cap',
    'check_overshoot_decay',
    'check_sketch_interval',
    'check_sketch_rank',
    'factored_denominator',
    'scale_by_blended_mirror_descent',
    'scale_by_factored_statistics',
    'scale_by_kronecker_statistics',
    'statistics_prior',
]


def check_blend_rate(blend_rate: Any) -> float | Array:
  """Validate ``blend_rate``: a finite number ``>= 0`` (0: adaptive MetaMD exactly).

  Traced values are returned as they are.

  Raises:
    TypeError: if it is not a real number (a bool is not one).
    ValueError: if it is negative, infinite or NaN.
  """
  value = adaptive.real_number(blend_rate, 'blend_rate', 'a float >= 0')
  if value is None:
    return blend_rate
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f'blend_rate must be finite and >= 0 (0: adaptive MetaMD), got '
                     f'{blend_rate!r}.')
  return blend_rate


def check_online_power(online_power: Any) -> float:
  """Validate ``online_power``: a number in ``[0, 1]``.

  Raises:
    TypeError: if it is not a real number (a bool is not one).
    ValueError: if it is outside ``[0, 1]`` or NaN.
  """
  if isinstance(online_power, bool) or not isinstance(online_power, (int, float)):
    raise TypeError(f'online_power must be a float in [0, 1], got {online_power!r}.')
  if not 0 <= online_power <= 1:
    raise ValueError(f'online_power must be in [0, 1] (1: the online half is divided by '
                     f'the learned scale, 0: never shortened), got {online_power!r}.')
  return float(online_power)


def check_positive(value: Any, name: str) -> None:
  """``ValueError`` naming ``name`` unless ``value`` is a positive finite number."""
  if not (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a positive finite float, got {value!r}.')


def _check_positive_int(value: Any, name: str) -> None:
  """``ValueError`` naming ``name`` unless ``value`` is an int ``>= 1`` (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be an int >= 1, got {value!r}.')


def check_block_size(block_size: Any) -> int | None:
  """Validate ``block_size``: ``None`` (one block per side) or an int ``>= 1``.

  Raises:
    ValueError: naming ``block_size`` otherwise.
  """
  if block_size is not None:
    _check_positive_int(block_size, 'block_size (None: one block per side)')
  return block_size


def check_sketch_rank(sketch_rank: Any, block_size: int | None = None) -> int | None:
  """Validate ``sketch_rank``: ``None`` (no sketch) or an int ``>= 1``, and not together
  with ``block_size`` (two ways to cheapen a long side: take one).

  Raises:
    ValueError: naming ``sketch_rank`` otherwise.
  """
  if sketch_rank is None:
    return None
  _check_positive_int(sketch_rank, 'sketch_rank (None: no sketch)')
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

STATISTICS = FACTORED_STATISTICS + ('kronecker',)
"""The online halves of :func:`blended_metamd`: the two diagonal ones and ``'kronecker'``
(:func:`scale_by_kronecker_statistics`)."""

OVERSHOOT_SCOPES = ('learned', 'step')
"""What the overshoot check shortens: the learned half, or the whole blended step."""


def scale_by_factored_statistics(epsilon: float = 1e-8, *, statistics: str = 'sum',
                                 decay: float = 0.99) -> optax.GradientTransformation:
  """Map gradients to ``K_t^{-1} g``, ``K_t = ((r_t / n) ⊗ (c_t / m))^{1/4} + epsilon``.

  The online half of :func:`scale_by_blended_mirror_descent` (see the module docstring).
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
    return FactoredStatisticsState(rows=rows, columns=columns, row_peaks=rows,
                                   column_peaks=columns, count=jnp.zeros((), jnp.int32))

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
    floor = epsilon + relative_epsilon * jnp.max(values)
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
  _check_positive_int(refresh_every, 'refresh_every')
  _check_positive_int(max_dimension, 'max_dimension')
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
    return KroneckerStatisticsState(
        left=left, right=right,
        left_root=treedef.unflatten([zero_root(s[0]) for s in sides]),
        right_root=treedef.unflatten([zero_root(s[1]) for s in sides]),
        count=jnp.zeros((), jnp.int32), refreshed=jnp.zeros((len(leaves),), jnp.float32),
        merged=jnp.zeros((len(leaves),), jnp.result_type(
            jnp.float32, *[accumulator_dtype(x) for x in leaves])))

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
  :func:`blended_metamd`'s with ``statistics='kronecker'``, behind ``optax.chain`` or
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


class ScaleByBlendedMirrorDescentState(NamedTuple):
  """State of :func:`scale_by_blended_mirror_descent`.

  Attributes:
    adaptive: the state of :func:`metamd_jax.scale_by_adaptive_mirror_descent` (cached
      inverse factors, count, moving average, online scale ``s_t``).
    statistics: the state of the online half: a :class:`FactoredStatisticsState`, or a
      :class:`KroneckerStatisticsState` with ``statistics='kronecker'``;
      ``optax.EmptyState()`` with ``blend_rate=0``.
    overshoot: an :class:`OvershootState` with ``overshoot_decay``, else
      ``optax.EmptyState()``.
  """

  adaptive: adaptive.ScaleByAdaptiveMirrorDescentState
  statistics: FactoredStatisticsState
  overshoot: Any = optax.EmptyState()


class OvershootState(NamedTuple):
  """State of the overshoot check of :func:`scale_by_blended_mirror_descent`.

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


def check_overshoot_decay(overshoot_decay: Any) -> float | None:
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


def check_overshoot_cap(overshoot_cap: Any) -> float | None:
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


def _init_overshoot(params: PyTree) -> OvershootState:
  zeros = jnp.zeros((len(jax.tree.leaves(params)),), jnp.float32)
  return OvershootState(previous=jax.tree.map(jnp.zeros_like, params), slope=zeros,
                        after=zeros, before=zeros, scale=jnp.ones_like(zeros))


def _check_overshoot(grads: PyTree, direction: PyTree, state: OvershootState,
                     decay: float, cap: float | None = None) -> tuple[PyTree, OvershootState]:
  """The learned direction divided by ``sigma_t`` (see the module doc), and the state."""
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


def scale_by_blended_mirror_descent(
    divergence: PyTree,
    reference_norm: Any,
    blend_rate: float,
    *,
    decay: float = 0.9,
    per_leaf: bool = False,
    epsilon: float = 1e-8,
    statistics: str = 'sum',
    refresh_every: int = 10,
    eigenbasis_levels: Any = None,
    online_power: float = 1.0,
    max_dimension: int = 1024,
    block_size: int | None = None,
    overshoot_decay: float | None = None,
    refresh_growth: float | None = None,
    overshoot_cap: float | None = None,
    sketch_rank: int | None = None,
    overshoot_scope: str = 'learned',
    eigenbasis_rank: int | None = None,
    sketch_interval: int = 1,
    eigenbasis_lengthen_below: float | None = None,
    eigenbasis_min_scale: float = 0.1,
) -> optax.GradientTransformation:
  """Map gradients to ``(M^{-1} g + blend_rate * K_t^{-1} g) / s_t`` (see the module doc).

  The direction has the sign of the gradient; follow with
  ``optax.scale_by_learning_rate`` or use :func:`blended_metamd`. A non-finite gradient
  stays in the running statistics: wrap in ``optax.apply_if_finite`` to keep it out.

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence` (learned or not).
    reference_norm: the in-distribution level(s) of adaptive MetaMD
      (:func:`metamd_jax.reference_gradient_norm`); ``None`` or ``inf``: the learned half
      never adapts.
    blend_rate: ``eta >= 0``, the weight of the online direction (a learning rate of the
      online half: its step per coordinate is about ``eta / sqrt(t)`` with running sums,
      about ``eta`` with peak averages).
    decay: the adaptive scale's moving-average decay, in ``[0, 1)``.
    per_leaf: one adaptive scale per leaf (see :func:`metamd_jax.adaptive_metamd`).
    epsilon: ``delta > 0`` of the online denominator.
    statistics: ``'sum'`` (running sums, AdaGrad) or ``'peak_average'`` (running maxima
      of moving averages, AMSGrad), diagonal (see :func:`scale_by_factored_statistics`);
      ``'kronecker'``: Shampoo's full Kronecker statistics
      (:func:`scale_by_kronecker_statistics`).
    refresh_every: with ``'kronecker'``, the steps between two refreshes of the roots.
    eigenbasis_levels: the learned half is eigenbasis MetaMD
      (:func:`metamd_jax.eigenbasis.scale_by_eigenbasis_mirror_descent`, one scale per
      eigendirection of the learned factors) with these levels
      (:func:`metamd_jax.eigenbasis.eigenbasis_levels`); the online half is shortened by
      the per-leaf scale of ``reference_norm`` (``per_leaf`` must be True). ``None``:
      adaptive MetaMD's learned half. The metric ``M_t = (M^E_t^{-1} + eta K_t^{-1} /
      s_t)^{-1}``, with ``M^E_t`` eigenbasis MetaMD's, still never decreases.
    online_power: ``p`` in ``[0, 1]``: the online half is divided by ``s_t^p`` (1: by the
      learned half's scale, as the learned half is; 0: never shortened).
    max_dimension: with ``'kronecker'``, sides longer than this keep diagonal statistics.
    block_size: with ``'kronecker'``, sides longer than this (up to ``max_dimension``)
      keep block-diagonal statistics (:func:`scale_by_kronecker_statistics`); ``None``:
      one block per side.
    overshoot_decay: the overshoot check (the module doc): ``None``, off; a float in
      ``[0, 1)``, the decay of its moving averages (0: the last step alone). The learned
      half is then divided by a non-decreasing ``sigma_t`` per leaf that shortens it
      where it passed the minimum along its own last direction.
    refresh_growth: with ``'kronecker'``, ``None`` (the schedule alone) or ``kappa >= 0``:
      a leaf's roots are also refreshed once its gradient mass has grown by this fraction
      since their last refresh (:func:`scale_by_kronecker_statistics`).
    overshoot_cap: with the overshoot check, ``None`` or ``inf`` (no cap) or ``c >= 1``:
      ``sigma_t`` is at most ``c``, so the check shortens the learned half by at most
      that factor (the module doc).
    sketch_rank: with ``'kronecker'``, ``None`` or ``r >= 1``: a side longer than ``r``
      plus its leaf's other side (up to ``max_dimension``) keeps a rank-``r``
      frequent-directions sketch of its statistic (:mod:`metamd_jax.sketch`; its roots
      fresh at every step, no eigendecomposition of the long side). Not with
      ``block_size``.
    overshoot_scope: with the overshoot check, what it shortens: ``'learned'`` (the
      learned half) or ``'step'`` (the whole blended step; the module doc).
    eigenbasis_rank: with ``eigenbasis_levels``, ``None`` (a scale per eigendirection) or
      ``k >= 1``: a learned factor longer than ``k`` keeps scales for its ``k``
      longest-step eigendirections and one shared by the rest, in one ``m x m`` product
      per step instead of two (:mod:`metamd_jax.eigenbasis`, ranked sides; the levels must
      be calibrated with the same rank).
    sketch_interval: with ``sketch_rank``, the steps between two merges of a gradient
      into a sketch: 1 (every step), ``j > 1`` or 0 (at the leaf's root refreshes), each
      merge carrying the gradient mass since the last one
      (:func:`scale_by_kronecker_statistics`).
    eigenbasis_lengthen_below: with ``eigenbasis_levels``, ``None`` (the scales start at
      1) or ``q`` in ``(0, 1]``: a leaf whose first gradient is below ``q`` times its
      ``reference_norm`` starts its scales, the online half's included, below 1, down to
      ``eigenbasis_min_scale`` (longer steps than the learned ones; still a
      non-decreasing metric: :func:`metamd_jax.eigenbasis.scale_by_eigenbasis_mirror_descent`).
    eigenbasis_min_scale: the lowest starting scale with ``eigenbasis_lengthen_below``.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    TypeError, ValueError: on a bad ``blend_rate``, ``reference_norm``, ``decay``,
      ``epsilon``, ``statistics``, ``refresh_every``, ``eigenbasis_levels``,
      ``online_power``, ``max_dimension``, ``block_size``, ``overshoot_decay``,
      ``refresh_growth``, ``overshoot_cap``, ``sketch_rank``, ``overshoot_scope``,
      ``eigenbasis_rank`` or ``sketch_interval`` (each named in the message), a finite
      ``overshoot_cap`` without ``overshoot_decay``, both ``block_size`` and
      ``sketch_rank``, or an ``eigenbasis_rank`` without ``eigenbasis_levels``.
  """
  blend_rate = check_blend_rate(blend_rate)
  if overshoot_scope not in OVERSHOOT_SCOPES:
    raise ValueError(f'overshoot_scope must be one of {OVERSHOOT_SCOPES} (what the overshoot '
                     f'check shortens), got {overshoot_scope!r}.')
  whole_step = overshoot_decay is not None and overshoot_scope == 'step'
  check_online_power(online_power)
  overshoot_decay = check_overshoot_decay(overshoot_decay)
  overshoot_cap = check_overshoot_cap(overshoot_cap)
  if overshoot_cap is not None and overshoot_decay is None:
    raise ValueError(f'overshoot_cap={overshoot_cap!r} caps the overshoot check, which is off '
                     '(overshoot_decay=None): set overshoot_decay or leave the cap None.')
  check_block_size(block_size)
  check_sketch_rank(sketch_rank, block_size)
  check_sketch_interval(sketch_interval)
  _check_positive_int(max_dimension, 'max_dimension')
  refresh_growth = check_refresh_growth(refresh_growth)
  eigenbasis_rank = eigenbasis.check_rank(eigenbasis_rank)
  if eigenbasis_rank is not None and eigenbasis_levels is None:
    raise ValueError(f'eigenbasis_rank={eigenbasis_rank!r} ranks the eigenbasis learned half, '
                     'which is off (eigenbasis_levels=None): pass levels or leave it None.')
  if eigenbasis_lengthen_below is not None and eigenbasis_levels is None:
    raise ValueError('eigenbasis_lengthen_below starts the eigenbasis scales below 1, and '
                     'the eigenbasis learned half is off (eigenbasis_levels=None): pass '
                     'levels or leave it None.')
  if eigenbasis_levels is None:
    learned = adaptive.scale_by_adaptive_mirror_descent(divergence, reference_norm,
                                                        decay=decay, per_leaf=per_leaf)
  elif per_leaf is not True:
    raise ValueError('eigenbasis_levels needs per_leaf=True: the online half is shortened '
                     'by one scale per leaf.')
  else:
    learned = eigenbasis.scale_by_eigenbasis_mirror_descent(
        divergence, eigenbasis_levels, reference_norm, decay=decay, rank=eigenbasis_rank,
        lengthen_below=eigenbasis_lengthen_below, min_scale=eigenbasis_min_scale)
  if statistics not in STATISTICS:
    raise ValueError(f'statistics must be one of {STATISTICS}, got {statistics!r}.')
  if statistics == 'kronecker':
    online = scale_by_kronecker_statistics(epsilon, refresh_every=refresh_every,
                                           max_dimension=max_dimension,
                                           block_size=block_size,
                                           refresh_growth=refresh_growth,
                                           sketch_rank=sketch_rank,
                                           sketch_interval=sketch_interval)
  else:
    online = scale_by_factored_statistics(epsilon, statistics=statistics)

  # A blend rate of exactly 0 (adaptive or eigenbasis MetaMD, e.g. with the overshoot
  # check alone) keeps no online statistics: they would cost without moving the step.
  no_online = isinstance(blend_rate, (int, float)) and blend_rate == 0

  def init_fn(params):
    return ScaleByBlendedMirrorDescentState(
        learned.init(params), optax.EmptyState() if no_online else online.init(params),
        optax.EmptyState() if overshoot_decay is None else _init_overshoot(params))

  def update_fn(updates, state, params=None):
    learned_direction, learned_state = learned.update(updates, state.adaptive, params)
    overshoot_state = state.overshoot
    if overshoot_decay is not None and (no_online or not whole_step):
      learned_direction, overshoot_state = _check_overshoot(
          updates, learned_direction, overshoot_state, overshoot_decay, overshoot_cap)
    if no_online:
      return learned_direction, ScaleByBlendedMirrorDescentState(
          learned_state, state.statistics, overshoot_state)
    online_direction, online_state = online.update(updates, state.statistics, params)
    # The online scale shortens the online half too (one scale, or one per leaf), raised
    # to online_power.
    scale = learned_state.scale
    if online_power != 1:
      scale = scale ** online_power
    online_direction = adaptive.divide_leaves(updates, online_direction, scale)
    direction = jax.tree.map(lambda a, b: (a + blend_rate * b).astype(a.dtype),
                             learned_direction, online_direction)
    if whole_step:
      direction, overshoot_state = _check_overshoot(
          updates, direction, overshoot_state, overshoot_decay, overshoot_cap)
    return direction, ScaleByBlendedMirrorDescentState(learned_state, online_state,
                                                       overshoot_state)

  return optax.GradientTransformation(init_fn, update_fn)


def blended_metamd(
    divergence: PyTree,
    reference_norm: Any,
    blend_rate: float,
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    decay: float = 0.9,
    per_leaf: bool = False,
    epsilon: float = 1e-8,
    statistics: str = 'sum',
    refresh_every: int = 10,
    eigenbasis_levels: Any = None,
    online_power: float = 1.0,
    max_dimension: int = 1024,
    block_size: int | None = None,
    overshoot_decay: float | None = None,
    refresh_growth: float | None = None,
    overshoot_cap: float | None = None,
    sketch_rank: int | None = None,
    overshoot_scope: str = 'learned',
    eigenbasis_rank: int | None = None,
    sketch_interval: int = 1,
    eigenbasis_lengthen_below: float | None = None,
    eigenbasis_min_scale: float = 0.1,
) -> optax.GradientTransformation:
  """Blended MetaMD: ``-lr (M^{-1} g + blend_rate K_t^{-1} g) / s_t``.

  Adaptive MetaMD (:func:`metamd_jax.adaptive_metamd`) plus an online Kronecker-factored
  AdaGrad direction (diagonal by default, Shampoo's with ``statistics='kronecker'``)
  weighted by ``blend_rate``: mirror descent with the non-decreasing
  metric ``M_t = s_t (M^{-1} + blend_rate K_t^{-1})^{-1}``, so it keeps the adaptive
  regret bound (the module docstring states it). ``blend_rate=0`` is adaptive MetaMD (and
  keeps no online statistics).

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence`.
    reference_norm: adaptive MetaMD's level(s), from
      :func:`metamd_jax.reference_gradient_norm` on meta-training tasks.
    blend_rate: ``eta >= 0``, the online direction's weight.
    learning_rate: a positive float or an optax schedule multiplying the whole step.
    decay: the adaptive scale's moving-average decay.
    per_leaf: one adaptive scale per leaf.
    epsilon: the online denominator's ``delta``.
    statistics: ``'sum'`` or ``'peak_average'`` (diagonal statistics), or
      ``'kronecker'`` (Shampoo's full ones).
    refresh_every: with ``'kronecker'``, the steps between two refreshes of the roots.
    eigenbasis_levels: eigenbasis MetaMD as the learned half (see
      :func:`scale_by_blended_mirror_descent`).
    online_power: the online half is divided by ``s_t ** online_power``, in ``[0, 1]``.
    max_dimension: with ``'kronecker'``, sides longer than this keep diagonal statistics.
    block_size: with ``'kronecker'``, sides longer than this keep block-diagonal ones.
    overshoot_decay: ``None`` (off) or the overshoot check's decay in ``[0, 1)`` (see
      :func:`scale_by_blended_mirror_descent`).
    refresh_growth: with ``'kronecker'``, also refresh a leaf's roots once its gradient
      mass has grown by this fraction (see :func:`scale_by_kronecker_statistics`).
    overshoot_cap: ``None``/``inf`` or the largest factor ``c >= 1`` of the overshoot
      check (see :func:`scale_by_blended_mirror_descent`).
    sketch_rank: with ``'kronecker'``, ``None`` or the rank of a frequent-directions
      sketch kept on long sides (see :func:`scale_by_kronecker_statistics`).
    overshoot_scope: ``'learned'`` (the overshoot check shortens the learned half) or
      ``'step'`` (the whole blended step; see :func:`scale_by_blended_mirror_descent`).
    eigenbasis_rank: with ``eigenbasis_levels``, ``None`` or the eigendirections per
      learned factor that keep their own scales (see
      :func:`scale_by_blended_mirror_descent`).
    sketch_interval: with ``sketch_rank``, the steps between two merges into a sketch (1,
      ``j > 1``, or 0: at the root refreshes; see :func:`scale_by_kronecker_statistics`).
    eigenbasis_lengthen_below: ``None`` or ``q``: longer first steps where a leaf's first
      gradient is below ``q`` times its reference norm (see
      :func:`scale_by_blended_mirror_descent`).
    eigenbasis_min_scale: the lowest starting scale with ``eigenbasis_lengthen_below``.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, metamd_jax
    >>> params = {'w': jnp.ones((2, 3))}
    >>> divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
    >>> optimizer = metamd_jax.blended_metamd(divergence, None, blend_rate=0.5)
    >>> state = optimizer.init(params)
    >>> updates, state = optimizer.update({'w': jnp.ones((2, 3))}, state, params)
    >>> round(float(updates['w'][0, 0]), 4)  # -(0.1 * 1 + 0.5 * 1 / 1)
    -0.6
  """
  transform.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_blended_mirror_descent(divergence, reference_norm, blend_rate, decay=decay,
                                      per_leaf=per_leaf, epsilon=epsilon,
                                      statistics=statistics, refresh_every=refresh_every,
                                      eigenbasis_levels=eigenbasis_levels,
                                      online_power=online_power,
                                      max_dimension=max_dimension, block_size=block_size,
                                      overshoot_decay=overshoot_decay,
                                      refresh_growth=refresh_growth,
                                      overshoot_cap=overshoot_cap,
                                      sketch_rank=sketch_rank,
                                      overshoot_scope=overshoot_scope,
                                      eigenbasis_rank=eigenbasis_rank,
                                      sketch_interval=sketch_interval,
                                      eigenbasis_lengthen_below=eigenbasis_lengthen_below,
                                      eigenbasis_min_scale=eigenbasis_min_scale),
      optax.scale_by_learning_rate(learning_rate),
  )
