"""Meta-testing: train held-out tasks with any optax optimiser and compare."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax.tasks.base import Task, TaskFamily

PyTree = Any


class Curves(NamedTuple):
  """Training runs of one optimiser on a batch of tasks.

  Attributes:
    losses: ``(num_tasks, T)`` training loss at step ``t`` (on batch ``t``).
    metrics: ``task.evaluate`` of the final parameters, each ``(num_tasks,)``.
  """

  losses: np.ndarray
  metrics: dict


def train(optimizer: optax.GradientTransformation, task: Task, num_steps: int
          ) -> tuple[PyTree, jax.Array]:
  """Train ``task`` for ``num_steps`` steps with ``optimizer`` in a ``lax.scan``.

  Returns:
    ``(final_params, losses)`` with ``losses`` of shape ``(num_steps,)``.
  """
  params = task.init()

  def body(carry, step):
    params, state = carry
    loss, grads = jax.value_and_grad(task.loss)(params, task.batch(step))
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  (params, _), losses = jax.lax.scan(body, (params, optimizer.init(params)),
                                     jnp.arange(num_steps, dtype=jnp.int32))
  return params, losses


def run(optimizer: optax.GradientTransformation, family: TaskFamily, task_params: PyTree,
        num_steps: int) -> Curves:
  """Train every task of ``task_params`` (stacked) with ``optimizer``; evaluate each."""

  def one(tp):
    task = family.task(tp)
    params, losses = train(optimizer, task, num_steps)
    metrics = task.evaluate(params) if task.evaluate is not None else {}
    return losses, metrics

  losses, metrics = jax.jit(jax.vmap(one))(task_params)
  return Curves(np.asarray(losses), {k: np.asarray(v) for k, v in metrics.items()})


def smooth(losses: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average over ``window`` steps (shorter at the start), last axis."""
  losses = np.asarray(losses, np.float64)
  cumsum = np.cumsum(losses, axis=-1)
  counts = np.minimum(np.arange(1, losses.shape[-1] + 1), window)
  shifted = np.concatenate([np.zeros(losses.shape[:-1] + (window,)), cumsum], axis=-1)
  return (cumsum - shifted[..., :losses.shape[-1]]) / counts


def final_loss(losses: np.ndarray, window: int) -> np.ndarray:
  """Mean of the last ``window`` training losses (``inf`` where a run diverged)."""
  value = np.mean(np.asarray(losses, np.float64)[..., -window:], axis=-1)
  return np.where(np.isfinite(value), value, np.inf)


def steps_to_reach(losses: np.ndarray, target: float | np.ndarray, window: int) -> np.ndarray:
  """Steps until the smoothed training loss first reaches ``target`` (``nan`` if never)."""
  smoothed = smooth(losses, window)
  target = np.asarray(target, np.float64)[..., None]
  # A run reaches its own final_loss: allow the rounding between the two float64 means.
  reached = smoothed <= target + 1e-9 * np.abs(target)
  first = np.argmax(reached, axis=-1).astype(np.float64) + 1
  return np.where(np.any(reached, axis=-1), first, np.nan)


def tune_learning_rate(
    make_optimizer: Callable[[float], optax.GradientTransformation],
    learning_rates: Sequence[float],
    family: TaskFamily,
    task_params: PyTree,
    num_steps: int,
    window: int,
) -> tuple[float, dict[float, float]]:
  """Pick the learning rate with the lowest mean final training loss on ``task_params``.

  The learning rate is a traced argument vmapped over the grid (optax optimisers accept
  array hyperparameters), so the whole grid compiles once. Ties go to the smaller rate.

  Returns:
    ``(best_learning_rate, {learning_rate: mean final loss})`` (``inf`` if diverged).
  """
  if not learning_rates:
    raise ValueError('learning_rates must not be empty.')

  def losses(learning_rate, tp):
    return train(make_optimizer(learning_rate), family.task(tp), num_steps)[1]

  grid = jax.jit(jax.vmap(jax.vmap(losses, in_axes=(None, 0)), in_axes=(0, None)))
  curves = np.asarray(grid(jnp.asarray(learning_rates, jnp.float32), task_params))
  scores = {float(lr): float(np.mean(final_loss(c, window)))
            for lr, c in zip(learning_rates, curves)}
  best = min(scores, key=lambda lr: (scores[lr], lr))
  if not math.isfinite(scores[best]):
    raise ValueError(f'every learning rate in {list(learning_rates)} diverged.')
  return best, scores
