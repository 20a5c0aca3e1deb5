"""Quadratic Bregman divergences with a per-leaf Kronecker-factored metric.

For a parameter leaf viewed as a matrix ``W`` of shape ``(m, n)`` the potential is

.. math::

  \\phi(W) = \\tfrac12 \\operatorname{tr}(W^\\top L W R), \\qquad
  B_\\phi(X, Y) = \\tfrac12 \\operatorname{tr}((X - Y)^\\top L (X - Y) R),

with ``L = A A^T + eps I`` and ``R = B B^T + eps I``, so the metric ``M = R (x) L`` is
positive definite by construction and ``phi`` is ``eps**2``-strongly convex whatever the
unconstrained meta-parameters ``A``, ``B`` are. A factor may be dense (``A`` is
``(d, d)``) or diagonal (``A`` is ``(d,)`` and the factor is ``diag(A**2) + eps``); the
shape of the meta-parameter says which.

Two further per-leaf families are special cases used as baselines and in checks:
:class:`DiagonalMetric` (one positive scale per parameter entry, Meta-SGD style) and
:class:`ScalarMetric` (one positive scale per leaf: a learning rate).

A *divergence* is a pytree with the structure of the parameters whose leaves are
metric objects; its own leaves are the float meta-parameters, so it can be handed to
``jax.grad``, ``vmap``, ``pmap`` and any optax meta-optimiser.

For repeated use a divergence is materialised once, one cached type per structure
(:class:`KroneckerOperator`, :class:`ElementwiseOperator`): :func:`operators` keeps the
factors and their inverses (the inner loop applies and inverts the metric),
:func:`preconditioner` only the inverses (the optax state). :func:`check_structure`
checks a tree of params, gradients or updates against a divergence without computing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from metamd_jax import tree_utils
from metamd_jax.types import Array, PyTree

STRUCTURES = ('kronecker', 'diagonal', 'scalar')


class KroneckerAxes(NamedTuple):
  """Which axes of an n-D leaf form the rows and the columns of its matrix view.

  ``rows`` and ``cols`` must together list every axis once. A conv kernel
  ``(H, W, C_in, C_out)`` uses ``rows=(0, 1, 2)``, ``cols=(3,)`` by default; an
  attention projection ``(in, heads, head_dim)`` may use ``rows=(0,)``, ``cols=(1, 2)``.
  """

  rows: tuple[int, ...]
  cols: tuple[int, ...]


DimensionNumbers = Union[
    None,
    KroneckerAxes,
    Callable[[tuple, jax.ShapeDtypeStruct], KroneckerAxes | None],
    PyTree,
]


# ---------------------------------------------------------------------------
# Factor helpers: a factor is dense (d, d) or diagonal (d,).
# ---------------------------------------------------------------------------


def factor_matrix(raw: Array, eps: float) -> Array:
  """``A A^T + eps I`` for a dense raw factor, ``A**2 + eps`` for a diagonal one."""
  if raw.ndim == 2:
    return raw @ raw.T + eps * jnp.eye(raw.shape[0], dtype=raw.dtype)
  return raw * raw + eps


def factor_matmul(factor: Array, x: Array, side: str) -> Array:
  """``F @ x`` (side='left') or ``x @ F`` (side='right'); F symmetric or diagonal."""
  if factor.ndim == 2:
    return factor @ x if side == 'left' else x @ factor
  return factor[:, None] * x if side == 'left' else x * factor[None, :]


def factor_solve(factor: Array, x: Array, side: str) -> Array:
  """``F^{-1} @ x`` (side='left') or ``x @ F^{-1}`` (side='right')."""
  if factor.ndim == 2:
    chol = jax.scipy.linalg.cho_factor(factor, lower=True)
    if side == 'left':
      return jax.scipy.linalg.cho_solve(chol, x)
    return jax.scipy.linalg.cho_solve(chol, x.T).T
  return x / factor[:, None] if side == 'left' else x / factor[None, :]


def factor_inverse(factor: Array) -> Array:
  """Inverse of a symmetric positive-definite dense factor, or of a diagonal one."""
  if factor.ndim == 2:
    eye = jnp.eye(factor.shape[0], dtype=factor.dtype)
    inverse = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(factor, lower=True), eye)
    return 0.5 * (inverse + inverse.T)
  return 1.0 / factor


def factor_min_eigenvalue(factor: Array) -> Array:
  if factor.ndim == 2:
    return jnp.linalg.eigvalsh(factor)[0]
  return jnp.min(factor)


# ---------------------------------------------------------------------------
# Per-leaf metrics.
# ---------------------------------------------------------------------------


def to_matrix(x: Array, shape: tuple[int, ...], rows: tuple[int, ...],
              cols: tuple[int, ...]) -> Array:
  """View a leaf of ``shape`` as a ``(prod(rows), prod(cols))`` matrix."""
  perm = tuple(rows) + tuple(cols)
  if perm != tuple(range(len(shape))):
    x = jnp.transpose(x, perm)
  return x.reshape(math.prod(shape[a] for a in rows), math.prod(shape[a] for a in cols))


def from_matrix(x: Array, shape: tuple[int, ...], rows: tuple[int, ...],
                cols: tuple[int, ...]) -> Array:
  """Inverse of :func:`to_matrix`."""
  perm = tuple(rows) + tuple(cols)
  x = x.reshape(tuple(shape[a] for a in perm))
  if perm != tuple(range(len(shape))):
    x = jnp.transpose(x, np.argsort(perm))
  return x


def _kronecker_product(left: Array, right: Array, x: Array, shape: tuple[int, ...],
                       rows: tuple[int, ...], cols: tuple[int, ...],
                       op: Callable[[Array, Array, str], Array] = factor_matmul) -> Array:
  """``op(R, op(L, X, 'left'), 'right')`` on the matrix view ``X`` of the leaf ``x``.

  With ``op=factor_matmul`` this is ``L X R``, i.e. ``(R (x) L) x``; with
  ``op=factor_solve`` it is ``L^{-1} X R^{-1}``. The result has the factors' dtype.
  """
  xm = to_matrix(x.astype(left.dtype), shape, rows, cols)
  return from_matrix(op(right, op(left, xm, 'left'), 'right'), shape, rows, cols)


@dataclasses.dataclass(frozen=True)
class KroneckerMetric:
  """Metric ``M = R (x) L`` on a leaf viewed as a ``(rows, cols)`` matrix.

  Attributes:
    left: raw factor ``A``, ``(m, m)`` dense or ``(m,)`` diagonal; ``L = A A^T + eps I``.
    right: raw factor ``B``, ``(n, n)`` dense or ``(n,)`` diagonal; ``R = B B^T + eps I``.
    shape: shape of the parameter leaf this metric is for (static).
    rows: axes of the leaf forming the matrix rows (static).
    cols: axes of the leaf forming the matrix columns (static).
    eps: eigenvalue floor of each factor (static).
  """

  left: Array
  right: Array
  shape: tuple[int, ...]
  rows: tuple[int, ...]
  cols: tuple[int, ...]
  eps: float

  def to_matrix(self, x: Array) -> Array:
    return to_matrix(x, self.shape, self.rows, self.cols)

  def from_matrix(self, x: Array) -> Array:
    return from_matrix(x, self.shape, self.rows, self.cols)

  def factors(self) -> tuple[Array, Array]:
    """The positive-definite factors ``(L, R)`` (dense matrices or diagonals)."""
    return factor_matrix(self.left, self.eps), factor_matrix(self.right, self.eps)

  def apply(self, x: Array) -> Array:
    """``M x``, i.e. ``L X R``: the gradient of the potential at ``x``."""
    left, right = self.factors()
    return _kronecker_product(left, right, x, self.shape, self.rows, self.cols)

  def solve(self, x: Array) -> Array:
    """``M^{-1} x``, i.e. ``L^{-1} X R^{-1}``, by Cholesky solves (differentiable)."""
    left, right = self.factors()
    return _kronecker_product(left, right, x, self.shape, self.rows, self.cols, factor_solve)

  def operator(self, *, inverse_only: bool = False) -> KroneckerOperator:
    """The metric materialised as a :class:`KroneckerOperator`.

    Args:
      inverse_only: keep only the inverse factors ``P``, ``Q`` (enough for ``solve``).
    """
    left, right = self.factors()
    return KroneckerOperator(
        left=None if inverse_only else left, right=None if inverse_only else right,
        left_inverse=factor_inverse(left), right_inverse=factor_inverse(right),
        shape=self.shape, rows=self.rows, cols=self.cols)

  def min_eigenvalue(self) -> Array:
    left, right = self.factors()
    return factor_min_eigenvalue(left) * factor_min_eigenvalue(right)

  def floor(self) -> float:
    return self.eps * self.eps


@dataclasses.dataclass(frozen=True)
class DiagonalMetric:
  """Elementwise metric ``diag(a**2 + eps)`` with ``a`` of the leaf's shape."""

  scale: Array
  shape: tuple[int, ...]
  eps: float

  def values(self) -> Array:
    return self.scale * self.scale + self.eps

  def apply(self, x: Array) -> Array:
    return self.values() * x.astype(self.scale.dtype)

  def solve(self, x: Array) -> Array:
    return x.astype(self.scale.dtype) / self.values()

  def operator(self, *, inverse_only: bool = False) -> ElementwiseOperator:
    """The metric materialised as an :class:`ElementwiseOperator`.

    Args:
      inverse_only: keep only the inverse values (enough for ``solve``).
    """
    values = self.values()
    return ElementwiseOperator(values=None if inverse_only else values,
                               inverse_values=1.0 / values, shape=self.shape)

  def min_eigenvalue(self) -> Array:
    return jnp.min(self.values())

  def floor(self) -> float:
    return self.eps


@dataclasses.dataclass(frozen=True)
class ScalarMetric(DiagonalMetric):
  """Isotropic metric ``(a**2 + eps) I`` with a scalar ``a``: a learned step size.

  The diagonal metric with one shared entry (``scale`` has shape ``()``).
  """


def _missing(operator: Any, field: str, method: str) -> ValueError:
  return ValueError(
      f'this {type(operator).__name__} holds no {field} (it was built with '
      f'inverse_only=True), so it cannot {method}; build it with operators(divergence).')


@dataclasses.dataclass(frozen=True)
class KroneckerOperator:
  """A Kronecker metric materialised for repeated use: its factors and/or their inverses.

  ``apply`` (``M x = L X R``) needs the factors ``L``, ``R``; ``solve``
  (``M^{-1} x = P X Q`` with ``P = L^{-1}``, ``Q = R^{-1}``) needs the inverses. Both are
  matrix products only. A field is ``None`` when it is not kept: the optax transformation
  keeps only ``P`` and ``Q`` (see :func:`preconditioner`), the inner loop keeps all four
  (see :func:`operators`). Differentiating through it (as the meta-gradient does) only
  ever needs cotangents of the stored arrays.

  Attributes:
    left: ``L``, ``(m, m)`` or ``(m,)`` (diagonal), or ``None``.
    right: ``R``, ``(n, n)`` or ``(n,)`` (diagonal), or ``None``.
    left_inverse: ``P = L^{-1}``, the shape of ``L``, or ``None``.
    right_inverse: ``Q = R^{-1}``, the shape of ``R``, or ``None``.
    shape: shape of the parameter leaf (static).
    rows: axes of the leaf forming the matrix rows (static).
    cols: axes of the leaf forming the matrix columns (static).
  """

  left: Array | None
  right: Array | None
  left_inverse: Array | None
  right_inverse: Array | None
  shape: tuple[int, ...]
  rows: tuple[int, ...]
  cols: tuple[int, ...]

  def apply(self, x: Array) -> Array:
    """``M x = L X R``."""
    if self.left is None or self.right is None:
      raise _missing(self, 'factors', 'apply the metric')
    return _kronecker_product(self.left, self.right, x, self.shape, self.rows, self.cols)

  def solve(self, x: Array) -> Array:
    """``M^{-1} x = P X Q``."""
    if self.left_inverse is None or self.right_inverse is None:
      raise _missing(self, 'inverse factors', 'solve')
    return _kronecker_product(self.left_inverse, self.right_inverse, x, self.shape, self.rows,
                              self.cols)


@dataclasses.dataclass(frozen=True)
class ElementwiseOperator:
  """A diagonal or scalar metric materialised for repeated use: values and/or inverses.

  Attributes:
    values: the metric's entries (the leaf's shape, or ``()`` for a scalar metric), or
      ``None``.
    inverse_values: their reciprocals, or ``None``.
    shape: shape of the parameter leaf (static).
  """

  values: Array | None
  inverse_values: Array | None
  shape: tuple[int, ...]

  def apply(self, x: Array) -> Array:
    if self.values is None:
      raise _missing(self, 'values', 'apply the metric')
    return self.values * x.astype(self.values.dtype)

  def solve(self, x: Array) -> Array:
    if self.inverse_values is None:
      raise _missing(self, 'inverse values', 'solve')
    return self.inverse_values * x.astype(self.inverse_values.dtype)


for _cls, _data, _meta in (
    (KroneckerMetric, ['left', 'right'], ['shape', 'rows', 'cols', 'eps']),
    (DiagonalMetric, ['scale'], ['shape', 'eps']),
    (ScalarMetric, ['scale'], ['shape', 'eps']),
    (KroneckerOperator, ['left', 'right', 'left_inverse', 'right_inverse'],
     ['shape', 'rows', 'cols']),
    (ElementwiseOperator, ['values', 'inverse_values'], ['shape']),
):
  tree_utils.register_dataclass(_cls, data_fields=_data, meta_fields=_meta)

Metric = Union[KroneckerMetric, DiagonalMetric, ScalarMetric]
Operator = Union[KroneckerOperator, ElementwiseOperator]
METRIC_TYPES = (KroneckerMetric, DiagonalMetric, ScalarMetric)
OPERATOR_TYPES = (KroneckerOperator, ElementwiseOperator)


def is_metric(x: Any) -> bool:
  return isinstance(x, METRIC_TYPES)


def is_operator(x: Any) -> bool:
  return isinstance(x, OPERATOR_TYPES)


def is_metric_or_operator(x: Any) -> bool:
  return isinstance(x, METRIC_TYPES + OPERATOR_TYPES)


# ---------------------------------------------------------------------------
# Construction.
# ---------------------------------------------------------------------------


def default_axes(shape: Sequence[int]) -> KroneckerAxes | None:
  """Rows = all axes but the last, cols = the last (flax ``(in, out)`` layout).

  1-D leaves get ``rows=(0,)``, ``cols=()`` (a factor over their length and a positive
  scalar); scalars return ``None`` (a scalar metric).
  """
  ndim = len(shape)
  if ndim == 0:
    return None
  if ndim == 1:
    return KroneckerAxes(rows=(0,), cols=())
  return KroneckerAxes(rows=tuple(range(ndim - 1)), cols=(ndim - 1,))


def _resolve_axes(dimension_numbers: DimensionNumbers, params: PyTree) -> list:
  """One ``KroneckerAxes | None`` per params leaf, in flattening order."""
  leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  if dimension_numbers is None:
    return [default_axes(np.shape(leaf)) for _, leaf in leaves_with_path]
  if isinstance(dimension_numbers, KroneckerAxes):
    return [dimension_numbers] * len(leaves_with_path)
  if callable(dimension_numbers):
    axes = [dimension_numbers(path, jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf)))
            for path, leaf in leaves_with_path]
  else:
    # A pytree with the params' structure whose leaves are KroneckerAxes or None: matched
    # by key, so its containers and keys must be the params' own.
    is_axes = lambda x: x is None or isinstance(x, KroneckerAxes)  # noqa: E731
    axes_with_path, axes_def = jax.tree_util.tree_flatten_with_path(dimension_numbers,
                                                                    is_leaf=is_axes)
    params_def = jax.tree_util.tree_structure(params)
    if axes_def != params_def:
      keystr = jax.tree_util.keystr
      params_paths = {keystr(path) for path, _ in leaves_with_path}
      axes_paths = {keystr(path) for path, _ in axes_with_path}
      raise ValueError(
          'dimension_numbers must have the params\' structure (one KroneckerAxes, or None '
          'for the default, per leaf, under the same keys and containers), or be one '
          'KroneckerAxes or a callable (path, leaf) -> KroneckerAxes | None; params leaves '
          f'without an entry: {sorted(params_paths - axes_paths)}, entries that are not '
          f'params leaves: {sorted(axes_paths - params_paths)} (params: {params_def}).')
    axes = [a for _, a in axes_with_path]
  for a, (path, _) in zip(axes, leaves_with_path):
    if not (a is None or isinstance(a, KroneckerAxes)):
      raise TypeError(f'dimension_numbers gives {a!r} for leaf {jax.tree_util.keystr(path)}: '
                      'a KroneckerAxes(rows, cols) or None (the default).')
  return [a if a is not None else default_axes(np.shape(leaf))
          for a, (_, leaf) in zip(axes, leaves_with_path)]


def _check_axes(path: tuple, shape: tuple[int, ...], axes: KroneckerAxes) -> KroneckerAxes:
  ndim = len(shape)
  rows = tuple(int(a) % ndim for a in axes.rows) if ndim else ()
  cols = tuple(int(a) % ndim for a in axes.cols) if ndim else ()
  if sorted(rows + cols) != list(range(ndim)):
    raise ValueError(
        f'KroneckerAxes(rows={axes.rows}, cols={axes.cols}) for leaf '
        f'{jax.tree_util.keystr(path)} of shape {shape} must list every axis exactly once.')
  return KroneckerAxes(rows, cols)


def _sqrt_floor_gap(value: float, eps: float, what: str) -> float:
  if not value > eps:
    raise ValueError(
        f'{what} = {value:g} must exceed the eigenvalue floor eps = {eps:g} to reproduce '
        'SGD; lower eps or the learning rate.')
  return math.sqrt(value - eps)


def params_dtype(params: PyTree) -> np.dtype:
  """The meta-parameter dtype :func:`init_divergence` takes from ``params`` by default.

  ``float64`` when every floating leaf of ``params`` is ``float64`` (and
  ``jax_enable_x64`` is on, so that JAX can hold float64 arrays); ``float32`` otherwise:
  for float32, bfloat16, float16 or mixed float params, and for params without floating
  leaves. Half-precision params still get float32 meta-parameters (the factors' Cholesky
  inverses need at least single precision); mixed float params (e.g. float64 and float32
  leaves) get float32, since float64 meta-parameters only pay off when every float leaf
  is float64.

  Args:
    params: the model parameters (arrays, ``jax.ShapeDtypeStruct`` or Python scalars).

  Returns:
    ``numpy.dtype('float64')`` or ``numpy.dtype('float32')``.
  """
  dtypes = {jnp.dtype(leaf.dtype if hasattr(leaf, 'dtype') else jnp.result_type(leaf))
            for leaf in jax.tree.leaves(params)}
  floating = {d for d in dtypes if jnp.issubdtype(d, jnp.floating)}
  if floating == {jnp.dtype(jnp.float64)} and jax.config.jax_enable_x64:
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def init_divergence(
    params: PyTree,
    learning_rate: float,
    *,
    structure: str = 'kronecker',
    eps: float = 1e-3,
    max_factor_size: int = 2048,
    dimension_numbers: DimensionNumbers = None,
    dtype: Any = None,
) -> PyTree:
  """Meta-parameters of a divergence whose mirror step is SGD with ``learning_rate``.

  For the Kronecker structure each factor starts at ``L = R = I / sqrt(lr)``, so
  ``M^{-1} g = lr * g`` exactly; the diagonal and scalar structures start at ``1 / lr``.

  Args:
    params: the model parameters (any pytree of arrays, e.g. flax ``variables['params']``),
      or their shapes and dtypes (``jax.ShapeDtypeStruct`` leaves, e.g. from
      ``jax.eval_shape``): only those are read.
    learning_rate: positive SGD learning rate that the initial divergence reproduces.
    structure: ``'kronecker'`` (default), ``'diagonal'`` (one scale per entry) or
      ``'scalar'`` (one scale per leaf).
    eps: eigenvalue floor of every factor; the potential is ``eps**2``-strongly convex
      (Kronecker) or ``eps``-strongly convex (diagonal, scalar).
    max_factor_size: factors over more than this many rows (or columns) are diagonal
      instead of dense, so a wide embedding does not allocate a huge dense factor.
    dimension_numbers: how n-D leaves are viewed as matrices: ``None`` (all axes but the
      last are rows), one :class:`KroneckerAxes` for every leaf, a pytree of them (or
      ``None``) with the params' structure, or a callable ``(path, leaf) -> axes``.
    dtype: float32 or float64, the dtype of the meta-parameters; ``None`` (default) takes
      it from the params with :func:`params_dtype` (float64 params give float64
      meta-parameters, so a float64 mirror step is exact to float64 precision; anything
      else gives float32).

  Returns:
    The divergence: a pytree with the params' structure whose leaves are metrics.

  Examples:
    >>> import jax.numpy as jnp, metamd_jax
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
    >>> grads = {'w': jnp.ones((3, 2)), 'b': jnp.ones(2)}
    >>> new = metamd_jax.mirror_step(divergence, params, grads)
    >>> bool(jnp.allclose(new['w'], 0.9))
    True
  """
  if structure not in STRUCTURES:
    raise ValueError(f'structure must be one of {STRUCTURES}, got {structure!r}.')
  if not isinstance(learning_rate, (int, float, np.floating, np.integer)) or isinstance(
      learning_rate, bool):
    raise TypeError(f'learning_rate must be a Python float, got {type(learning_rate)}.')
  if not math.isfinite(learning_rate) or learning_rate <= 0:
    raise ValueError(f'learning_rate must be positive and finite, got {learning_rate}.')
  if not (math.isfinite(eps) and eps > 0):
    raise ValueError(f'eps must be positive and finite, got {eps}.')
  if max_factor_size < 1:
    raise ValueError(f'max_factor_size must be >= 1, got {max_factor_size}.')

  dtype = params_dtype(params) if dtype is None else check_dtype(dtype)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  axes_per_leaf = _resolve_axes(dimension_numbers, params)
  metrics = []
  for (path, leaf), axes in zip(leaves_with_path, axes_per_leaf):
    shape = tuple(np.shape(leaf))
    # The initial values are built in numpy and transferred once: ``jnp.full`` and
    # ``jnp.eye`` outside ``jax.jit`` would compile a program per new shape.
    if structure == 'scalar' or (structure == 'kronecker' and axes is None):
      gap = _sqrt_floor_gap(1.0 / learning_rate, eps, '1 / learning_rate')
      metrics.append(ScalarMetric(jnp.asarray(gap, dtype), shape, eps))
    elif structure == 'diagonal':
      gap = _sqrt_floor_gap(1.0 / learning_rate, eps, '1 / learning_rate')
      metrics.append(DiagonalMetric(jnp.asarray(np.full(shape, gap), dtype), shape, eps))
    else:
      axes = _check_axes(path, shape, axes)
      gap = _sqrt_floor_gap(learning_rate ** -0.5, eps, '1 / sqrt(learning_rate)')
      m = math.prod(shape[a] for a in axes.rows)
      n = math.prod(shape[a] for a in axes.cols)

      left, right = (jnp.asarray(np.full((d,), gap) if d > max_factor_size
                                 else gap * np.eye(d), dtype) for d in (m, n))
      metrics.append(KroneckerMetric(left, right, shape, axes.rows, axes.cols, eps))
  return jax.tree_util.tree_unflatten(treedef, metrics)


# ---------------------------------------------------------------------------
# Whole-divergence operations.
# ---------------------------------------------------------------------------


def _metric_nodes(divergence: PyTree) -> list[tuple[tuple, Any]]:
  """``(path, metric or operator)`` pairs; ``TypeError`` if ``divergence`` is not one."""
  nodes = jax.tree_util.tree_flatten_with_path(divergence, is_leaf=is_metric_or_operator)[0]
  if not nodes or not all(is_metric_or_operator(m) for _, m in nodes):
    raise TypeError('expected a divergence (a pytree of metrics from init_divergence), got '
                    f'{type(divergence).__name__}.')
  return nodes


def check_dtype(dtype: Any, name: str = 'dtype') -> jnp.dtype:
  """``dtype`` as a ``jnp.dtype`` if it is float32 or float64, the precisions a
  divergence's Cholesky factorisations and inverses run in.

  Raises:
    ValueError: naming ``dtype`` otherwise (an integer dtype would truncate the factors,
      a half-precision one has no Cholesky factorisation).
  """
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as error:
    raise ValueError(f'{name} must be float32 or float64, got {dtype!r}.') from error
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(f'{name} must be float32 or float64, got {dtype}.')
  return dtype


def check_divergence(divergence: PyTree) -> None:
  """Raise ``ValueError`` if any meta-parameter is not of a float dtype, or any concrete
  one is NaN or infinite.

  Traced values (inside ``jit``) cannot be inspected for their values and are only
  checked for their dtype.

  Raises:
    TypeError: if ``divergence`` is not a pytree of metrics (or of their operators).
    ValueError: naming the leaf whose meta-parameters are not floats (an integer factor
      truncates the metric) or not finite.
  """
  for path, metric in _metric_nodes(divergence):
    for field_path, value in jax.tree_util.tree_flatten_with_path(metric)[0]:
      dtype = getattr(value, 'dtype', None)
      if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f'divergence leaf {jax.tree_util.keystr(path)}{jax.tree_util.keystr(field_path)} '
            f'must be a float array, got {dtype or type(value).__name__}.')
      if isinstance(value, jax.core.Tracer):
        continue
      if not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(
            f'divergence leaf {jax.tree_util.keystr(path)}{jax.tree_util.keystr(field_path)} '
            'has non-finite meta-parameters (NaN or inf).')


def digest(divergence: PyTree) -> str:
  """A SHA-256 digest of a divergence's leaves (shapes, dtypes and values, in tree order).

  Two divergences with the same structure and bit-identical meta-parameters have the same
  digest; :func:`metamd_jax.save_divergence` and :func:`metamd_jax.load_divergence` keep it.
  """
  sha = hashlib.sha256()
  for leaf in jax.tree.leaves(divergence):
    value = np.asarray(leaf)
    sha.update(f'{value.dtype.str}{value.shape}'.encode())
    sha.update(np.ascontiguousarray(value).tobytes())
  return sha.hexdigest()


def check_structure(divergence: PyTree, tree: PyTree, name: str = 'params') -> None:
  """Raise ``ValueError`` unless ``tree`` has the structure and shapes of ``divergence``.

  The structure and leaf shapes must be those the divergence was built for (by
  :func:`init_divergence`). Nothing is computed: only the tree structures and the
  leaves' ``shape`` attributes are read, so ``tree`` may hold arrays,
  ``jax.ShapeDtypeStruct`` leaves or tracers. Leaves that are ``optax.MaskedNode`` (from
  ``optax.masked``) are accepted in place of any leaf.

  Args:
    divergence: a divergence (from :func:`init_divergence`), its :func:`operators` or its
      :func:`preconditioner`.
    tree: the parameters, gradients or updates to check.
    name: what ``tree`` is, for the error message.

  Raises:
    TypeError: if ``divergence`` is not a pytree of metrics (or of their operators).
    ValueError: naming the leaves only in one of the two trees, or the leaf path and
      both shapes where a leaf's shape differs.

  Examples:
    >>> import jax.numpy as jnp, metamd_jax
    >>> divergence = metamd_jax.init_divergence({'w': jnp.ones((3, 2))}, learning_rate=0.1)
    >>> metamd_jax.check_structure(divergence, {'w': jnp.ones((2, 3))})
    Traceback (most recent call last):
    ...
    ValueError: params leaf ['w'] has shape (2, 3) but the divergence was built for shape (3, 2).
  """
  _metric_nodes(divergence)
  tree_utils.matching_leaves(divergence, tree, is_leaf=is_metric_or_operator, name=name)


def apply_metric(divergence: PyTree, tree: PyTree) -> PyTree:
  """``M x`` leaf by leaf: the gradient of the potential at ``tree``.

  ``divergence`` may be a divergence or its :func:`operators`.
  """
  return tree_utils.map_metrics(lambda m, x: m.apply(x), divergence, tree,
                                is_leaf=is_metric_or_operator)


def solve_metric(divergence: PyTree, tree: PyTree) -> PyTree:
  """``M^{-1} x`` leaf by leaf (exact: Cholesky solves, or products with cached inverses).

  ``divergence`` may be a divergence, its :func:`operators` or its :func:`preconditioner`.
  """
  return tree_utils.map_metrics(lambda m, x: m.solve(x), divergence, tree,
                                is_leaf=is_metric_or_operator)


def operators(divergence: PyTree, *, inverse_only: bool = False) -> PyTree:
  """Materialise every metric as a :class:`KroneckerOperator` / :class:`ElementwiseOperator`.

  Each holds the factors (for :func:`apply_metric`) and their inverses (for
  :func:`solve_metric`), so that both are matrix products only. Differentiable: gradients
  flow back to the meta-parameters.

  Args:
    divergence: a divergence from :func:`init_divergence`.
    inverse_only: keep only the inverses (the factor fields are ``None``).
  """
  return _operators(divergence, inverse_only)


@functools.partial(jax.jit, static_argnums=1)
def _operators(divergence: PyTree, inverse_only: bool) -> PyTree:
  # One compiled program per divergence structure: called outside ``jax.jit`` (an
  # optimiser's ``init``, which inverts a concrete divergence once), the inversions
  # would otherwise compile one program per operation and shape. Inside a traced
  # function it is traced as part of it.
  return jax.tree.map(lambda m: m.operator(inverse_only=inverse_only), divergence,
                      is_leaf=is_metric)


def preconditioner(divergence: PyTree) -> PyTree:
  """The cached inverse metrics ``P``, ``Q`` only: ``operators(divergence, inverse_only=True)``.

  This is what the optax transformation keeps in its state; apply with
  :func:`precondition`.
  """
  return operators(divergence, inverse_only=True)


def precondition(inverse: PyTree, tree: PyTree) -> PyTree:
  """``M^{-1} x`` with cached inverses (:func:`preconditioner`): matrix products only.

  The result has the dtype of ``tree``'s leaves.
  """
  return tree_utils.map_metrics(lambda p, x: p.solve(x).astype(x.dtype), inverse, tree,
                                is_leaf=is_operator, name='updates')


def bregman_divergence(divergence: PyTree, x: PyTree, y: PyTree, *,
                       check_shapes: bool = True) -> Array:
  """``B(x, y) = 1/2 <x - y, M (x - y)>`` summed over leaves (a scalar).

  Args:
    divergence: the divergence (from :func:`init_divergence`) or its :func:`operators`.
    x: first point, with the params' structure.
    y: second point, with the params' structure.
    check_shapes: check ``x`` and ``y`` against the divergence's structure and shapes;
      ``False`` where the caller has (the bound's terms at every step of a run).

  Returns:
    The non-negative scalar ``B(x, y)``.

  Raises:
    ValueError: naming the leaf where ``x`` or ``y`` does not have the params' structure
      and shapes (a leaf that would broadcast against another is not taken).
  """
  check_divergence(divergence)
  if check_shapes:
    check_structure(divergence, x, name='x')
    check_structure(divergence, y, name='y')
  diff = jax.tree.map(lambda a, b: jnp.asarray(a) - jnp.asarray(b), x, y)

  def leaf_term(metric, d):
    md = metric.apply(d)
    return 0.5 * jnp.vdot(md, d.astype(md.dtype))

  terms = tree_utils.map_metrics(leaf_term, divergence, diff, is_leaf=is_metric_or_operator,
                                 name='x - y')
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def scale_steps(divergence: PyTree, factor: float) -> PyTree:
  """A divergence whose mirror steps ``M^{-1} g`` are about ``factor`` times as long.

  Scales the raw factors (``A -> factor**-0.25 A`` for each Kronecker factor,
  ``a -> factor**-0.5 a`` for diagonal and scalar metrics), so ``M`` scales by
  ``1 / factor`` up to the floor ``eps``, which is kept: the result is as positive
  definite as the input.
  """
  def scale(metric):
    if isinstance(metric, KroneckerMetric):
      c = factor ** -0.25
      return dataclasses.replace(metric, left=c * metric.left, right=c * metric.right)
    return dataclasses.replace(metric, scale=factor ** -0.5 * metric.scale)

  return jax.tree.map(scale, divergence, is_leaf=is_metric)


def strong_convexity(divergence: PyTree) -> tuple[Array, float]:
  """``(sigma, floor)``: the potential's strong-convexity constant and its guaranteed floor.

  ``sigma`` is the smallest eigenvalue of the metric over all leaves (computed by
  eigendecomposition, for reporting); ``floor`` is the lower bound that holds by
  construction for any meta-parameters (``eps**2`` for Kronecker factors).
  """
  check_divergence(divergence)
  metrics = [metric for _, metric in _metric_nodes(divergence)]
  if not all(is_metric(m) for m in metrics):
    raise TypeError('strong_convexity takes a divergence of metrics, not its operators.')
  sigma = jnp.min(jnp.stack([m.min_eigenvalue() for m in metrics]))
  return sigma, min(m.floor() for m in metrics)


def convergence_bound(divergence: PyTree, distance: float, gradient_bound: float,
                      num_steps: int) -> Array:
  """The guarantee of mirror descent with this divergence (step size folded in).

  ``B(theta*, theta_1) / T + G^2 / (2 sigma)`` with ``B(theta*, theta_1)`` bounded by
  ``lambda_max(M) D^2 / 2`` for ``||theta* - theta_1|| <= D`` and ``E||g||^2 <= G^2``.

  Raises:
    ValueError: unless ``distance`` and ``gradient_bound`` are finite and >= 0 and
      ``num_steps`` is positive and finite (a horizon of 0 or below bounds nothing).
  """
  for name, value, low in (('distance', distance, 0), ('gradient_bound', gradient_bound, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
        math.isfinite(value) and value >= low):
      raise ValueError(f'{name} must be a finite number >= 0, got {value!r}.')
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, float, np.number)) or not (
      math.isfinite(num_steps) and num_steps > 0):
    raise ValueError(f'num_steps must be a positive number, got {num_steps!r}.')
  metrics = jax.tree.leaves(divergence, is_leaf=is_metric)
  sigma, _ = strong_convexity(divergence)
  lam_max = jnp.max(jnp.stack([_max_eigenvalue(m) for m in metrics]))
  return lam_max * distance ** 2 / (2 * num_steps) + gradient_bound ** 2 / (2 * sigma)


def _max_eigenvalue(metric: Metric) -> Array:
  if isinstance(metric, KroneckerMetric):
    left, right = metric.factors()

    def top(f):
      return jnp.linalg.eigvalsh(f)[-1] if f.ndim == 2 else jnp.max(f)

    return top(left) * top(right)
  return jnp.max(metric.values())
