"""Small tasks and references shared by the tests."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import metamd_jax
from metamd_jax import divergence as divergence_lib
from metamd_jax.tasks.base import Task, TaskFamily


def well_conditioned(divergence, seed, noise=0.1):
  """A random divergence near the identity: factors ``I + noise * N(0, 1)``."""
  rng = np.random.default_rng(seed)

  def perturb(metric):
    def one(x, dense):
      base = np.eye(x.shape[0]) if dense else np.ones(np.shape(x))
      return jnp.asarray(base + noise * rng.standard_normal(np.shape(x)), x.dtype)

    if isinstance(metric, divergence_lib.KroneckerMetric):
      return dataclasses.replace(metric, left=one(metric.left, metric.left.ndim == 2),
                                 right=one(metric.right, metric.right.ndim == 2))
    return dataclasses.replace(metric, scale=one(metric.scale, False))

  return jax.tree.map(perturb, divergence, is_leaf=divergence_lib.is_metric)


def quadratic_task(dims=(4, 3), seed=0, noise=0.0, dtype=jnp.float32):
  """A least-squares task ``1/2 ||X W - Y||^2 / n`` with a bias, minibatches of 8 rows."""
  rng = np.random.default_rng(seed)
  n = 32
  x = jnp.asarray(rng.standard_normal((n, dims[0])), dtype)
  y = jnp.asarray(rng.standard_normal((n, dims[1])) + noise, dtype)
  init = {'w': jnp.asarray(0.1 * rng.standard_normal(dims), dtype),
          'b': jnp.zeros(dims[1], dtype)}

  def loss(params, batch):
    bx, by = batch
    return 0.5 * jnp.mean(jnp.sum((bx @ params['w'] + params['b'] - by) ** 2, axis=-1))

  def batch(step):
    start = (step * 8) % n
    return (jax.lax.dynamic_slice_in_dim(x, start, 8), jax.lax.dynamic_slice_in_dim(y, start, 8))

  return Task(init=lambda: init, loss=loss, batch=batch)


# A dense leaf, a bias and a convolution kernel, and the structures a divergence can take:
# the trees of the adaptive and eigenbasis optimisers' tests.
SHAPES = {'w': (4, 3), 'b': (3,), 'conv': (2, 2, 2, 3)}
STRUCTURES = [dict(structure='kronecker'), dict(structure='kronecker', max_factor_size=3),
              dict(structure='diagonal'), dict(structure='scalar')]


def random_tree(seed, scale=1.0):
  """Gaussian leaves of :data:`SHAPES` (a parameter or gradient tree)."""
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s)) for k, s in SHAPES.items()}


def random_divergence(options=None, seed=0, dtype=None):
  """A well-conditioned random divergence on :data:`SHAPES`, steps about 0.1."""
  divergence = metamd_jax.init_divergence(random_tree(0), 0.1, dtype=dtype, **(options or {}))
  return well_conditioned(divergence, seed=seed, noise=0.3)


class QuadraticFamily(TaskFamily):
  """Least-squares tasks ``1/2 ||W - W*||^2_A`` with random targets; optionally poisoned
  (a NaN loss) so the meta-trainer's guards can be checked."""

  def __init__(self, shape=(3, 2), poison_every=0):
    self.shape = shape
    self.poison_every = poison_every
    self.count = 0

  def sample(self, key):
    return {'target': jax.random.normal(key, self.shape),
            'poison': jax.random.uniform(jax.random.fold_in(key, 1)) < 0}

  def sample_batch(self, key, num_tasks):
    params = jax.vmap(self.sample)(jax.random.split(key, num_tasks))
    if self.poison_every:
      params['poison'] = jnp.arange(num_tasks) % self.poison_every == 0
    return params

  def task(self, task_params):
    scale = jnp.where(task_params['poison'], jnp.nan, 1.0)

    def loss(params, batch):
      diff = params['w'] - task_params['target']
      return 0.5 * scale * jnp.sum(jnp.linspace(1.0, 3.0, diff.size).reshape(diff.shape)
                                   * diff ** 2)

    return Task(init=lambda: {'w': jnp.zeros(self.shape)}, loss=loss,
                batch=lambda step: None,
                evaluate=lambda params: {'train_loss': loss(params, None)})


class ScaledLeastSquares(TaskFamily):
  """Least squares ``1/2 mean ||c X W + b - Y||^2`` with the targets of ``c = 1``: the
  input scale ``c`` multiplies the curvature of ``W`` by ``c**2``."""

  def __init__(self, input_scale=1.0, dims=(8, 4), num_samples=64, batch_size=16):
    self.input_scale, self.dims = input_scale, dims
    self.num_samples, self.batch_size = num_samples, batch_size

  def sample(self, key):
    return {'key': jax.random.key_data(key)}

  def data(self, task_params):
    key = jax.random.wrap_key_data(task_params['key'])
    kx, kw, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (self.num_samples, self.dims[0]))
    y = x @ jax.random.normal(kw, self.dims) + 0.1 * jax.random.normal(
        kn, (self.num_samples, self.dims[1]))
    return self.input_scale * x, y

  @staticmethod
  def loss(params, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((x @ params['w'] + params['b'] - y) ** 2, axis=-1))

  def task(self, task_params):
    x, y = self.data(task_params)

    def batch(step):
      start = (step * self.batch_size) % self.num_samples
      return (jax.lax.dynamic_slice_in_dim(x, start, self.batch_size),
              jax.lax.dynamic_slice_in_dim(y, start, self.batch_size))

    return Task(init=lambda: {'w': jnp.zeros(self.dims), 'b': jnp.zeros(self.dims[1])},
                loss=self.loss, batch=batch,
                evaluate=lambda params: {'train_loss': self.loss(params, (x, y))})


# Python source that, run first in a fresh process, makes the process kill itself with
# SIGKILL (no clean-up of any kind) when the meta-trainer samples the tasks of meta-step
# $KILL_AT_META_STEP (0-based; unset: never): a real kill at a known point of a run.
KILL_AT_META_STEP = """
import os, signal
from metamd_jax import meta_train

_kill_at = int(os.environ.get('KILL_AT_META_STEP', -1))
_sample_tasks = meta_train.sample_tasks

def _sample_and_maybe_die(family, key, step, meta_batch_size):
  if step == _kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  return _sample_tasks(family, key, step, meta_batch_size)

meta_train.sample_tasks = _sample_and_maybe_die
"""
