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
(:func:`metamd_jax.statistics.scale_by_kronecker_statistics`): ``K_t = (L_t / n + lambda I)^{1/4} ⊗
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
import optax

from metamd_jax import adaptive, eigenbasis, overshoot, transform
from metamd_jax import statistics as statistics_lib
from metamd_jax.types import Array, PyTree

__all__ = [
    'STATISTICS',
    'ScaleByBlendedMirrorDescentState',
    'blended_metamd',
    'check_blend_rate',
    'check_online_power',
    'scale_by_blended_mirror_descent',
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


STATISTICS = statistics_lib.FACTORED_STATISTICS + ('kronecker',)
"""The online halves of :func:`blended_metamd`: the two diagonal ones and ``'kronecker'``
(:func:`metamd_jax.statistics.scale_by_kronecker_statistics`)."""


class ScaleByBlendedMirrorDescentState(NamedTuple):
  """State of :func:`scale_by_blended_mirror_descent`.

  Attributes:
    adaptive: the state of :func:`metamd_jax.scale_by_adaptive_mirror_descent` (cached
      inverse factors, count, moving average, online scale ``s_t``).
    statistics: the state of the online half: a
      :class:`metamd_jax.statistics.FactoredStatisticsState`, or a
      :class:`metamd_jax.statistics.KroneckerStatisticsState` with ``statistics='kronecker'``;
      ``optax.EmptyState()`` with ``blend_rate=0``.
    overshoot: an :class:`metamd_jax.overshoot.OvershootState` with ``overshoot_decay``, else
      ``optax.EmptyState()``.
  """

  adaptive: adaptive.ScaleByAdaptiveMirrorDescentState
  statistics: statistics_lib.FactoredStatisticsState
  overshoot: Any = optax.EmptyState()


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
      of moving averages, AMSGrad), diagonal (see
      :func:`metamd_jax.statistics.scale_by_factored_statistics`);
      ``'kronecker'``: Shampoo's full Kronecker statistics
      (:func:`metamd_jax.statistics.scale_by_kronecker_statistics`).
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
      keep block-diagonal statistics
      (:func:`metamd_jax.statistics.scale_by_kronecker_statistics`); ``None``:
      one block per side.
    overshoot_decay: the overshoot check (the module doc): ``None``, off; a float in
      ``[0, 1)``, the decay of its moving averages (0: the last step alone). The learned
      half is then divided by a non-decreasing ``sigma_t`` per leaf that shortens it
      where it passed the minimum along its own last direction.
    refresh_growth: with ``'kronecker'``, ``None`` (the schedule alone) or ``kappa >= 0``:
      a leaf's roots are also refreshed once its gradient mass has grown by this fraction
      since their last refresh (:func:`metamd_jax.statistics.scale_by_kronecker_statistics`).
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
      (:func:`metamd_jax.statistics.scale_by_kronecker_statistics`).
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
  if overshoot_scope not in overshoot.SCOPES:
    raise ValueError(f'overshoot_scope must be one of {overshoot.SCOPES} (what the overshoot '
                     f'check shortens), got {overshoot_scope!r}.')
  whole_step = overshoot_decay is not None and overshoot_scope == 'step'
  check_online_power(online_power)
  overshoot_decay = overshoot.check_decay(overshoot_decay)
  overshoot_cap = overshoot.check_cap(overshoot_cap)
  if overshoot_cap is not None and overshoot_decay is None:
    raise ValueError(f'overshoot_cap={overshoot_cap!r} caps the overshoot check, which is off '
                     '(overshoot_decay=None): set overshoot_decay or leave the cap None.')
  statistics_lib.check_block_size(block_size)
  statistics_lib.check_sketch_rank(sketch_rank, block_size)
  statistics_lib.check_sketch_interval(sketch_interval)
  statistics_lib.check_positive_int(max_dimension, 'max_dimension')
  refresh_growth = statistics_lib.check_refresh_growth(refresh_growth)
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
    online = statistics_lib.scale_by_kronecker_statistics(
        epsilon, refresh_every=refresh_every, max_dimension=max_dimension,
        block_size=block_size, refresh_growth=refresh_growth, sketch_rank=sketch_rank,
        sketch_interval=sketch_interval)
  else:
    online = statistics_lib.scale_by_factored_statistics(epsilon, statistics=statistics)

  # A blend rate of exactly 0 (adaptive or eigenbasis MetaMD, e.g. with the overshoot
  # check alone) keeps no online statistics: they would cost without moving the step.
  no_online = isinstance(blend_rate, (int, float)) and blend_rate == 0

  def init_fn(params):
    return ScaleByBlendedMirrorDescentState(
        learned.init(params), optax.EmptyState() if no_online else online.init(params),
        optax.EmptyState() if overshoot_decay is None else overshoot.init(params))

  def update_fn(updates, state, params=None):
    learned_direction, learned_state = learned.update(updates, state.adaptive, params)
    overshoot_state = state.overshoot
    if overshoot_decay is not None and (no_online or not whole_step):
      learned_direction, overshoot_state = overshoot.check(
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
      direction, overshoot_state = overshoot.check(
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
      mass has grown by this fraction (see
      :func:`metamd_jax.statistics.scale_by_kronecker_statistics`).
    overshoot_cap: ``None``/``inf`` or the largest factor ``c >= 1`` of the overshoot
      check (see :func:`scale_by_blended_mirror_descent`).
    sketch_rank: with ``'kronecker'``, ``None`` or the rank of a frequent-directions
      sketch kept on long sides (see :func:`metamd_jax.statistics.scale_by_kronecker_statistics`).
    overshoot_scope: ``'learned'`` (the overshoot check shortens the learned half) or
      ``'step'`` (the whole blended step; see :func:`scale_by_blended_mirror_descent`).
    eigenbasis_rank: with ``eigenbasis_levels``, ``None`` or the eigendirections per
      learned factor that keep their own scales (see
      :func:`scale_by_blended_mirror_descent`).
    sketch_interval: with ``sketch_rank``, the steps between two merges into a sketch (1,
      ``j > 1``, or 0: at the root refreshes; see
      :func:`metamd_jax.statistics.scale_by_kronecker_statistics`).
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
