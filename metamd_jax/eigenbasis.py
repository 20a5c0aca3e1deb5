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
the state adds the bases (the size of ``P`` and ``Q``) and ``2 (m + n)`` numbers.
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
from metamd_jax.tasks.base import TaskFamily
from metamd_jax.types import Array, PyTree

__all__ = [
    'EigenbasisState',
    'LeafBasis',
    'eigenbasis_levels',
    'eigenbasis_metamd',
    'leaf_bases',
    'scale_by_eigenbasis_mirror_descent',
]


class LeafBasis(NamedTuple):
  """The eigendecomposed inverse metric of one leaf.

  Attributes:
    left: ``U``, ``(m, m)``, or ``None`` (a diagonal left factor: the identity).
    left_values: ``p``, ``(m,)``, the eigenvalues of ``P``.
    right: ``V``, ``(n, n)``, or ``None``.
    right_values: ``q``, ``(n,)``.
    inverse_values: for a diagonal or scalar metric, its inverse values (the leaf's shape
      or ``()``); ``None`` for a Kronecker leaf.
  """

  left: Array | None
  left_values: Array | None
  right: Array | None
  right_values: Array | None
  inverse_values: Array | None


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


def leaf_bases(divergence: PyTree) -> tuple[list[LeafBasis], list]:
  """Every leaf's :class:`LeafBasis` (float64 numpy arrays) and operator, in leaf order."""
  divergence_lib.check_divergence(divergence)
  operators = jax.tree.leaves(divergence_lib.preconditioner(divergence),
                              is_leaf=divergence_lib.is_operator)
  bases = []
  for op in operators:
    if isinstance(op, divergence_lib.KroneckerOperator):
      u, p = _eigh(op.left_inverse)
      v, q = _eigh(op.right_inverse)
      bases.append(LeafBasis(u, p, v, q, None))
    else:
      bases.append(LeafBasis(None, None, None, None, np.asarray(op.inverse_values)))
  return bases, operators


def _matrix(op, g: Array) -> Array:
  return divergence_lib.to_matrix(g, op.shape, op.rows, op.cols)


def _to_eigenbasis(basis: LeafBasis, gm: Array) -> Array:
  h = gm if basis.left is None else basis.left.T @ gm
  return h if basis.right is None else h @ basis.right


def _from_eigenbasis(basis: LeafBasis, h: Array) -> Array:
  h = h if basis.left is None else basis.left @ h
  return h if basis.right is None else h @ basis.right.T


def _shares(basis: LeafBasis, op, g: Array, dtype) -> tuple[Array, tuple[Array, ...]]:
  """``(H, shares)``: a Kronecker leaf's ``H = U^T G V`` and its row and column sums of
  ``W = p q^T * H^2``; an elementwise leaf's ``(None, (||g||^2_{M^{-1}},))``."""
  g = g.astype(dtype)
  if basis.inverse_values is None:
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
  if levels is None or len(levels) != len(bases):
    raise ValueError(f'levels must hold one entry per parameter leaf ({len(bases)}), got '
                     f'{None if levels is None else len(levels)}; calibrate with '
                     'eigenbasis_levels.')
  checked = []
  for i, (level, basis) in enumerate(zip(levels, bases)):
    if basis.inverse_values is None:
      shapes = ((len(basis.left_values),), (len(basis.right_values),))
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


def scale_by_eigenbasis_mirror_descent(
    divergence: PyTree,
    levels: Any,
    reference_norm: Any = None,
    *,
    decay: float = 0.9,
) -> optax.GradientTransformation:
  """Map gradients to ``U (p / r_t * H * q / k_t) V^T`` per leaf (the module docstring).

  Args:
    divergence: a concrete divergence (its inverse factors are eigendecomposed here).
    levels: per parameter leaf (``jax.tree.leaves`` order), ``(row levels (m,), column
      levels (n,))`` for a Kronecker leaf and one level for a diagonal or scalar one:
      :func:`eigenbasis_levels` on meta-training tasks.
    reference_norm: one level per leaf for the per-leaf scale in the state (``scale``,
      adaptive MetaMD's ``reference_gradient_norm(..., per_leaf=True)``); ``None``: it
      stays 1. It does not change this direction.
    decay: the moving averages' decay, in ``[0, 1)``.

  Returns:
    An ``optax.GradientTransformation``; the direction has the sign of the gradient.

  Raises:
    TypeError: on a traced divergence (the bases are computed here, outside jit).
    ValueError: on levels of the wrong count or shape, or not positive (each named by
      its leaf and side), a bad ``reference_norm`` or ``decay``; at ``init``, on params
      that do not fit the divergence.
  """
  bases64, operators = leaf_bases(divergence)
  checked = check_levels(levels, bases64)
  reference_norm = adaptive.check_reference_norms(reference_norm)
  decay = adaptive.check_decay(decay)
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
    directions, averages, scales, totals = [], [], [], []
    for basis, op, g, average, scale, level in zip(state.bases, operators, leaves,
                                                  state.averages, state.scales, checked):
      h, shares = _shares(basis, op, g, dtype)
      average = tuple(decay * a + (1 - decay) * x for a, x in zip(average, shares))
      scale = tuple(jnp.maximum(s, jnp.sqrt(a / correction) / jnp.asarray(c, dtype))
                    for s, a, c in zip(scale, average, level))
      if h is None:
        direction = basis.inverse_values * g.astype(dtype) / scale[0]
      else:
        d = (basis.left_values / scale[0])[:, None] * h * (basis.right_values / scale[1])
        direction = divergence_lib.from_matrix(_from_eigenbasis(basis, d), op.shape,
                                               op.rows, op.cols)
      directions.append(direction.astype(g.dtype))
      averages.append(average)
      scales.append(scale)
      totals.append(jnp.sum(shares[0]))
    squared = jnp.stack(totals) if totals else jnp.zeros((0,), dtype)
    _, norm_average, leaf_scale = adaptive.update_scale(
        state.count, state.norm_average, state.scale, squared,
        reference_norm=reference_norm, decay=decay)
    return treedef.unflatten(directions), EigenbasisState(
        state.bases, count, averages, scales, norm_average, leaf_scale)

  return optax.GradientTransformation(init_fn, update_fn)


def eigenbasis_metamd(divergence: PyTree, levels: Any,
                      learning_rate: optax.ScalarOrSchedule = 1.0, *,
                      decay: float = 0.9) -> optax.GradientTransformation:
  """Eigenbasis MetaMD: ``-learning_rate * U (p / r_t * H * q / k_t) V^T`` per leaf.

  MetaMD while every eigendirection's gradient stays at its in-distribution level,
  shorter steps along the eigendirections whose gradients grow beyond it (the module
  docstring; it keeps the adaptive-mirror-descent regret bound).

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
  return optax.chain(scale_by_eigenbasis_mirror_descent(divergence, levels, decay=decay),
                     optax.scale_by_learning_rate(learning_rate))


def eigenbasis_levels(divergence: PyTree, family: TaskFamily, task_params: PyTree,
                      num_steps: int, *, quantile: float = 1.0, decay: float = 0.9
                      ) -> list[tuple[np.ndarray, ...]]:
  """The in-distribution levels of every eigendirection, from meta-training tasks.

  Runs the frozen divergence for ``num_steps`` on each task of ``task_params``, tracks
  the bias-corrected moving averages of the row and column shares (the quantities the
  scales divide by their levels), keeps each one's peak over the run, and returns the
  ``quantile`` over the tasks: with ``quantile=1`` eigenbasis MetaMD takes exactly frozen
  MetaMD's steps on every calibration task. A share that is zero on every task gets
  ``inf`` (never adapts).

  Returns:
    Per leaf ``(rows (m,), columns (n,))`` (Kronecker) or ``(level,)``, float64 numpy.

  Raises:
    ValueError: on a bad ``num_steps`` or ``quantile``, or a calibration run that is not
      finite.
  """
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps}.')
  if not 0 <= quantile <= 1:
    raise ValueError(f'quantile must be in [0, 1], got {quantile}.')
  decay = adaptive.check_decay(decay)
  bases64, operators = leaf_bases(divergence)
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

    def body(carry, step):
      params, count, averages, peaks = carry
      grads = jax.grad(task.loss)(params, task.batch(step))
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
    (_, _, _, peaks), _ = jax.lax.scan(body, carry, jnp.arange(int(num_steps)))
    return peaks

  peaks = jax.jit(jax.vmap(one))(task_params)
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
  return levels
