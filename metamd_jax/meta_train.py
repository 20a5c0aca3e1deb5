"""Meta-training: the meta-step over a meta-batch of tasks, device-agnostic.

A meta-step runs ``T`` inner mirror steps on every task of the meta-batch (``vmap``),
computes the meta-gradient of each task (the implicit bound by default, or the unrolled
loss), averages it over the tasks whose inner run stayed finite, and applies any optax
meta-optimiser. A task whose inner loss becomes NaN or infinite is dropped from the
meta-batch and counted; a non-finite meta-gradient is skipped and counted, and never
written into the divergence. When every inner run of a meta-step diverges, the step sizes
are backed off (halved) so that meta-training can recover.

The state also keeps the best divergence seen so far by a training-data score: the mean
inner training loss along the run (the realised average loss that the regret bound
bounds), averaged over the meta-batch and smoothed by an exponential moving average over
meta-steps. Minimising the bound with the final iterate as comparator is a fixed-point
iteration, not a descent on the trained loss: run long enough, it can drift to step sizes
that train worse (experiments/RESULTS.md). Keeping the best-scoring divergence is early
stopping on training data only; no validation set is involved.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from metamd_jax import bound, checkpoint, objectives, parallel
from metamd_jax import divergence as divergence_lib
from metamd_jax.tasks.base import TaskFamily
from metamd_jax.types import PyTree


class MetaTrainState(NamedTuple):
  """State of meta-training.

  Attributes:
    step: number of meta-steps taken, int32 ``()``.
    divergence: the divergence being learned (its leaves are the meta-parameters).
    opt_state: the meta-optimiser's state.
    skipped_updates: meta-steps whose meta-gradient was not finite, int32 ``()``.
    dropped_tasks: inner runs dropped for a non-finite loss, int32 ``()``.
    score: moving average of the meta-batches' mean inner training loss, float32 ``()``
      (bias-corrected; ``inf`` before the first finite score).
    score_weight: total weight of that average, ``1 - decay**k``, float32 ``()``.
    best_score: the lowest ``score`` so far, float32 ``()``.
    best_divergence: the divergence that was evaluated at the meta-step of ``best_score``
      (the initial divergence until a score is finite); one more copy of the divergence
      in memory.
    best_step: that meta-step, 1-based as the ``'step'`` of the metric records (the
      divergence evaluated by meta-step ``k`` is the one ``k - 1`` updates produced);
      0 until a score is finite. int32 ``()``.
  """

  step: jax.Array
  divergence: PyTree
  opt_state: optax.OptState
  skipped_updates: jax.Array
  dropped_tasks: jax.Array
  score: jax.Array
  score_weight: jax.Array
  best_score: jax.Array
  best_divergence: PyTree
  best_step: jax.Array


def init_state(divergence: PyTree, meta_optimizer: optax.GradientTransformation
               ) -> MetaTrainState:
  """The meta-training state at step 0."""
  zero = jnp.zeros((), jnp.int32)
  inf = jnp.asarray(jnp.inf, jnp.float32)
  return MetaTrainState(step=zero, divergence=divergence,
                        opt_state=meta_optimizer.init(divergence), skipped_updates=zero,
                        dropped_tasks=zero, score=inf, score_weight=jnp.zeros((), jnp.float32),
                        best_score=inf, best_divergence=divergence, best_step=zero)


def sample_tasks(family: TaskFamily, key: jax.Array, step: int | jax.Array,
                 meta_batch_size: int) -> PyTree:
  """Task parameters of the meta-batch of meta-step ``step`` (a function of the step only,
  so that a resumed run sees exactly the tasks an uninterrupted one would)."""
  return family.sample_batch(jax.random.fold_in(key, step), meta_batch_size)


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_meta_step(
    family: TaskFamily,
    meta_optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    objective: str = 'bound',
    adjoint: str = 'auto',
    solver: str = 'exact',
    solver_options: dict | None = None,
    axis_name: str | None = None,
    backoff: float = 0.5,
    score_decay: float = 0.9,
) -> Callable[[MetaTrainState, PyTree], tuple[MetaTrainState, dict]]:
  """Build ``meta_step(state, task_params) -> (state, metrics)``.

  Args:
    family: the task family (``task_params`` are stacked samples of it).
    meta_optimizer: any optax transformation, applied to the divergence.
    num_steps: the inner horizon ``T``.
    objective: ``'bound'`` or ``'unrolled'`` (see :func:`metamd_jax.meta_gradient`).
    adjoint: ``'auto'`` (the default: ``'statistics'`` with ``solver='exact'``, else
      ``'implicit'``), ``'implicit'`` or ``'statistics'`` (``solver='exact'`` only); see
      :func:`metamd_jax.rollout` and :func:`metamd_jax.bound.resolve_adjoint`.
    solver: adjoint solver of the mirror step.
    solver_options: options of a matrix-free solver.
    axis_name: the ``pmap`` axis the meta-batch is sharded over, or ``None``.
    backoff: when every inner run of a meta-step diverges, the divergence's steps are
      multiplied by this factor (see :func:`metamd_jax.divergence.scale_steps`).
    score_decay: decay of the moving average of the selection score, in ``[0, 1)``
      (0: the current meta-batch alone). A task scores its mean inner loss, capped at its
      initial loss: a run that diverged, or blew up while staying finite, scores as no
      progress rather than flooding the average. A meta-step with no finite score leaves
      the average unchanged.

  Returns:
    The meta-step function (jit it, or pmap it with ``axis_name``).
  """
  if not 0 < backoff <= 1:
    raise ValueError(f'backoff must be in (0, 1], got {backoff}.')
  if not 0 <= score_decay < 1:
    raise ValueError(f'score_decay must be in [0, 1), got {score_decay}.')
  if objective not in objectives.OBJECTIVES:
    raise ValueError(f'unknown objective {objective!r}; expected one of {objectives.OBJECTIVES}.')
  adjoint = bound.resolve_adjoint(adjoint, solver)
  solver_options = dict(solver_options or {})

  def meta_step(state: MetaTrainState, task_params: PyTree) -> tuple[MetaTrainState, dict]:
    def one_task(tp):
      result = objectives.meta_gradient(state.divergence, family.task(tp), num_steps,
                                        objective=objective, adjoint=adjoint, solver=solver,
                                        **solver_options)
      finite = (jnp.isfinite(result.loss) & jnp.all(jnp.isfinite(result.losses))
                & jnp.isfinite(result.final_loss) & _all_finite(result.grad))
      return result, finite

    results, finite = jax.vmap(one_task)(task_params)
    weights = finite.astype(jnp.float32)

    def masked_sum(x):
      w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
      return jnp.sum(jnp.where(w > 0, x, 0), axis=0)

    num_ok = parallel.psum_if_pmap(jnp.sum(weights), axis_name)
    num_tasks = parallel.psum_if_pmap(jnp.asarray(weights.shape[0], jnp.float32), axis_name)
    denominator = jnp.maximum(num_ok, 1.0)
    grad = parallel.psum_if_pmap(jax.tree.map(masked_sum, results.grad), axis_name)
    grad = jax.tree.map(lambda g: g / denominator, grad)
    sums = parallel.psum_if_pmap(
        {'meta_loss': masked_sum(results.loss), 'first_loss': masked_sum(results.losses[:, 0]),
         'final_loss': masked_sum(results.final_loss)}, axis_name)
    metrics = {k: v / denominator for k, v in sums.items()}

    # Selection score of the divergence evaluated here (before this step's update).
    first = results.losses[:, 0]
    task_score = jnp.where(finite, jnp.minimum(jnp.mean(results.losses, axis=1), first), first)
    scored = jnp.isfinite(task_score)
    score_sums = parallel.psum_if_pmap(
        {'sum': jnp.sum(jnp.where(scored, task_score, 0.0)),
         'count': jnp.sum(scored.astype(jnp.float32))}, axis_name)
    has_score = score_sums['count'] > 0
    batch_score = score_sums['sum'] / jnp.maximum(score_sums['count'], 1.0)
    weight = score_decay * state.score_weight + (1 - score_decay)
    previous = jnp.where(state.score_weight > 0, state.score * state.score_weight, 0.0)
    average = (score_decay * previous + (1 - score_decay) * batch_score) / weight
    score = jnp.where(has_score, average, state.score).astype(jnp.float32)
    score_weight = jnp.where(has_score, weight, state.score_weight).astype(jnp.float32)
    improved = has_score & (score < state.best_score)
    best_divergence = jax.tree.map(lambda a, b: jnp.where(improved, a, b), state.divergence,
                                   state.best_divergence)

    updates, opt_state = meta_optimizer.update(grad, state.opt_state, state.divergence)
    divergence = optax.apply_updates(state.divergence, updates)
    ok = (num_ok > 0) & _all_finite(grad) & _all_finite(divergence)

    def choose(new, old):
      return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    # Every inner run diverged: the learned steps are too long for this family. Back
    # off (halve the mirror-descent steps) instead of keeping a divergence no task survives.
    all_dropped = num_ok == 0
    kept = jax.tree.map(lambda a, b: jnp.where(all_dropped, a, b),
                        divergence_lib.scale_steps(state.divergence, backoff),
                        state.divergence)
    dropped = (num_tasks - num_ok).astype(jnp.int32)
    new_state = MetaTrainState(
        step=state.step + 1,
        divergence=choose(divergence, kept),
        opt_state=choose(opt_state, state.opt_state),
        skipped_updates=state.skipped_updates + (~ok).astype(jnp.int32),
        dropped_tasks=state.dropped_tasks + dropped,
        score=score,
        score_weight=score_weight,
        best_score=jnp.where(improved, score, state.best_score),
        best_divergence=best_divergence,
        best_step=jnp.where(improved, state.step + 1, state.best_step).astype(jnp.int32),
    )
    metrics.update(grad_norm=optax.tree.norm(grad), dropped_tasks=dropped,
                   skipped=(~ok).astype(jnp.int32), backed_off=all_dropped.astype(jnp.int32),
                   mean_loss=jnp.where(has_score, batch_score, jnp.nan), score=score,
                   best_score=jnp.where(improved, score, state.best_score))
    return new_state, metrics

  return meta_step


SELECTIONS = ('best', 'last')


class FitResult(NamedTuple):
  """What :func:`fit` returns.

  Attributes:
    divergence: the kept divergence: ``state.best_divergence`` for ``select='best'``,
      the last meta-iterate ``state.divergence`` for ``select='last'``.
    state: the final :class:`MetaTrainState` (host arrays, one copy).
    history: one metric record per meta-step ``1 .. state.step`` (also the steps run
      before a resume): ``{'step', 'meta_loss', 'first_loss', 'final_loss', 'grad_norm',
      'dropped_tasks', 'skipped', 'backed_off', 'mean_loss', 'score', 'best_score',
      'seconds'}``, floats (``nan`` / ``inf`` where the metric is undefined).
    resumed_from: the meta-step restored from a checkpoint in ``workdir``, or ``None``.
  """

  divergence: PyTree
  state: MetaTrainState
  history: list[dict]
  resumed_from: int | None


# What a run's checkpoints were written by (``workdir/checkpoints/run.json``): a resumed
# run must be the same run.
RUN_FILE = 'run.json'


def _flatten(tree: Any, prefix: str = '') -> dict:
  if isinstance(tree, dict):
    out = {}
    for name, value in tree.items():
      out.update(_flatten(value, f'{prefix}{name}.'))
    return out
  return {prefix[:-1]: tree}


def check_resumed_run(directory: str | os.PathLike, description: Mapping[str, Any]) -> None:
  """Raise unless ``description`` is the run that wrote the checkpoints in ``directory``.

  ``description`` (JSON data) is compared with the ``run.json`` the run wrote at its start;
  checkpoints without one (an earlier version's) are not checked.

  Raises:
    ValueError: naming each entry that differs, with both values.
  """
  path = pathlib.Path(directory) / RUN_FILE
  if not path.exists():
    return
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f'{path} is not JSON ({error}); it records the run that wrote these '
                     'checkpoints: use a new workdir.') from error
  now = json.loads(json.dumps(description, default=repr))  # as _write_run writes it
  stored_flat, now_flat = _flatten(stored), _flatten(now)
  differ = sorted(k for k in set(stored_flat) | set(now_flat)
                  if stored_flat.get(k, '<absent>') != now_flat.get(k, '<absent>'))
  if differ:
    shown = '; '.join(f'{k}: {stored_flat.get(k, "<absent>")!r} then, '
                      f'{now_flat.get(k, "<absent>")!r} now' for k in differ[:8])
    more = f' (and {len(differ) - 8} more)' if len(differ) > 8 else ''
    raise ValueError(f'the checkpoints in {directory} were written by another run: {shown}'
                     f'{more}. Resume with the arguments they were written with, or use a new '
                     'workdir.')


def _write_run(directory: pathlib.Path, description: Mapping[str, Any]) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  temporary = directory / f'.{RUN_FILE}.tmp'
  # A value JSON has no form for (e.g. an array among solver_options) is written as its
  # repr: compared as that.
  temporary.write_text(json.dumps(description, indent=1, sort_keys=True, default=repr)
                       + '\n')
  os.replace(temporary, directory / RUN_FILE)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def fit(
    family: TaskFamily,
    divergence: PyTree,
    meta_optimizer: optax.GradientTransformation,
    *,
    num_meta_steps: int,
    horizon: int,
    meta_batch_size: int,
    key: jax.Array | int = 0,
    workdir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    select: str = 'best',
    objective: str = 'bound',
    adjoint: str = 'auto',
    solver: str = 'exact',
    solver_options: dict | None = None,
    backoff: float = 0.5,
    score_decay: float = 0.9,
    num_devices: int = 0,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    run_info: Mapping[str, Any] | None = None,
) -> FitResult:
  """Meta-train ``divergence`` on ``family``: the whole loop, resumable and sharded.

  Each meta-step samples a meta-batch of tasks (a function of the key and the step only,
  :func:`sample_tasks`), runs :func:`make_meta_step` on it, sharded over the local devices
  and processes when there are several (:mod:`metamd_jax.parallel`; ``meta_batch_size``
  must divide evenly over all of them), and records its metrics. With a ``workdir``,
  orbax checkpoints (state and history) are written every ``checkpoint_every`` meta-steps
  and at the end, and a call on a workdir that has checkpoints resumes from the latest:
  the result is bit for bit that of an uninterrupted run. The first call also writes
  ``workdir/checkpoints/run.json``, what defines the run: the arguments below but
  ``num_meta_steps``, ``checkpoint_every``, ``select``, ``num_devices``, ``callback`` and
  ``progress``, the initial divergence's digest, the family's type and ``run_info``; a
  resuming call with other values is an error naming them (``num_meta_steps`` may grow:
  the run goes on). Nothing else is written: the caller saves the artifact
  (:func:`metamd_jax.save_divergence`) and logs the history.

  Args:
    family: the task family to meta-train on.
    divergence: the initial divergence (e.g. :func:`metamd_jax.init_divergence`).
    meta_optimizer: any optax transformation, applied to the divergence.
    num_meta_steps: total meta-steps (a resumed run runs the rest).
    horizon: inner steps ``T`` per task.
    meta_batch_size: tasks per meta-step, over all devices and processes.
    key: PRNG key (or integer seed) of the task sampling.
    workdir: directory for checkpoints (``workdir/checkpoints``); ``None``: none.
    checkpoint_every: meta-steps between checkpoints.
    select: ``'best'`` keeps the divergence with the lowest moving average of the mean
      inner training loss (training data only), ``'last'`` the final meta-iterate.
    objective: ``'bound'`` or ``'unrolled'`` (see :func:`make_meta_step`).
    adjoint: ``'auto'`` (the default), ``'implicit'`` or ``'statistics'`` (see
      :func:`make_meta_step`).
    solver: adjoint solver of the mirror step.
    solver_options: options of a matrix-free solver.
    backoff: step factor applied when every inner run of a meta-step diverges.
    score_decay: decay of the selection score's moving average, in ``[0, 1)``.
    num_devices: local devices to shard the meta-batch over (0: all).
    callback: called with each new metric record (on every process; write shared files
      only where :func:`metamd_jax.parallel.is_writer`).
    progress: show a progress bar (on the writing process).
    run_info: JSON data for what the other arguments cannot say (e.g. the meta-optimiser's
      settings, or a config's task and meta sections): recorded in ``run.json`` and
      compared on resume.

  Returns:
    A :class:`FitResult`.

  Raises:
    ValueError: on bad arguments, or when resuming checkpoints that another run wrote
      (:func:`check_resumed_run`) or that are beyond ``num_meta_steps``.

  Examples:
    >>> import optax, metamd_jax
    >>> from metamd_jax import meta_train, tasks
    >>> family = tasks.LeastSquaresFamily(input_dim=4, output_dim=2, num_samples=32,
    ...                                   batch_size=8)
    >>> divergence = metamd_jax.init_divergence(family.init_params(), learning_rate=0.1)
    >>> result = meta_train.fit(family, divergence, optax.adam(1e-2), num_meta_steps=2,
    ...                         horizon=5, meta_batch_size=2)
    >>> [record['step'] for record in result.history]
    [1, 2]
  """
  num_meta_steps = _check_int('num_meta_steps', num_meta_steps, 0)
  horizon = _check_int('horizon', horizon, 1)
  meta_batch_size = _check_int('meta_batch_size', meta_batch_size, 1)
  checkpoint_every = _check_int('checkpoint_every', checkpoint_every, 1)
  if select not in SELECTIONS:
    raise ValueError(f'select must be one of {SELECTIONS}, got {select!r}.')
  divergence_lib.check_divergence(divergence)
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    key = jax.random.key(int(key))

  runner = parallel.MetaStepRunner(meta_batch_size, num_devices)
  runner.compile(make_meta_step(
      family, meta_optimizer, num_steps=horizon, objective=objective, adjoint=adjoint,
      solver=solver, solver_options=solver_options, axis_name=runner.axis_name,
      backoff=backoff, score_decay=score_decay))

  state = init_state(divergence, meta_optimizer)
  history: list[dict] = []
  resumed_from = None
  checkpointer = None
  if workdir is not None:
    description = {
        'family': type(family).__name__, 'initial_divergence': divergence_lib.digest(divergence),
        'key': np.asarray(jax.random.key_data(key) if jnp.issubdtype(
            key.dtype, jax.dtypes.prng_key) else key).tolist(), 'horizon': horizon,
        'meta_batch_size': meta_batch_size, 'objective': objective, 'adjoint': adjoint,
        'solver': solver, 'solver_options': solver_options or {}, 'backoff': backoff,
        'score_decay': score_decay, 'run_info': run_info}
    checkpointer = checkpoint.Checkpointer(pathlib.Path(workdir) / 'checkpoints',
                                           every=checkpoint_every)
    if checkpointer.latest_step() is None:
      if parallel.is_writer():
        _write_run(pathlib.Path(checkpointer.directory), description)
    else:
      try:
        check_resumed_run(checkpointer.directory, description)
      except ValueError:
        checkpointer.close()
        raise
      try:
        state, history, skipped = checkpointer.restore_intact(state)
      except ValueError as error:
        checkpointer.close()
        raise ValueError(
            f'the checkpoint in {checkpointer.directory} does not match this meta-training '
            'state (another model, divergence structure or meta-optimiser?) or is damaged; '
            'resume with the arguments it was written with or use a new workdir. Details: '
            f'{error}') from error
      for step, error in skipped:
        warnings.warn(f'the checkpoint of meta-step {step} in {checkpointer.directory} does '
                      f'not restore ({error}); resuming from an earlier one.', RuntimeWarning,
                      stacklevel=2)
      resumed_from = int(state.step)
      if len(history) != resumed_from:
        raise ValueError(f'the checkpoint of meta-step {resumed_from} in '
                         f'{checkpointer.directory} holds {len(history)} metric records.')
      if resumed_from > num_meta_steps:
        checkpointer.close()
        raise ValueError(f'the checkpoints in {checkpointer.directory} are at meta-step '
                         f'{resumed_from}, beyond num_meta_steps = {num_meta_steps}: resume '
                         'with at least as many meta-steps, or use a new workdir.')
  start = int(state.step)

  writer = parallel.is_writer()
  bar = tqdm.tqdm(total=num_meta_steps, initial=min(start, num_meta_steps), desc='meta-train',
                  disable=not (progress and writer), dynamic_ncols=True)
  if resumed_from is not None and progress and writer:
    bar.write(f'resumed from meta-step {resumed_from} ({checkpointer.directory})')
  device_state = runner.to_devices(state)
  try:
    for step in range(start, num_meta_steps):
      task_params = sample_tasks(family, key, step, meta_batch_size)
      started = time.perf_counter()
      device_state, metrics = runner.step(device_state, task_params)
      record = {'step': step + 1, **metrics, 'seconds': time.perf_counter() - started}
      history.append(record)
      if callback is not None:
        callback(record)
      bar.set_postfix(meta_loss=f"{record['meta_loss']:.4g}",
                      final_loss=f"{record['final_loss']:.4g}")
      bar.update()
      if checkpointer is not None and checkpointer.should_save(step + 1):
        checkpointer.save(step + 1, runner.to_host(device_state), history)
    state = runner.to_host(device_state)
    if checkpointer is not None and checkpointer.latest_step() != int(state.step):
      checkpointer.save(int(state.step), state, history, force=True)
  finally:
    bar.close()
    if checkpointer is not None:
      checkpointer.close()
  state = jax.tree.map(jnp.asarray, state)
  kept = state.best_divergence if select == 'best' else state.divergence
  return FitResult(divergence=kept, state=state, history=history, resumed_from=resumed_from)
