"""Meta-testing: train held-out tasks with any optax optimiser and compare.

The protocol, in the order a comparison runs it:

1. tasks: :func:`tuning_tasks` (meta-train tasks that meta-training never samples, for
   tuning baselines) and :func:`held_out_tasks` (the tasks every optimiser is compared
   on), each a fixed function of the seed;
2. tuning: :func:`tune_learning_rate` over a grid, compiled once;
3. runs: :func:`run` (or :func:`train` / :func:`train_tracked` for one task), recording
   the loss on each task's whole training set;
4. statistics: :func:`final_train_loss`, :func:`steps_to_loss`, :func:`curve_stats`,
   :func:`mean_std` and :func:`reached_fraction` over the tasks.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from metamd_jax.tasks.base import Task, TaskFamily, batches_of
from metamd_jax.types import PyTree

# Keys of the tasks of meta-testing: ``seed + offset``, offsets that meta-training (which
# samples meta-step ``k`` from ``fold_in(key(seed), k)``) never uses.
TUNE_KEY_OFFSET = 1_000_003
"""Added to the seed for :func:`tuning_tasks`."""
TEST_KEY_OFFSET = 2_000_003
"""Added to the seed for :func:`held_out_tasks`."""


def _tasks(family: TaskFamily, seed: int, offset: int, num_tasks: int) -> PyTree:
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) \
      or num_tasks < 1:
    raise ValueError(f'num_tasks must be an integer >= 1, got {num_tasks!r}.')
  # What metamd_jax.meta_train.sample_tasks draws at step 0 from key(seed + offset).
  return family.sample_batch(jax.random.fold_in(jax.random.key(seed + offset), 0),
                             int(num_tasks))


def tuning_tasks(family: TaskFamily, seed: int, num_tasks: int) -> PyTree:
  """Stacked task parameters for tuning baselines' learning rates.

  Sample them from the meta-train family: they are tasks of the family meta-training
  learns on, drawn with a key (``seed + TUNE_KEY_OFFSET``) that meta-training never uses.

  Args:
    family: the task family (the meta-train family).
    seed: the experiment's seed (the one meta-training's key is made from).
    num_tasks: how many tasks.

  Returns:
    Task parameters with a leading axis of ``num_tasks``, the same for the same seed.
  """
  return _tasks(family, seed, TUNE_KEY_OFFSET, num_tasks)


def held_out_tasks(family: TaskFamily, seed: int, num_tasks: int) -> PyTree:
  """Stacked task parameters of the held-out tasks every optimiser is compared on.

  Drawn with the key ``seed + TEST_KEY_OFFSET``, which neither meta-training nor
  :func:`tuning_tasks` uses: new data subsets, initialisations and batch orders.

  Args:
    family: the task family (the meta-test family).
    seed: the experiment's seed.
    num_tasks: how many tasks.

  Returns:
    Task parameters with a leading axis of ``num_tasks``, the same for the same seed.
  """
  return _tasks(family, seed, TEST_KEY_OFFSET, num_tasks)


class AllDivergedError(ValueError):
  """Every learning rate of a :func:`tune_learning_rate` grid diverged."""


class Curves(NamedTuple):
  """Training runs of one optimiser on a batch of tasks.

  Attributes:
    losses: ``(num_tasks, T)`` minibatch training loss at step ``t`` (on batch ``t``).
    metrics: ``task.evaluate`` of the final parameters, each ``(num_tasks,)``.
    train_losses: ``(num_tasks, T // every + 1)`` loss on each task's whole training set
      after ``0, every, 2 every, ..., T`` steps (``task.evaluate(params)['train_loss']``),
      or ``None`` when not tracked.
    every: steps between two entries of ``train_losses`` (0 when not tracked).
  """

  losses: np.ndarray
  metrics: dict
  train_losses: np.ndarray | None = None
  every: int = 0


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_SIZE = 64


def compile_hoisted(fn: Callable, *args) -> Callable:
  """``jax.jit(fn)``, with every array ``fn`` closes over passed as an argument.

  An optimiser's arrays (a learned divergence, a calibrated level) and a family's data
  are captured constants of the function :func:`run` compiles; as constants they would
  make each optimiser, and each change of the data, a new program. Here they become
  arguments of one traced program (``jax.make_jaxpr``), and programs with the same
  equations (e.g. MetaMD with two divergences of the same shapes, or one optimiser on
  a rescaled copy of the data) share one compiled executable in this process. The
  numbers computed are those of ``jax.jit(fn)``.

  Returns:
    A function of no arguments that runs ``fn(*args)`` and returns its outputs.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  key = str(closed.jaxpr)
  compiled = _COMPILED.get(key)
  if compiled is None:
    jaxpr = closed.jaxpr
    compiled = jax.jit(lambda consts, flat: jax.core.eval_jaxpr(jaxpr, consts, *flat))
    _COMPILED[key] = compiled
    if len(_COMPILED) > _COMPILED_SIZE:
      _COMPILED.popitem(last=False)
  else:
    _COMPILED.move_to_end(key)
  flat_args = jax.tree.leaves(args)
  out_tree = jax.tree.structure(out_shape)
  return lambda: jax.tree.unflatten(out_tree, compiled(closed.consts, flat_args))


def _step_fn(optimizer: optax.GradientTransformation, task: Task, num_steps: int):
  """``((params, opt_state), step) -> ((params, opt_state), minibatch loss)``, a scan body
  for the steps ``[0, num_steps)`` (their batches from :func:`metamd_jax.tasks.base.batches_of`).

  The optimiser gets the minibatch loss as ``optax``'s extra argument ``value`` (used by
  :func:`metamd_jax.guarded_switch` with ``min_progress``; ignored by the others)."""
  batch = batches_of(task, num_steps)
  update = optax.with_extra_args_support(optimizer).update

  def body(carry, step):
    params, state = carry
    loss, grads = jax.value_and_grad(task.loss)(params, batch(step))
    updates, state = update(grads, state, params, value=loss)
    return (optax.apply_updates(params, updates), state), loss

  return body


def train(optimizer: optax.GradientTransformation, task: Task, num_steps: int
          ) -> tuple[PyTree, jax.Array]:
  """Train ``task`` for ``num_steps`` steps with ``optimizer`` in a ``lax.scan``.

  The batches are ``task.batch``'s, sampled once for the run where the task has
  ``run_batches`` (:func:`metamd_jax.tasks.base.batches_of`).

  Returns:
    ``(final_params, losses)`` with ``losses`` of shape ``(num_steps,)``.
  """
  params = task.init()
  (params, _), losses = jax.lax.scan(_step_fn(optimizer, task, num_steps),
                                     (params, optimizer.init(params)),
                                     jnp.arange(num_steps, dtype=jnp.int32))
  return params, losses


def _check_every(num_steps: int, every: int) -> None:
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(f'every must be an integer >= 1, got {every!r}.')
  if num_steps % every:
    raise ValueError(f'num_steps ({num_steps}) must be a multiple of every ({every}).')


def _train_loss(task: Task) -> Callable[[PyTree], jax.Array]:
  if task.evaluate is None:
    raise ValueError('tracking the training loss needs a task with evaluate(params) '
                     "returning 'train_loss'; this task has no evaluate.")

  def loss(params):
    metrics = task.evaluate(params)
    if 'train_loss' not in metrics:
      raise ValueError("tracking the training loss needs task.evaluate(params) to return "
                       f"'train_loss'; it returns {sorted(metrics)}.")
    return metrics['train_loss']

  return loss


def train_tracked(optimizer: optax.GradientTransformation, task: Task, num_steps: int,
                  every: int = 1) -> tuple[PyTree, jax.Array, jax.Array]:
  """:func:`train`, also recording the loss on the task's whole training set.

  The whole-set loss (``task.evaluate(params)['train_loss']``) is free of minibatch noise
  and of the lag a moving average adds, so "steps to reach a loss" can be read off it
  exactly. It costs one pass over the task's data per record: ``every`` spaces them out.

  Returns:
    ``(final_params, losses, train_losses)``: ``losses`` ``(num_steps,)`` as in
    :func:`train`; ``train_losses`` ``(num_steps // every + 1,)`` after ``0, every, ...,
    num_steps`` steps.
  """
  _check_every(num_steps, every)
  train_loss = _train_loss(task)
  params = task.init()
  body = _step_fn(optimizer, task, num_steps)

  def chunk(carry, start):
    carry, losses = jax.lax.scan(body, carry, start + jnp.arange(every, dtype=jnp.int32))
    return carry, (losses, train_loss(carry[0]))

  starts = jnp.arange(0, num_steps, every, dtype=jnp.int32)
  (params, _), (losses, tracked) = jax.lax.scan(chunk, (params, optimizer.init(params)), starts)
  tracked = jnp.concatenate([train_loss(task.init())[None], tracked])
  return params, losses.reshape(num_steps), tracked


def run(optimizer: optax.GradientTransformation, family: TaskFamily, task_params: PyTree,
        num_steps: int, track_every: int = 0,
        extra_metrics: Callable[[PyTree, PyTree], dict] | None = None) -> Curves:
  """Train every task of ``task_params`` (stacked) with ``optimizer``; evaluate each.

  With ``track_every >= 1`` the whole-training-set loss is recorded every ``track_every``
  steps (:func:`train_tracked`) into ``Curves.train_losses``. ``extra_metrics``, a
  traceable ``(task_params, final_params) -> {name: scalar}`` of one task, adds metrics
  next to ``task.evaluate``'s, computed in the same compiled program.

  Raises:
    ValueError: if ``task_params`` are not stacked tasks of ``family``
      (:meth:`metamd_jax.TaskFamily.count_tasks`).
  """
  family.count_tasks(task_params)

  def one(tp):
    task = family.task(tp)
    if track_every:
      params, losses, tracked = train_tracked(optimizer, task, num_steps, track_every)
    else:
      (params, losses), tracked = train(optimizer, task, num_steps), None
    metrics = dict(task.evaluate(params)) if task.evaluate is not None else {}
    if extra_metrics is not None:
      metrics.update(extra_metrics(tp, params))
    return losses, metrics, tracked

  if track_every:
    _check_every(num_steps, track_every)
  losses, metrics, tracked = compile_hoisted(jax.vmap(one), task_params)()
  return Curves(np.asarray(losses), {k: np.asarray(v) for k, v in metrics.items()},
                None if tracked is None else np.asarray(tracked), track_every)


def steps_to_loss(train_losses: np.ndarray, target: float | np.ndarray,
                  every: int = 1) -> np.ndarray:
  """Steps until the tracked whole-set training loss first reaches ``target``.

  Args:
    train_losses: ``(..., K + 1)`` losses after ``0, every, ..., K every`` steps.
    target: a loss, or one per run (broadcast against the leading axes).
    every: steps between two entries.

  Returns:
    ``every * (first index at or below target)``, ``nan`` where never reached. A run
    reaches its own final loss (the comparison allows float rounding).
  """
  losses = np.asarray(train_losses, np.float64)
  target = np.asarray(target, np.float64)[..., None]
  reached = losses <= target + 1e-9 * np.abs(target)
  first = np.argmax(reached, axis=-1).astype(np.float64) * every
  return np.where(np.any(reached, axis=-1), first, np.nan)


def final_train_loss(train_losses: np.ndarray) -> np.ndarray:
  """Last entry of tracked whole-set losses ``(..., K + 1)`` (``inf`` where diverged)."""
  last = np.asarray(train_losses, np.float64)[..., -1]
  return np.where(np.isfinite(last), last, np.inf)


def curve_stats(train_losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std over runs (axis 0) of tracked losses, ignoring diverged entries."""
  curves = np.asarray(train_losses, np.float64)
  curves = np.where(np.isfinite(curves), curves, np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # steps where every run diverged
    return np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)


def mean_std(values: ArrayLike) -> tuple[float, float]:
  """Mean and standard deviation over the finite entries of ``values``.

  Diverged runs (``nan`` / ``inf``) and targets never reached (``nan`` steps) are left
  out; :func:`reached_fraction` says how many entries count.

  Returns:
    ``(mean, std)`` (population std, ``ddof=0``) as floats, ``(nan, nan)`` when no entry
    is finite.

  Examples:
    >>> from metamd_jax import evaluation
    >>> evaluation.mean_std([1.0, 3.0, float('nan')])
    (2.0, 1.0)
  """
  x = np.asarray(values, np.float64).ravel()
  x = x[np.isfinite(x)]
  if x.size == 0:
    return math.nan, math.nan
  return float(np.mean(x)), float(np.std(x))


def reached_fraction(values: ArrayLike) -> float:
  """Fraction of finite entries of ``values``.

  For step counts from :func:`steps_to_loss` (``nan`` where a run never reached the
  target) it is the fraction of runs that reached it; for losses, of runs that stayed
  finite.
  """
  return float(np.mean(np.isfinite(np.asarray(values, np.float64))))


def final_loss(losses: np.ndarray, window: int) -> np.ndarray:
  """Mean of the last ``window`` training losses (``inf`` where a run diverged)."""
  value = np.mean(np.asarray(losses, np.float64)[..., -window:], axis=-1)
  return np.where(np.isfinite(value), value, np.inf)


def tune_learning_rate(
    make_optimizer: Callable[[float], optax.GradientTransformation],
    learning_rates: Sequence[float],
    family: TaskFamily,
    task_params: PyTree,
    num_steps: int,
    window: int,
    score: str = 'minibatch',
    sequential: bool = False,
) -> tuple[float, dict[float, float]]:
  """Pick the learning rate with the lowest mean final training loss on ``task_params``.

  The learning rate is a traced argument vmapped over the grid (optax optimisers accept
  array hyperparameters; ``sequential``: mapped over it), so the whole grid compiles
  once. Ties go to the smaller rate.

  Args:
    score: ``'minibatch'``: the mean of the last ``window`` minibatch losses;
      ``'train_loss'``: the loss of the final parameters on the task's whole training set
      (``task.evaluate(params)['train_loss']``; ``window`` is then unused).
    sequential: run the grid's learning rates one after another in a ``lax.map`` (still
      one compiled program, the tasks vmapped within each rate) instead of vmapping over
      them. The scores are the same; it is for optimisers whose program XLA cannot
      compile with two vmapped axes (``experiments.kronecker_baselines.SEQUENTIAL_GRID``).

  Returns:
    ``(best_learning_rate, {learning_rate: mean final loss})`` (``inf`` if diverged).

  Raises:
    AllDivergedError: when every learning rate of the grid diverged.
  """
  if not learning_rates:
    raise ValueError('learning_rates must not be empty.')
  if score not in ('minibatch', 'train_loss'):
    raise ValueError(f"score must be 'minibatch' or 'train_loss', got {score!r}.")

  def losses(learning_rate, tp):
    task = family.task(tp)
    params, curve = train(make_optimizer(learning_rate), task, num_steps)
    if score == 'train_loss':
      return _train_loss(task)(params)[None]  # a one-entry curve: its own final loss
    return curve

  per_task = jax.vmap(losses, in_axes=(None, 0))
  if sequential:
    grid = lambda rates, tp: jax.lax.map(lambda lr: per_task(lr, tp), rates)  # noqa: E731
  else:
    grid = jax.vmap(per_task, in_axes=(0, None))
  rates = jnp.asarray(learning_rates, jnp.float32)
  curves = np.asarray(compile_hoisted(grid, rates, task_params)())
  window = window if score == 'minibatch' else 1
  scores = {float(lr): float(np.mean(final_loss(c, window)))
            for lr, c in zip(learning_rates, curves)}
  best = min(scores, key=lambda lr: (scores[lr], lr))
  if not math.isfinite(scores[best]):
    raise AllDivergedError(f'every learning rate in {list(learning_rates)} diverged.')
  return best, scores
