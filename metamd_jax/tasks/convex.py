"""Convex task families with a shared, known curvature (where mirror descent's guarantee holds).

Both families fix, from a family ``seed``, a symmetric positive definite input covariance
``S`` shared by all tasks; each task draws its own data, target and batch order from the
keys in its task parameters *inside* :meth:`task` (traceable: nothing is stored per task
on the host). Because the curvature is shared across tasks, a meta-learned Kronecker
divergence can learn it; :meth:`LeastSquaresFamily.hessian_factors` gives the oracle.

Float dtype: the family keeps ``S`` (and ``C``) in NumPy float64 and converts them when a
task is built, so tasks are float64 when ``jax_enable_x64`` is on and float32 otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax.tasks.base import Task, TaskFamily
from metamd_jax.tasks.classification import as_typed_key, epoch_batch_indices, epoch_run_batches

Params = dict[str, jax.Array]
TaskParams = dict[str, jax.Array]

__all__ = ['LeastSquaresFamily', 'LogisticRegressionFamily', 'spd_matrix']


def spd_matrix(
  rng: np.random.Generator, dim: int, max_eigenvalue: float
) -> tuple[np.ndarray, np.ndarray]:
  """A random SPD matrix with eigenvalues geometric in ``[1, max_eigenvalue]``, and its root.

  Args:
    rng: NumPy generator of the random eigenbasis (Haar-distributed orthogonal matrix).
    dim: Size of the matrix.
    max_eigenvalue: Largest eigenvalue (>= 1); the smallest is 1.

  Returns:
    ``(A, A^{1/2})``, both symmetric ``(dim, dim)`` float64.
  """
  q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
  q = q * np.sign(np.diag(r))
  eigenvalues = np.geomspace(1.0, max_eigenvalue, dim)
  matrix = (q * eigenvalues) @ q.T
  root = (q * np.sqrt(eigenvalues)) @ q.T
  return 0.5 * (matrix + matrix.T), 0.5 * (root + root.T)


def _float_dtype() -> Any:
  """The default float dtype under the current x64 setting."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _split_normal(key: jax.Array, shapes: list[tuple[int, ...]], dtype: Any) -> list[jax.Array]:
  """Independent standard-normal arrays of the given shapes from one draw."""
  sizes = [math.prod(shape) for shape in shapes]
  flat = jax.random.normal(key, (sum(sizes),), dtype)
  offsets = np.cumsum([0, *sizes])
  return [flat[a:b].reshape(shape) for a, b, shape in zip(offsets[:-1], offsets[1:], shapes)]


def _check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}')
  return int(value)


def _check_float(name: str, value: Any, low: float, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
    raise ValueError(f'{name} must be a float, got {value!r}')
  if not (math.isfinite(float(value)) and float(value) >= low):
    raise ValueError(f'{name} must be finite and {what}, got {value!r}')
  return float(value)


class _ConvexFamily(TaskFamily):
  """Shared plumbing: keys, batch order, validation."""

  num_samples: int
  batch_size: int
  init_scale: float

  def _check_sizes(self, num_samples: Any, batch_size: Any) -> None:
    self.num_samples = _check_positive_int('num_samples', num_samples)
    self.batch_size = _check_positive_int('batch_size', batch_size)
    if self.batch_size > self.num_samples:
      raise ValueError(
        f'batch_size ({self.batch_size}) must be <= num_samples ({self.num_samples})'
      )

  def sample(self, key: jax.Array) -> TaskParams:
    """Task parameters of a random task: ``{'data_key', 'init_key', 'order_key'}``.

    Args:
      key: A typed key (``jax.random.key``) or raw key data (``jax.random.PRNGKey``);
        both spellings of the same seed give the same task.

    Returns:
      ``uint32`` key data of the task's data (inputs, target, noise or labels), its
      initialisation and its batch order.
    """
    data_key, init_key, order_key = jax.random.split(as_typed_key(key), 3)
    return {
      'data_key': jax.random.key_data(data_key),
      'init_key': jax.random.key_data(init_key),
      'order_key': jax.random.key_data(order_key),
    }

  def batch_indices(self, task_params: TaskParams, step: jax.Array) -> jax.Array:
    """Row indices of minibatch ``step`` (per-epoch reshuffled stream, traceable)."""
    order_key = jax.random.wrap_key_data(task_params['order_key'])
    return epoch_batch_indices(order_key, step, self.num_samples, self.batch_size)

  def _batch_fn(self, task_params: TaskParams, x: jax.Array, y: jax.Array):
    def batch(step: jax.Array) -> tuple[jax.Array, jax.Array]:
      idx = self.batch_indices(task_params, step)
      return jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)

    return batch

  def _run_batches_fn(self, task_params: TaskParams, x: jax.Array, y: jax.Array):
    def run_batches(num_steps: int):
      return epoch_run_batches(jax.random.wrap_key_data(task_params['order_key']), num_steps,
                               self.num_samples, self.batch_size, x, y,
                               self._batch_fn(task_params, x, y))

    return run_batches

  def _init_array(self, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    if self.init_scale == 0.0:
      return jnp.zeros(shape, dtype)
    return self.init_scale * jax.random.normal(key, shape, dtype)


class LeastSquaresFamily(_ConvexFamily):
  """Multi-output least squares with a shared Kronecker Hessian ``S (x) C``.

  Family (fixed by ``seed``): input covariance ``S`` (``input_dim x input_dim``) and output
  metric ``C`` (``output_dim x output_dim``), SPD with eigenvalues geometric between 1 and
  ``sqrt(condition)`` in random eigenbases, so ``S (x) C`` has condition number
  ``condition``.

  Task (from ``task_params['data_key']``): ``X = Z S^{1/2}`` with ``Z ~ N(0, I)``
  (``num_samples x input_dim``, rows ``x_i ~ N(0, S)``), target ``W* ~ N(0, I)``
  (``input_dim x output_dim``), ``Y = X W* + noise * N(0, I)``.

  Params ``{'w': (input_dim, output_dim)}``, zeros (or ``init_scale * N(0, I)`` from the
  task's init key). Loss on a batch ``(x, y)``:
  ``1/2 mean_i (x_i W - y_i) C (x_i W - y_i)^T``. Its Hessian w.r.t. the row-major
  flattening of ``W`` is ``kron(X_b^T X_b / b, C)``; on the full data
  ``kron(X^T X / n, C) ~ kron(S, C)``. Batches ``(x, y)`` follow a per-task, per-epoch
  reshuffled order (``batch_size`` need not divide ``num_samples``).

  ``evaluate(params)``: ``{'train_loss', 'optimal_loss', 'suboptimality'}`` on the task's
  full data, the optimum in closed form (:meth:`optimum`).

  Args:
    input_dim: Number of input features.
    output_dim: Number of outputs.
    num_samples: Rows of each task's data.
    batch_size: Minibatch size, ``<= num_samples``.
    condition: Condition number of ``S (x) C`` (>= 1).
    noise: Standard deviation of the label noise (>= 0).
    seed: Seed of ``S`` and ``C`` (the family), not of the tasks.
    init_scale: Standard deviation of the initial ``W`` (0: zeros).

  Raises:
    ValueError: On a bad argument; the message names it.
  """

  def __init__(
    self,
    input_dim: int,
    output_dim: int,
    num_samples: int,
    batch_size: int,
    condition: float = 100.0,
    noise: float = 0.1,
    seed: int = 0,
    init_scale: float = 0.0,
  ) -> None:
    self.input_dim = _check_positive_int('input_dim', input_dim)
    self.output_dim = _check_positive_int('output_dim', output_dim)
    self._check_sizes(num_samples, batch_size)
    self.condition = _check_float('condition', condition, 1.0, '>= 1')
    self.noise = _check_float('noise', noise, 0.0, '>= 0')
    self.init_scale = _check_float('init_scale', init_scale, 0.0, '>= 0')
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
      raise ValueError(f'seed must be an int, got {seed!r}')
    self.seed = int(seed)
    rng = np.random.default_rng(self.seed)
    root_condition = math.sqrt(self.condition)
    self._s, self._s_root = spd_matrix(rng, self.input_dim, root_condition)
    self._c, _ = spd_matrix(rng, self.output_dim, root_condition)

  def hessian_factors(self) -> tuple[jax.Array, jax.Array]:
    """``(S, C)``: the expected Hessian is ``kron(S, C)`` (row-major ``vec W``)."""
    dtype = _float_dtype()
    return jnp.asarray(self._s, dtype), jnp.asarray(self._c, dtype)

  def data(self, task_params: TaskParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(X, Y, W*)`` of the task, generated from ``task_params['data_key']``."""
    dtype = _float_dtype()
    n, d, o = self.num_samples, self.input_dim, self.output_dim
    # One standard-normal draw split three ways (one threefry kernel to compile, not three).
    z, w_star, eps = _split_normal(
      jax.random.wrap_key_data(task_params['data_key']), [(n, d), (d, o), (n, o)], dtype
    )
    x = z @ jnp.asarray(self._s_root, dtype)
    y = x @ w_star
    if self.noise > 0.0:
      y = y + self.noise * eps
    return x, y, w_star

  def loss(self, params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``1/2 mean_i (x_i W - y_i) C (x_i W - y_i)^T``."""
    x, y = batch
    residual = x @ params['w'] - y
    c = jnp.asarray(self._c, residual.dtype)
    return 0.5 * jnp.mean(jnp.sum((residual @ c) * residual, axis=-1))

  def optimum(self, task_params: TaskParams) -> tuple[Params, jax.Array]:
    """The task's exact minimiser on its full data and the optimal loss (traceable).

    Since ``C`` is SPD the minimiser is ordinary least squares ``W = X^+ Y`` (the
    minimum-norm one when ``num_samples < input_dim``).
    """
    x, y, _ = self.data(task_params)
    w = jnp.linalg.lstsq(x, y)[0]
    params = {'w': w}
    return params, self.loss(params, (x, y))

  def task(self, task_params: TaskParams) -> Task:
    """The task with these task parameters (traceable; see the class docstring)."""
    x, y, _ = self.data(task_params)
    init_key = jax.random.wrap_key_data(task_params['init_key'])
    dtype = x.dtype

    def init() -> Params:
      return {'w': self._init_array(init_key, (self.input_dim, self.output_dim), dtype)}

    def evaluate(params: Params) -> dict[str, jax.Array]:
      train_loss = self.loss(params, (x, y))
      optimal_loss = self.loss({'w': jnp.linalg.lstsq(x, y)[0]}, (x, y))
      return {
        'train_loss': train_loss,
        'optimal_loss': optimal_loss,
        'suboptimality': train_loss - optimal_loss,
      }

    return Task(init=init, loss=self.loss, batch=self._batch_fn(task_params, x, y),
                evaluate=evaluate, run_batches=self._run_batches_fn(task_params, x, y))


class LogisticRegressionFamily(_ConvexFamily):
  """Multinomial logistic regression on inputs with a shared covariance ``S``.

  Family (fixed by ``seed``): SPD ``S`` (``input_dim x input_dim``) with eigenvalues
  geometric between 1 and ``condition`` in a random eigenbasis (so ``condition`` is the
  condition number of ``S``, the input factor of the Hessian).

  Task (from ``task_params['data_key']``): rows ``x_i ~ N(0, S)``, a target
  ``W* = logit_scale / sqrt(trace S) * N(0, I)`` (so each true logit has standard
  deviation ``logit_scale``), labels ``y_i ~ softmax(x_i W*)``.

  Params ``{'w': (input_dim, num_classes), 'b': (num_classes,)}``, zeros (or
  ``init_scale * N(0, I)``). Loss: mean softmax cross-entropy of ``x W + b``. Batches
  ``(x, y)`` follow a per-task, per-epoch reshuffled order. ``evaluate(params)``:
  ``{'train_loss', 'train_accuracy'}`` on the task's full data.

  Args:
    input_dim: Number of input features.
    num_classes: Number of classes (>= 2).
    num_samples: Rows of each task's data.
    batch_size: Minibatch size, ``<= num_samples``.
    condition: Condition number of ``S`` (>= 1).
    seed: Seed of ``S`` (the family), not of the tasks.
    logit_scale: Standard deviation of the true logits (> 0; larger: cleaner labels).
    init_scale: Standard deviation of the initial parameters (0: zeros).

  Raises:
    ValueError: On a bad argument; the message names it.
  """

  def __init__(
    self,
    input_dim: int,
    num_classes: int,
    num_samples: int,
    batch_size: int,
    condition: float = 100.0,
    seed: int = 0,
    logit_scale: float = 2.0,
    init_scale: float = 0.0,
  ) -> None:
    self.input_dim = _check_positive_int('input_dim', input_dim)
    self.num_classes = _check_positive_int('num_classes', num_classes)
    if self.num_classes < 2:
      raise ValueError(f'num_classes must be >= 2, got {num_classes!r}')
    self._check_sizes(num_samples, batch_size)
    self.condition = _check_float('condition', condition, 1.0, '>= 1')
    self.logit_scale = _check_float('logit_scale', logit_scale, 0.0, '>= 0')
    self.init_scale = _check_float('init_scale', init_scale, 0.0, '>= 0')
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
      raise ValueError(f'seed must be an int, got {seed!r}')
    self.seed = int(seed)
    self._s, self._s_root = spd_matrix(np.random.default_rng(self.seed), self.input_dim,
                                       self.condition)

  def input_covariance(self) -> jax.Array:
    """``S``, the covariance of every task's inputs."""
    return jnp.asarray(self._s, _float_dtype())

  def data(self, task_params: TaskParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(X, labels, W*)`` of the task, generated from ``task_params['data_key']``."""
    dtype = _float_dtype()
    normal_key, label_key = jax.random.split(jax.random.wrap_key_data(task_params['data_key']))
    n, d, k = self.num_samples, self.input_dim, self.num_classes
    z, w = _split_normal(normal_key, [(n, d), (d, k)], dtype)
    x = z @ jnp.asarray(self._s_root, dtype)
    w_star = (self.logit_scale / math.sqrt(float(np.trace(self._s)))) * w
    labels = jax.random.categorical(label_key, x @ w_star, axis=-1).astype(jnp.int32)
    return x, labels, w_star

  def loss(self, params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of ``x W + b``."""
    x, y = batch
    logits = x @ params['w'] + params['b']
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def task(self, task_params: TaskParams) -> Task:
    """The task with these task parameters (traceable; see the class docstring)."""
    x, y, _ = self.data(task_params)
    w_key, b_key = jax.random.split(jax.random.wrap_key_data(task_params['init_key']))
    dtype = x.dtype

    def init() -> Params:
      return {'w': self._init_array(w_key, (self.input_dim, self.num_classes), dtype),
              'b': self._init_array(b_key, (self.num_classes,), dtype)}

    def evaluate(params: Params) -> dict[str, jax.Array]:
      logits = x @ params['w'] + params['b']
      return {
        'train_loss': jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)),
        'train_accuracy': jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(dtype)),
      }

    return Task(init=init, loss=self.loss, batch=self._batch_fn(task_params, x, y),
                evaluate=evaluate, run_batches=self._run_batches_fn(task_params, x, y))
