"""Eigenbasis MetaMD: online scales per eigendirection of the learned Kronecker factors.

Adaptive MetaMD (:mod:`metamd_jax.adaptive`) shortens a whole leaf's steps by one scale
when its gradients, measured in the learned geometry, grow beyond their in-distribution
level. Under an everyday change the growth is rarely uniform: standardised or offset
inputs raise the gradient along the input directions the learned factor had found rare,
and there its steps are the longest. One scale per leaf then shortens every direction
to tame a few. Here each eigendirection of each learned Kronecker factor has its own
non-decreasing scale.

Per Kronecker leaf viewed as an ``m x n`` matrix ``G``, with cached inverse factors
``P = U diag(p) U^T`` and ``Q = V diag(q) V^T`` (eigendecomposed once, when the
transformation is built), the gradient in the learned eigenbasis is ``H = U^T G V`` and
its terms of the dual norm are ``W_ij = p_i q_j H_ij^2`` (``sum_ij W_ij =
||G||^2_{M^{-1}}``). Each row ``i`` (eigendirection of the left factor) and column ``j``
(of the right factor) keeps adaptive MetaMD's scale on its own share,

.. math::

  a_t = \\beta a_{t-1} + (1 - \\beta) \\textstyle\\sum_j W_{ij}, \\qquad
  r_{t,i} = \\max\\Big(r_{t-1,i}, \\frac{\\sqrt{a_{t,i} / (1 - \\beta^t)}}{c^r_i}\\Big),

and alike ``b_t``, ``k_t`` from the column sums with levels ``c^k_j``; the direction is

.. math::

  u_t = U \\Big(\\frac{p}{r_t} \\odot H \\odot \\frac{q}{k_t}\\Big) V^T ,

i.e. mirror descent with the metric

.. math::

  M_t = \\big(U \\mathrm{diag}(r_t / p) U^T\\big)
        \\otimes \\big(V \\mathrm{diag}(k_t / q) V^T\\big).

The levels ``c^r``, ``c^k`` are the peaks of the same moving averages along runs of the
frozen divergence on meta-training tasks (:func:`eigenbasis_levels`), so in distribution
every scale stays 1 and the step is exactly MetaMD's (``P G Q``). Leaves with a diagonal
or scalar metric keep one scale per leaf (adaptive MetaMD's). A diagonal factor's
eigenbasis is the identity.

The guarantee. Both factors of ``M_t`` keep their eigenvectors and their eigenvalues
never decrease, so each factor never decreases, and neither does their Kronecker product
(``A' (x) B' - A (x) B = (A' - A) (x) B' + A (x) (B' - B) >= 0``): ``M_t`` is a
non-decreasing metric and the adaptive-mirror-descent regret bound of METHOD.md section 7
holds. With ``||u - theta_t||_2 <= D``, for convex losses,

.. math::

  \\sum_t f_t(\\theta_t) - f_t(u) \\le \\tfrac12 D^2 \\mathrm{tr}(M_T)
      + \\tfrac12 \\sum_t \\|g_t\\|^2_{M_t^{-1}}, \\qquad
  M_T \\le \\max_i r_{T,i} \\max_j k_{T,j} M,

the terms of adaptive MetaMD with the largest row and column scales in place of ``s_T``;
the gradient term is at most frozen MetaMD's ``1/2 sum_t ||g_t||^2_{M^{-1}}``. The
potential is at least as strongly convex as the learned one (``r, k >= 1``).

Cost per step, per ``m x n`` Kronecker leaf: four matrix products (``U^T G``, ``. V``,
``U .``, ``. V^T``) against MetaMD's two, and a few elementwise operations per parameter;
the state adds the bases (the size of ``P`` and ``Q``) and ``2 (m + n)`` numbers. On a
784-pixel input layer ``U^T G`` and ``U .`` are two ``784 x 784 x n`` products where
MetaMD's ``P G`` is one.

Ranked sides (``rank=k``). On a full factor longer than ``k``, only the ``k``
eigendirections with the largest eigenvalues of ``P`` (the longest learned steps, ``U_k``,
``p_k``) keep their own scales; the other ``m - k`` share one scale ``r_c``, whose share is
``tr(G^T P G Q)`` less the kept rows' shares ``p_i (U_k^T G Q G^T U_k)_ii``. The left
factor of ``M_t^{-1}`` is then

.. math::

  P_t = U \\mathrm{diag}(p / \\tilde r_t) U^T = P / r_c + U_k \\mathrm{diag}(p_k / r_k -
  p_k / r_c) U_k^T ,

with ``tilde r`` the kept scales and ``r_c`` repeated: eigenbasis MetaMD with the remaining
directions' scales tied, so the guarantee above holds unchanged (each scale, tied or not,
never decreases). The direction ``P_t G Q_t`` is built from ``P G`` (one ``m x m x n``
product, MetaMD's own) and thin products with ``U_k`` (``2 k m n``); with quantile-1 levels
the tied share's level is its own peak, so on the calibration tasks the steps are still
MetaMD's. ``rank=None`` keeps a scale per direction (the products above).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax import adaptive, transform
from metamd_jax import divergence as divergence_lib
from metamd_jax.tasks.base import TaskFamily, batches_of, check_num_steps
from metamd_jax.types import Array, PyTree

__all__ = [
    'EigenbasisState',
    'LeafBasis',
    'check_lengthen',
    'eigenbasis_levels',
    'eigenbasis_metamd',
    'leaf_bases',
    'scale_by_eigenbasis_mirror_descent',
]


class LeafBasis(NamedTuple):
  """The eigendecomposed inverse metric of one leaf.

  Attributes:
    left: ``U``, ``(m, m)``, or ``None`` (a diagonal left factor: the identity); on a
      ranked side (``rank < m``), ``U_k``, ``(m, rank)``: the eigenvectors of the
      ``rank`` largest eigenvalues (the longest steps).
    left_values: ``p``, ``(m,)``, the eigenvalues of ``P`` (ascending); ``(rank,)`` on a
      ranked side.
    right: ``V``, ``(n, n)``, ``None``, or ``V_k``, ``(n, rank)``.
    right_values: ``q``, ``(n,)`` or ``(rank,)``.
    inverse_values: for a diagonal or scalar metric, its inverse values (the leaf's shape
      or ``()``); ``None`` for a Kronecker leaf.
    left_inverse: ``P``, ``(m, m)``, on a ranked left side; else ``None``.
    right_inverse: ``Q``, ``(n, n)``, on a ranked right side; else ``None``.
  """

  left: Array | None
  left_values: Array | None
  right: Array | None
  right_values: Array | None
  inverse_values: Array | None
  left_inverse: Array | None = None
  right_inverse: Array | None = None


def _eigh(factor: Any) -> tuple[np.ndarray | None, np.ndarray]:
  try:
    value = np.asarray(factor, np.float64)
  except jax.errors.TracerArrayConversionError:
    raise TypeError('eigenbasis MetaMD needs a concrete divergence (its factors are '
                    'eigendecomposed once, outside jit), got a traced one.') from None
  if value.ndim == 1:
    return None, value
  values, vectors = np.linalg.eigh((value + value.T) / 2)
  return vectors, values


def check_rank(rank: Any) -> int | None:
  """``rank``: ``None`` (every eigendirection its own scale) or an int ``>= 1``.

  Raises:
    ValueError: naming ``rank`` on anything else (a bool, a float, zero, a negative).
  """
  if rank is None:
    return None
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f'rank must be None (a scale per eigendirection) or an integer >= 1 '
                     f'(the longest-step eigendirections of a side with their own scales), '
                     f'got {rank!r}.')
  return int(rank)


def _side(factor: Any, rank: int | None
          ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
  """``(vectors, values, dense)`` of one inverse factor: all of them (``dense`` ``None``),
  or on a full factor longer than ``rank`` the ``rank`` eigenpairs of the largest values
  and the factor itself (its remaining directions share one scale)."""
  vectors, values = _eigh(factor)
  if rank is None or vectors is None or len(values) <= rank:
    return vectors, values, None
  dense = np.asarray(factor, np.float64)
  return vectors[:, -rank:], values[-rank:], (dense + dense.T) / 2


def leaf_bases(divergence: PyTree, rank: int | None = None
               ) -> tuple[list[LeafBasis], list]:
  """Every leaf's :class:`LeafBasis` (float64 numpy arrays) and operator, in leaf order;
  with ``rank``, the full (not diagonal) factors longer than ``rank`` are ranked sides."""
  divergence_lib.check_divergence(divergence)
  rank = check_rank(rank)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(divergence)):
    inverse = divergence_lib.preconditioner(divergence)  # _eigh names the traced factors
  else:
    # A concrete divergence, also when the optimiser is built inside a traced function:
    # its inverses are computed now, not traced into that function.
    with jax.ensure_compile_time_eval():
      inverse = divergence_lib.preconditioner(divergence)
  operators = jax.tree.leaves(inverse, is_leaf=divergence_lib.is_operator)
  bases = []
  for op in operators:
    if isinstance(op, divergence_lib.KroneckerOperator):
      u, p, left = _side(op.left_inverse, rank)
      v, q, right = _side(op.right_inverse, rank)
      bases.append(LeafBasis(u, p, v, q, None, left, right))
    else:
      bases.append(LeafBasis(None, None, None, None, np.asarray(op.inverse_values)))
  return bases, operators


def share_sizes(basis: LeafBasis) -> tuple[int, ...]:
  """The number of scales (and levels) of each side of a leaf: ``(m, n)`` for a Kronecker
  leaf, one more on a ranked side (the share of its remaining directions, last); ``(1,)``
  for a diagonal or scalar leaf (a scalar level)."""
  if basis.inverse_values is not None:
    return (1,)
  return (len(basis.left_values) + (basis.left_inverse is not None),
          len(basis.right_values) + (basis.right_inverse is not None))


def _matrix(op, g: Array) -> Array:
  return divergence_lib.to_matrix(g, op.shape, op.rows, op.cols)


def _to_eigenbasis(basis: LeafBasis, gm: Array) -> Array:
  h = gm if basis.left is None else basis.left.T @ gm
  return h if basis.right is None else h @ basis.right


def _from_eigenbasis(basis: LeafBasis, h: Array) -> Array:
  h = h if basis.left is None else basis.left @ h
  return h if basis.right is None else h @ basis.right.T


def _ranked(basis: LeafBasis) -> bool:
  return basis.left_inverse is not None or basis.right_inverse is not None


def _left_t(u, x):
  return x if u is None else u.T @ x


def _left(u, y):
  return y if u is None else u @ y


def _right(v, x):
  return x if v is None else x @ v


def _right_t(v, y):
  return y if v is None else y @ v.T


def _ranked_shares(basis: LeafBasis, gm: Array) -> tuple[tuple, tuple[Array, Array]]:
  """The products a leaf with a ranked side reuses for its direction, and its shares.

  With ``U_k``, ``V_k`` the kept eigenvectors (all of a full side's), the kept rows' shares
  are ``p_i (U_k^T G Q G^T U_k)_ii`` and the kept columns' ``q_j (V_k^T G^T P G V_k)_jj``;
  a ranked side's remaining directions share ``tr(G^T P G Q)`` less its kept shares."""
  u, p, v, q = basis.left, basis.left_values, basis.right, basis.right_values
  a, b = _left_t(u, gm), _right(v, gm)  # U_k^T G, G V_k
  # P G and G Q: the dense factor on a ranked side, through the full eigenbasis otherwise.
  pg = basis.left_inverse @ gm if basis.left_inverse is not None else _left(u, p[:, None] * a)
  gq = gm @ basis.right_inverse if basis.right_inverse is not None else _right_t(v, b * q)
  aq, pb = _left_t(u, gq), _right(v, pg)  # U_k^T G Q, P G V_k
  rows = p * jnp.sum(a * aq, axis=1)
  columns = q * jnp.sum(b * pb, axis=0)
  total = jnp.sum(pg * gq)
  if basis.left_inverse is not None:
    rows = jnp.concatenate([rows, jnp.maximum(total - jnp.sum(rows), 0)[None]])
  if basis.right_inverse is not None:
    columns = jnp.concatenate([columns, jnp.maximum(total - jnp.sum(columns), 0)[None]])
  return (pg, a, aq, pb), (rows, columns)


def _ranked_direction(basis: LeafBasis, cache: tuple, rows: Array, columns: Array) -> Array:
  """``P_r G Q_k`` with ``P_r = c P + U_k diag(p / r - c p) U_k^T`` (``c`` the remaining
  directions' ``1 / r``, 0 on a full side) and ``Q_k`` alike (module docstring)."""
  pg, a, aq, pb = cache
  u, p, v, q = basis.left, basis.left_values, basis.right, basis.right_values
  left_rest = 1 / rows[-1] if basis.left_inverse is not None else None
  right_rest = 1 / columns[-1] if basis.right_inverse is not None else None
  delta = p / rows[:len(p)] - (0 if left_rest is None else left_rest * p)
  gamma = q / columns[:len(q)] - (0 if right_rest is None else right_rest * q)
  # U_k D U_k^T G V_k C V_k^T, plus c P G V_k C V_k^T on a ranked left side.
  inner = _left(u, delta[:, None] * _right(v, a) * gamma[None, :])
  if left_rest is not None:
    inner = inner + left_rest * pb * gamma[None, :]
  direction = _right_t(v, inner)
  if right_rest is not None:  # (U_k D U_k^T G + c P G) Q, times the right's remaining 1 / k
    outer = _left(u, delta[:, None] * aq)
    if left_rest is not None:
      outer = outer + left_rest * (pg @ basis.right_inverse)
    direction = direction + right_rest * outer
  return direction


def _shares(basis: LeafBasis, op, g: Array, dtype) -> tuple[Any, tuple[Array, ...]]:
  """``(cache, shares)``: a Kronecker leaf's ``H = U^T G V`` (or a ranked leaf's products)
  and its row and column sums of ``W = p q^T * H^2`` (a ranked side's remaining directions
  summed into one last share); an elementwise leaf's ``(None, (||g||^2_{M^{-1}},))``."""
  g = g.astype(dtype)
  if basis.inverse_values is None:
    if _ranked(basis):
      return _ranked_shares(basis, _matrix(op, g))
    h = _to_eigenbasis(basis, _matrix(op, g))
    w = basis.left_values[:, None] * h * h * basis.right_values[None, :]
    return h, (jnp.sum(w, axis=1), jnp.sum(w, axis=0))
  return None, (jnp.sum(basis.inverse_values * g * g),)


def check_levels(levels: Any, bases: list[LeafBasis]) -> list[tuple[np.ndarray, ...]]:
  """Validate per-leaf levels against the bases: ``(rows (m,), columns (n,))`` per
  Kronecker leaf, ``(level,)`` (or a number) per elementwise leaf; positive, ``inf``
  (never adapt) allowed.

  Raises:
    ValueError: naming the leaf, on a wrong count, shape or a value that is not positive.
  """
  if not isinstance(levels, (list, tuple)) or len(levels) != len(bases):
    got = len(levels) if isinstance(levels, (list, tuple)) else repr(levels)
    raise ValueError(f'levels must be a list with one entry per parameter leaf '
                     f'({len(bases)}), got {got}; calibrate with eigenbasis_levels.')
  checked = []
  for i, (level, basis) in enumerate(zip(levels, bases)):
    if basis.inverse_values is None:
      shapes = tuple((size,) for size in share_sizes(basis))
    else:
      shapes = ((),)
      level = (level,) if np.ndim(level) == 0 else level
    if len(level) != len(shapes):
      raise ValueError(f'levels[{i}] must hold {len(shapes)} arrays (rows, columns) for a '
                       f'Kronecker leaf or one level otherwise, got {len(level)}.')
    # JSON writes an infinite level as null: read it back as inf (never adapt).
    arrays = tuple(np.asarray(np.where(np.equal(np.asarray(x, object), None), math.inf, x),
                              np.float64) for x in level)
    for side, (x, shape) in enumerate(zip(arrays, shapes)):
      if x.shape != shape:
        raise ValueError(f'levels[{i}][{side}] has shape {x.shape}, expected {shape}.')
      if not np.all(x > 0):
        raise ValueError(f'levels[{i}][{side}] has entries that are not positive (NaN, '
                         'zero or negative); inf never adapts.')
    checked.append(arrays)
  return checked


class EigenbasisState(NamedTuple):
  """State of :func:`scale_by_eigenbasis_mirror_descent`.

  Attributes:
    bases: per leaf a :class:`LeafBasis` in the metric's dtype.
    count: number of updates taken, int32 ``()``.
    averages: per leaf the moving averages (rows, columns) of a Kronecker leaf, or
      ``(v,)`` of an elementwise leaf, before bias correction.
    scales: per leaf the non-decreasing scales (rows, columns), or ``(s,)``.
    norm_average: ``(L,)``, the moving average of each leaf's ``||g||^2_{M^{-1}}``.
    scale: ``(L,)``, each leaf's scale from ``norm_average`` and ``reference_norm``
      (adaptive MetaMD's per-leaf scale; blended MetaMD shortens its online half by it).
  """

  bases: list
  count: Array
  averages: list
  scales: list
  norm_average: Array
  scale: Array


def check_lengthen(lengthen_below: Any, min_scale: Any, reference_norm: Any
                   ) -> tuple[float | None, float]:
  """Validate ``lengthen_below`` and ``min_scale`` (:func:`scale_by_eigenbasis_mirror_descent`).

  Raises:
    ValueError: naming ``lengthen_below`` unless it is ``None`` or in ``(0, 1]``, or set
      without a ``reference_norm``; naming ``min_scale`` unless it is in ``(0, 1]``.
  """
  def fraction(value, name):
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not 0 < value <= 1):
      raise ValueError(f'{name} must be a number in (0, 1], got {value!r}.')
    return float(value)

  min_scale = fraction(min_scale, 'min_scale')
  if lengthen_below is None:
    return None, min_scale
  lengthen_below = fraction(lengthen_below, 'lengthen_below')
  if reference_norm is None:
    raise ValueError('lengthen_below compares each leaf\'s first gradient with its '
                     'reference_norm; pass reference_norm (reference_gradient_norm(..., '
                     'per_leaf=True)).')
  return lengthen_below, min_scale


def scale_by_eigenbasis_mirror_descent(
    divergence: PyTree,
    levels: Any,
    reference_norm: Any = None,
    *,
    decay: float = 0.9,
    rank: int | None = None,
    lengthen_below: float | None = None,
    min_scale: float = 0.1,
) -> optax.GradientTransformation:
  """Map gradients to ``U (p / r_t * H * q / k_t) V^T`` per leaf (the module docstring).

  Steps longer than the learned ones (``lengthen_below``). The scales start at 1, so the
  steps are at most MetaMD's: where a change makes the gradients far smaller than in
  meta-training (inputs divided by 255), the learned steps are far too short. With
  ``lengthen_below=q``, each leaf's scales instead start from its first gradient: with
  ``rho = ||g_1||_{M^{-1}} / c`` (``c`` the leaf's ``reference_norm``), every scale of the
  leaf (its rows and columns, and its per-leaf scale) starts at
  ``s_0 = clip(rho / q, min_scale, 1)`` before the first step's running maximum. A leaf
  whose first gradient is at least ``q`` times its calibrated level starts at 1 and steps
  exactly as without the option; one with a smaller gradient
  takes steps up to ``1 / s_0^2`` times MetaMD's (``1 / s_0`` on an elementwise leaf).
  The scales still never decrease after the first step, so the metric is non-decreasing
  from ``M_1 >= min_scale^2 M`` and the bound of the module docstring holds with
  ``M_1`` for ``M``; the potential is ``min_scale^2 eps^2``-strongly convex.

  Args:
    divergence: a concrete divergence (its inverse factors are eigendecomposed here).
    levels: per parameter leaf (``jax.tree.leaves`` order), ``(row levels (m,), column
      levels (n,))`` for a Kronecker leaf (``rank + 1`` on a ranked side) and one level
      for a diagonal or scalar one: :func:`eigenbasis_levels` on meta-training tasks,
      with the same ``rank``.
    reference_norm: one level per leaf for the per-leaf scale in the state (``scale``,
      adaptive MetaMD's ``reference_gradient_norm(..., per_leaf=True)``); ``None``: it
      stays 1. It does not change this direction.
    decay: the moving averages' decay, in ``[0, 1)``.
    rank: ``None``, a scale per eigendirection; or an int ``k >= 1``: on a full factor
      longer than ``k`` only its ``k`` longest-step eigendirections keep their own scales
      and the others share one (ranked sides, the module docstring: the step then costs
      one ``m x m`` product, not two).
    lengthen_below: ``None`` (the scales start at 1) or ``q`` in ``(0, 1]``: start a
      leaf's scales below 1 when its first gradient is below ``q`` times its reference
      norm (above; needs ``reference_norm``).
    min_scale: the lowest starting scale, in ``(0, 1]``, with ``lengthen_below``.

  Returns:
    An ``optax.GradientTransformation``; the direction has the sign of the gradient.

  Raises:
    TypeError: on a traced divergence (the bases are computed here, outside jit).
    ValueError: on levels of the wrong count or shape, or not positive (each named by
      its leaf and side), a bad ``reference_norm`` or ``decay``; at ``init``, on params
      that do not fit the divergence.
  """
  bases64, operators = leaf_bases(divergence, rank)
  checked = check_levels(levels, bases64)
  reference_norm = adaptive.check_reference_norms(reference_norm)
  decay = adaptive.check_decay(decay)
  lengthen_below, min_scale = check_lengthen(lengthen_below, min_scale, reference_norm)
  dtype = jnp.result_type(*jax.tree.leaves(operators))

  def cast(basis):
    return LeafBasis(*[None if x is None else jnp.asarray(x, dtype) for x in basis])

  def init_fn(params):
    divergence_lib.check_structure(divergence, params)
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(bases64):
      raise ValueError(f'params have {len(leaves)} leaves, the divergence {len(bases64)}.')
    bases = [cast(b) for b in bases64]
    zeros = [tuple(jnp.zeros(np.shape(x), dtype) for x in level) for level in checked]
    ones = [tuple(jnp.ones(np.shape(x), dtype) for x in level) for level in checked]
    n = len(leaves)
    return EigenbasisState(bases, jnp.zeros((), jnp.int32), zeros, ones,
                           jnp.zeros((n,), dtype), jnp.ones((n,), dtype))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    count = optax.safe_increment(state.count)
    correction = 1 - decay ** count.astype(dtype)
    shared = [_shares(basis, op, g, dtype)
              for basis, op, g in zip(state.bases, operators, leaves)]
    squared = (jnp.stack([jnp.sum(shares[0]) for _, shares in shared]) if shared
               else jnp.zeros((0,), dtype))
    leaf_scale = state.scale
    starts = [None] * len(leaves)
    if lengthen_below is not None:
      ratio = jnp.sqrt(squared) / jnp.asarray(reference_norm, dtype)
      start = jnp.clip(ratio / lengthen_below, min_scale, 1.0)
      start = jnp.where(jnp.isfinite(jnp.asarray(reference_norm, dtype)), start, 1.0)
      start = jnp.where(state.count == 0, start, 1.0).astype(dtype)
      leaf_scale = jnp.where(state.count == 0, start, state.scale)
      starts = [start[i] for i in range(len(leaves))]
    directions, averages, scales = [], [], []
    for basis, op, g, (h, shares), average, scale, level, first in zip(
        state.bases, operators, leaves, shared, state.averages, state.scales, checked,
        starts):
      if first is not None:
        scale = tuple(jnp.where(state.count == 0, first, s) for s in scale)
      average = tuple(decay * a + (1 - decay) * x for a, x in zip(average, shares))
      scale = tuple(jnp.maximum(s, jnp.sqrt(a / correction) / jnp.asarray(c, dtype))
                    for s, a, c in zip(scale, average, level))
      if h is None:
        direction = basis.inverse_values * g.astype(dtype) / scale[0]
      elif _ranked(basis):
        direction = divergence_lib.from_matrix(_ranked_direction(basis, h, *scale), op.shape,
                                               op.rows, op.cols)
      else:
        d = (basis.left_values / scale[0])[:, None] * h * (basis.right_values / scale[1])
        direction = divergence_lib.from_matrix(_from_eigenbasis(basis, d), op.shape,
                                               op.rows, op.cols)
      directions.append(direction.astype(g.dtype))
      averages.append(average)
      scales.append(scale)
    _, norm_average, leaf_scale = adaptive.update_scale(
        state.count, state.norm_average, leaf_scale, squared,
        reference_norm=reference_norm, decay=decay)
    return treedef.unflatten(directions), EigenbasisState(
        state.bases, count, averages, scales, norm_average, leaf_scale)

  return optax.GradientTransformation(init_fn, update_fn)


def eigenbasis_metamd(divergence: PyTree, levels: Any,
                      learning_rate: optax.ScalarOrSchedule = 1.0, *,
                      decay: float = 0.9, rank: int | None = None
                      ) -> optax.GradientTransformation:
  """Eigenbasis MetaMD: ``-learning_rate * U (p / r_t * H * q / k_t) V^T`` per leaf.

  MetaMD while every eigendirection's gradient stays at its in-distribution level,
  shorter steps along the eigendirections whose gradients grow beyond it (the module
  docstring; it keeps the adaptive-mirror-descent regret bound). With ``rank``, a factor
  longer than ``rank`` keeps scales for its ``rank`` longest-step eigendirections and one
  for the rest (:func:`scale_by_eigenbasis_mirror_descent`).

  Examples:
    >>> import jax.numpy as jnp, metamd_jax
    >>> from metamd_jax import eigenbasis
    >>> params = {'w': jnp.ones((2, 3))}
    >>> divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
    >>> inf = float('inf')
    >>> levels = [(jnp.full((2,), inf), jnp.full((3,), inf))]  # never adapt: MetaMD
    >>> optimizer = eigenbasis.eigenbasis_metamd(divergence, levels)
    >>> state = optimizer.init(params)
    >>> updates, _ = optimizer.update({'w': jnp.ones((2, 3))}, state, params)
    >>> round(float(updates['w'][0, 0]), 4)
    -0.1
  """
  transform.check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_eigenbasis_mirror_descent(divergence, levels, decay=decay, rank=rank),
      optax.scale_by_learning_rate(learning_rate))


def eigenbasis_levels(divergence: PyTree, family: TaskFamily, task_params: PyTree,
                      num_steps: int, *, quantile: float = 1.0, decay: float = 0.9,
                      rank: int | None = None, require_training: bool = True
                      ) -> list[tuple[np.ndarray, ...]]:
  """The in-distribution levels of every eigendirection, from meta-training tasks.

  Runs the frozen divergence for ``num_steps`` on each task of ``task_params``, tracks
  the bias-corrected moving averages of the row and column shares (the quantities the
  scales divide by their levels), keeps each one's peak over the run, and returns the
  ``quantile`` over the tasks: with ``quantile=1`` eigenbasis MetaMD takes exactly frozen
  MetaMD's steps on every calibration task. A share that is zero on every task gets
  ``inf`` (never adapts). ``rank``: the ranked sides' shares
  (:func:`scale_by_eigenbasis_mirror_descent`), to calibrate an optimiser with that rank.
  ``require_training``: every run must lower its task's loss on the first batch, as
  :func:`metamd_jax.reference_gradient_norm` requires (``False``: any finite runs).

  Returns:
    Per leaf ``(rows (m,), columns (n,))`` (Kronecker; ``rank + 1`` on a ranked side) or
    ``(level,)``, float64 numpy.

  Raises:
    ValueError: on a bad ``num_steps`` or ``quantile``, a calibration run that is not
      finite, or, with ``require_training``, one that ends at or above its initial loss.
  """
  num_steps = check_num_steps(num_steps)
  if not 0 <= quantile <= 1:
    raise ValueError(f'quantile must be in [0, 1], got {quantile}.')
  if not isinstance(require_training, bool):
    raise TypeError(f'require_training must be True or False, got {require_training!r}.')
  family.count_tasks(task_params)  # stacked tasks, else a clear error
  decay = adaptive.check_decay(decay)
  bases64, operators = leaf_bases(divergence, rank)
  # The operators as the divergence's tree: the frozen steps below (no second inversion).
  inverse = jax.tree.unflatten(
      jax.tree.structure(divergence, is_leaf=divergence_lib.is_metric), operators)
  dtype = jnp.result_type(*jax.tree.leaves(operators))
  bases = [LeafBasis(*[None if x is None else jnp.asarray(x, dtype) for x in b])
           for b in bases64]

  def one(tp):
    task = family.task(tp)
    params = task.init()
    zeros = [tuple(jnp.zeros_like(x) for x in _shares(b, op, g, dtype)[1])
             for b, op, g in zip(bases, operators, jax.tree.leaves(params))]

    batch = batches_of(task, num_steps)

    def body(carry, step):
      params, count, averages, peaks = carry
      grads = jax.grad(task.loss)(params, batch(step))
      count = count + 1
      correction = 1 - decay ** count.astype(dtype)
      new_averages, new_peaks = [], []
      for b, op, g, average, peak in zip(bases, operators, jax.tree.leaves(grads), averages,
                                         peaks):
        shares = _shares(b, op, g, dtype)[1]
        average = tuple(decay * a + (1 - decay) * x for a, x in zip(average, shares))
        new_averages.append(average)
        new_peaks.append(tuple(jnp.maximum(p, jnp.sqrt(a / correction))
                               for p, a in zip(peak, average)))
      direction = divergence_lib.precondition(inverse, grads)
      params = jax.tree.map(lambda p, d: (p - d).astype(p.dtype), params, direction)
      return (params, count, new_averages, new_peaks), None

    carry = (params, jnp.zeros((), jnp.int32), zeros, zeros)
    (final, _, _, peaks), _ = jax.lax.scan(body, carry, jnp.arange(int(num_steps)))
    first = task.batch(0)
    return peaks, task.loss(params, first), task.loss(final, first)

  peaks, start, end = jax.jit(jax.vmap(one))(task_params)
  levels, bad = [], 0
  for leaf in peaks:
    arrays = []
    for x in leaf:
      x = np.asarray(x, np.float64)
      bad = max(bad, int(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1))))
      value = np.quantile(x, quantile, axis=0)
      arrays.append(np.where(value > 0, value, math.inf))
    levels.append(tuple(arrays))
  if bad:
    raise ValueError(f'the frozen divergence diverges on {bad} calibration task(s); the '
                     'in-distribution levels are undefined (calibrate on tasks it trains).')
  if require_training:
    adaptive.check_runs_train(start, end, num_steps)
  return levels
