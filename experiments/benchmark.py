"""Benchmark MetaMD against tuned optax optimisers on several task families (issue #6).

  python -m experiments.benchmark --config configs/benchmark.py --workdir runs/benchmark
  python -m experiments.benchmark --config configs/benchmark.py --workdir runs/smoke \
      --config.quick=True

For every family of the config (each a full experiment config, see ``configs/benchmark.py``):

1. meta-train the learned optimisers at horizon ``T = meta.horizon``: MetaMD (Kronecker,
   bound objective), the diagonal (Meta-SGD) divergence and the Kronecker divergence on
   the unrolled objective, each with :func:`experiments.meta_train.meta_train` in its own
   sub-workdir ``<workdir>/<family>/<variant>`` (a rerun resumes from the checkpoints);
2. tune each baseline's learning rate on meta-train tasks
   (:func:`metamd_jax.evaluation.tune_learning_rate`, scored by the final loss on the whole
   training set), then train every optimiser on the same held-out tasks (the keys of
   :mod:`experiments.evaluate`) for ``T`` steps. Each run is compiled once (a warm-up call)
   and then timed (``block_until_ready``), per task, training only; an untimed run records
   the loss on the task's whole training set after every step
   (:func:`metamd_jax.evaluation.train_tracked`);
3. report, mean and std over held-out tasks: the steps (and seconds: steps times the timed
   seconds per step) MetaMD needs to reach each tuned baseline's final training loss,
   every optimiser's steps and seconds to the reference's (tuned Adam's) final loss, final
   training loss and test metrics; and the learned optimisers' training loss at ``T`` and
   at ``horizon_multiplier * T``. "Training loss" is the whole-training-set loss: no
   minibatch noise and no moving-average lag in the step counts;
4. on a held-out dataset (``heldout.dataset``), the same comparison without timing;
5. on the convex least-squares family, each divergence's strong-convexity constant, its
   bound (:func:`metamd_jax.inner_loop.rollout`) next to SGD's and the observed
   suboptimality.

Writes to the workdir ``results.json``, ``results.md`` (printed) and per family
``<family>_loss_vs_step.png``, ``<family>_loss_vs_time.png`` and
``<family>_beyond_horizon.png``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

# One OpenBLAS thread, as in experiments/main.py (set before numpy loads; a user's
# value wins).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import builders  # noqa: E402
from experiments import meta_train as meta_train_exp  # noqa: E402
from experiments.evaluate import TEST_KEY_OFFSET, TUNE_KEY_OFFSET  # noqa: E402
from metamd_jax import datasets, evaluation, inner_loop  # noqa: E402
from metamd_jax import meta_train as meta_train_lib  # noqa: E402
from metamd_jax.tasks import ClassificationFamily, LeastSquaresFamily  # noqa: E402

HELDOUT_DATASETS = ('', 'digits28', 'mnist1d')


# ---------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  copied = config.copy_and_resolve_references()
  copied.unlock()
  return copied


def family_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The experiment config of family ``name`` with the benchmark's evaluation settings."""
  if name not in config.families:
    raise ValueError(f'config.family_names names {name!r}, which is not in config.families '
                     f'({sorted(config.families)}).')
  family = _copy(config.families[name])
  ev = family.eval
  ev.num_tasks = config.quick_num_tasks if config.quick else config.num_tasks
  ev.num_tune_tasks = config.num_tune_tasks
  ev.num_steps = family.meta.horizon  # held-out runs last T steps, the meta-training horizon
  ev.baselines = tuple(config.baselines)
  ev.learning_rates = tuple(config.quick_learning_rates if config.quick
                            else config.learning_rates)
  if config.quick:
    family.meta.num_meta_steps = min(family.meta.num_meta_steps, config.quick_meta_steps)
  family.meta.checkpoint_every = max(1, min(family.meta.checkpoint_every,
                                            family.meta.num_meta_steps))
  builders.validate_config(family)
  heldout = family.get('heldout', None)
  if heldout is not None and heldout.dataset not in HELDOUT_DATASETS:
    raise ValueError(f'config.families.{name}.heldout.dataset must be one of '
                     f'{HELDOUT_DATASETS}, got {heldout.dataset!r}.')
  return family


def variant_config(family: ml_collections.ConfigDict,
                   variant: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The family's config for one learned optimiser (structure, objective, meta-steps)."""
  config = _copy(family)
  config.meta.structure = variant.structure
  config.meta.objective = variant.objective
  for field, value in variant.get('meta', {}).items():  # the variant's own meta-settings
    if field not in config.meta:
      raise ValueError(f'variant meta override names {field!r}, which is not a meta field '
                       f'({sorted(config.meta)}).')
    config.meta[field] = value
  config.meta.num_meta_steps = max(
      1, int(round(variant.meta_steps_fraction * family.meta.num_meta_steps)))
  config.meta.checkpoint_every = max(1, min(config.meta.checkpoint_every,
                                            config.meta.num_meta_steps))
  builders.validate_config(config)
  return config


def family_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The families to run (``quick_family_names`` in a quick run)."""
  if config.quick and config.quick_family_names:
    return tuple(config.quick_family_names)
  return tuple(config.family_names)


def validate(config: ml_collections.ConfigDict) -> None:
  """Check the benchmark's own fields and every family's config; raise ``ValueError``."""
  if not family_names(config):
    raise ValueError('config.family_names must name at least one family.')
  if config.reference not in config.baselines:
    raise ValueError(f'config.reference ({config.reference!r}) must be one of config.baselines '
                     f'{tuple(config.baselines)}.')
  for name in config.variant_names:
    if name not in config.variants:
      raise ValueError(f'config.variant_names names {name!r}, not in config.variants.')
    if name in config.baselines:
      raise ValueError(f'variant {name!r} has the name of a baseline.')
  if 'metamd' not in config.variant_names:
    raise ValueError("config.variant_names must include 'metamd'.")
  for field in ('num_tasks', 'num_tune_tasks', 'horizon_multiplier', 'timing_repeats'):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'config.{field} must be an integer >= 1, got {value!r}.')
  for name in family_names(config):
    family = family_config(config, name)
    for variant in config.variant_names:
      variant_config(family, config.variants[variant])


# ---------------------------------------------------------------------------
# Held-out datasets (never seen by meta-training).
# ---------------------------------------------------------------------------


def _digits28(split: str) -> datasets.Dataset:
  """scikit-learn's 8x8 digits resized to 28x28x1: new data that fits an MNIST model."""
  digits = datasets.load_dataset('digits', split=split)
  x = jax.image.resize(jnp.asarray(digits.x), (len(digits), 28, 28, 1), 'linear')
  return datasets.Dataset(np.asarray(x), digits.y, digits.num_classes, f'digits28:{split}')


def heldout_family(family: ml_collections.ConfigDict) -> ClassificationFamily | None:
  """The family's held-out-dataset meta-test family (``None`` if it has none)."""
  heldout = family.get('heldout', None)
  if heldout is None or not heldout.dataset or family.task.family != 'classification':
    return None
  if heldout.dataset == 'digits28':
    train, test = _digits28('train'), _digits28('test')
  else:
    generator = dict(heldout.generator)
    train = datasets.load_dataset('mnist1d', split='train', **generator)
    test = datasets.load_dataset('mnist1d', split='test', **generator)
  task = family.task
  subset_size = min(task.subset_size or len(train), len(train))
  return ClassificationFamily(train=train, test=test,
                              model=builders.build_model(task, train.num_classes),
                              batch_size=task.batch_size, subset_size=subset_size, l2=task.l2)


# ---------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------


def _task(task_params, index: int):
  return jax.tree.map(lambda x: x[index], task_params)


def _evaluator(family):
  """One compiled ``(task_params, final_params) -> metrics`` for every optimiser."""
  if family.task(family.sample(jax.random.key(0))).evaluate is None:
    return None
  return jax.jit(jax.vmap(lambda tp, p: family.task(tp).evaluate(p)))


def _metrics(evaluate, task_params, final_params) -> dict:
  if evaluate is None:
    return {}
  return {k: np.asarray(v) for k, v in evaluate(task_params, final_params).items()}


def train_tasks(optimizer, family, task_params, num_steps: int, evaluate,
                every: int = 1) -> dict:
  """Train every task (vmapped) for ``num_steps``, tracking the whole-set training loss.

  Returns:
    ``{'losses': (num_tasks, T) minibatch losses, 'train_losses': (num_tasks, T // every
    + 1) whole-training-set losses after 0, every, ..., T steps, 'every', 'metrics'}``.
  """
  run = jax.jit(jax.vmap(
      lambda tp: evaluation.train_tracked(optimizer, family.task(tp), num_steps, every)))
  final_params, losses, tracked = run(task_params)
  return {'losses': np.asarray(losses), 'train_losses': np.asarray(tracked), 'every': every,
          'metrics': _metrics(evaluate, task_params, final_params)}


def time_runs(optimizer, family, task_params, num_steps: int, repeats: int) -> np.ndarray:
  """Seconds per task of a ``num_steps``-step training run (:func:`evaluation.train`).

  Each task runs on its own, compiled once (a warm-up call); the median over ``repeats``
  timed runs (``block_until_ready``) is kept. Nothing but training is timed.
  """
  train = jax.jit(lambda tp: evaluation.train(optimizer, family.task(tp), num_steps))
  num_tasks = jax.tree.leaves(task_params)[0].shape[0]
  jax.block_until_ready(train(_task(task_params, 0)))  # compile once
  seconds = []
  for index in range(num_tasks):
    tp = _task(task_params, index)
    times = []
    for _ in range(repeats):
      started = time.perf_counter()
      jax.block_until_ready(train(tp))
      times.append(time.perf_counter() - started)
    seconds.append(float(np.median(times)))
  return np.asarray(seconds)


def timed_run(optimizer, family, task_params, num_steps: int, repeats: int,
              evaluate) -> dict:
  """:func:`train_tasks` (every step tracked) plus ``'seconds'`` from :func:`time_runs`."""
  run = train_tasks(optimizer, family, task_params, num_steps, evaluate)
  run['seconds'] = time_runs(optimizer, family, task_params, num_steps, repeats)
  return run


def final_train_loss(run: dict) -> np.ndarray:
  """Whole-training-set loss after the last step (``inf`` where a run diverged)."""
  return evaluation.final_train_loss(run['train_losses'])


def _mean_std(x) -> list:
  """``[mean, std]`` over the finite entries (``[None, None]`` if there are none)."""
  x = np.asarray(x, np.float64).ravel()
  x = x[np.isfinite(x)]
  if x.size == 0:
    return [None, None]
  return [float(np.mean(x)), float(np.std(x))]


def _fraction_finite(x) -> float:
  return float(np.mean(np.isfinite(np.asarray(x, np.float64))))


def _curve_stats(run: dict) -> tuple[list, list]:
  mean, std = evaluation.curve_stats(run['train_losses'])
  return mean.tolist(), std.tolist()


def _steps_and_seconds(run: dict, target, seconds_per_step) -> dict:
  steps = evaluation.steps_to_loss(run['train_losses'], target, run['every'])
  return {'steps': _mean_std(steps), 'seconds': _mean_std(steps * seconds_per_step),
          'reached_fraction': _fraction_finite(steps),
          'steps_per_task': [None if not math.isfinite(s) else float(s) for s in steps]}


# ---------------------------------------------------------------------------
# One family.
# ---------------------------------------------------------------------------


def _meta_train_variants(config, family, workdir: pathlib.Path, progress: bool) -> tuple:
  learned, info = {}, {}
  for name in config.variant_names:
    vconfig = variant_config(family, config.variants[name])
    vdir = workdir / name
    started = time.perf_counter()
    learned[name] = meta_train_exp.meta_train(vconfig, vdir, progress=progress)
    records = [json.loads(line) for line in
               (vdir / meta_train_exp.METRICS).read_text().splitlines() if line.strip()]
    info[name] = {
        'structure': vconfig.meta.structure,
        'objective': vconfig.meta.objective,
        'num_meta_steps': vconfig.meta.num_meta_steps,
        'horizon': vconfig.meta.horizon,
        'seconds_this_run': time.perf_counter() - started,
        'seconds_logged': float(sum(r['seconds'] for r in records)),
        'first_meta_loss': records[0]['meta_loss'] if records else None,
        'last_meta_loss': records[-1]['meta_loss'] if records else None,
        'select': vconfig.meta.select,
        'dropped_tasks': int(sum(r['dropped_tasks'] for r in records)),
        'backed_off': int(sum(r.get('backed_off', 0) for r in records)),
    }
    scores = [r.get('score', math.inf) for r in records]
    if records and any(math.isfinite(x) for x in scores):
      best = int(np.nanargmin(np.asarray(scores, np.float64)))
      # The divergence kept under select='best' is the one evaluated at this meta-step.
      info[name].update(best_meta_step=records[best]['step'], best_score=scores[best],
                        last_score=scores[-1])
  return learned, info


def _tune_baselines(config, family_cfg, train_family, tune_tasks) -> tuple[dict, dict]:
  ev = family_cfg.eval
  learning_rates, scores = {}, {}
  for name in config.baselines:
    try:
      best, score = evaluation.tune_learning_rate(
          builders.BASELINES[name], ev.learning_rates, train_family, tune_tasks, ev.num_steps,
          ev.window, score='train_loss')
    except ValueError as error:  # every learning rate diverged
      logging.warning('baseline %s: %s', name, error)
      best, score = None, {}
    learning_rates[name] = best
    scores[name] = {f'{lr:g}': (s if math.isfinite(s) else None) for lr, s in score.items()}
  return learning_rates, scores


def _convex_report(family: LeastSquaresFamily, divergences: dict, test_tasks,
                   num_steps: int) -> dict:
  """Strong convexity, bound and observed suboptimality of each divergence (held-out)."""

  def one(divergence, tp):
    task = family.task(tp)
    rollout = inner_loop.rollout(divergence, task, num_steps, return_trajectory=True)
    x, y, _ = family.data(tp)
    _, optimal = family.optimum(tp)
    params_seq, grads_seq = rollout.trajectory
    full_loss = jax.vmap(lambda p: family.loss(p, (x, y)))(params_seq)  # (T + 1,)
    average = jax.tree.map(lambda p: jnp.mean(p[1:], axis=0), params_seq)
    final = rollout.final_params
    # Linearised regret against the final iterate: what the bound bounds.
    regret = sum(jnp.sum(g * (p[:-1] - f[None]))
                 for g, p, f in zip(jax.tree.leaves(grads_seq), jax.tree.leaves(params_seq),
                                    jax.tree.leaves(final))) / num_steps
    return {
        'bound': rollout.bound,
        'linearised_regret_vs_final': regret,
        'suboptimality_final': full_loss[-1] - optimal,
        'suboptimality_average_iterate': family.loss(average, (x, y)) - optimal,
        'suboptimality_mean_over_steps': jnp.mean(full_loss[1:] - optimal),
        'optimal_loss': optimal,
    }

  run = jax.jit(jax.vmap(one, in_axes=(None, 0)))
  report = {}
  for name, divergence in divergences.items():
    sigma, floor = metamd_jax.strong_convexity(divergence)
    values = {k: np.asarray(v) for k, v in run(divergence, test_tasks).items()}
    report[name] = {'strong_convexity': float(sigma), 'strong_convexity_floor': float(floor),
                    **{k: _mean_std(v) for k, v in values.items()}}
  return report


def benchmark_family(config: ml_collections.ConfigDict, name: str, workdir: pathlib.Path,
                     *, progress: bool = True) -> dict:
  """Tune, meta-train, run and compare on family ``name``; plots go to ``workdir``."""
  family_cfg = family_config(config, name)
  ev = family_cfg.eval
  horizon, window, reference = family_cfg.meta.horizon, ev.window, config.reference
  long_steps = config.horizon_multiplier * horizon
  family_dir = workdir / name
  started = time.perf_counter()

  train_family, test_family = builders.build_families(family_cfg)
  tune_tasks = meta_train_lib.sample_tasks(
      train_family, jax.random.key(family_cfg.seed + TUNE_KEY_OFFSET), 0, ev.num_tune_tasks)
  test_tasks = meta_train_lib.sample_tasks(
      test_family, jax.random.key(family_cfg.seed + TEST_KEY_OFFSET), 0, ev.num_tasks)
  learning_rates, tuning_scores = _tune_baselines(config, family_cfg, train_family, tune_tasks)
  tuning_seconds = time.perf_counter() - started

  init_from = 'config'
  if config.init_from_tuned_sgd and learning_rates.get('sgd') is not None:
    init_from = 'tuned sgd'
    # Every learned optimiser starts from the divergence of tuned SGD (meta-train tasks).
    family_cfg.meta.init_learning_rate = float(learning_rates['sgd'])
  learned, meta_info = _meta_train_variants(config, family_cfg, family_dir, progress)
  meta_seconds = time.perf_counter() - started - tuning_seconds
  for divergence in learned.values():
    metamd_jax.artifact.check_compatible(divergence, test_family.init_params())
  optimizers = {v: metamd_jax.metamd(d) for v, d in learned.items()}
  optimizers.update({b: builders.BASELINES[b](lr) for b, lr in learning_rates.items()
                     if lr is not None})

  evaluate = _evaluator(test_family)
  repeats = 1 if config.quick else config.timing_repeats
  runs = {opt: timed_run(optimizer, test_family, test_tasks, horizon, repeats, evaluate)
          for opt, optimizer in optimizers.items()}
  seconds_per_step = {opt: run['seconds'] / horizon for opt, run in runs.items()}
  finals = {opt: final_train_loss(run) for opt, run in runs.items()}

  result = {'horizon': horizon, 'num_tasks': ev.num_tasks, 'reference': reference,
            'window': window, 'meta_training': meta_info,
            'init_learning_rate': family_cfg.meta.init_learning_rate, 'init_from': init_from,
            'tuning_seconds': tuning_seconds,
            'meta_training_seconds': meta_seconds, 'optimizers': {}}
  reference_target = finals.get(reference)
  for opt, run in runs.items():
    entry = {
        'kind': 'learned' if opt in learned else 'baseline',
        'learning_rate': learning_rates.get(opt),
        'final_train_loss': _mean_std(finals[opt]),
        'wall_clock_seconds': _mean_std(run['seconds']),
        'seconds_per_step': _mean_std(seconds_per_step[opt]),
    }
    if opt in tuning_scores:
      entry['tuning_scores'] = tuning_scores[opt]
    if reference_target is not None:
      reach = _steps_and_seconds(run, reference_target, seconds_per_step[opt])
      entry[f'steps_to_{reference}_final_loss'] = reach['steps']
      entry[f'seconds_to_{reference}_final_loss'] = reach['seconds']
      entry['reached_fraction'] = reach['reached_fraction']
    for metric, values in run['metrics'].items():
      entry[metric] = _mean_std(values)
    entry['final_minibatch_loss'] = _mean_std(evaluation.final_loss(run['losses'], window))
    entry['mean_curve'], entry['std_curve'] = _curve_stats(run)
    entry['curve_every'] = run['every']
    result['optimizers'][opt] = entry

  # Steps (and seconds) each learned optimiser needs to reach every baseline's final loss,
  # next to the steps the baseline itself needs (its first step at its final loss).
  result['learned_vs_baselines'] = {}
  for opt in learned:
    rows = {}
    for baseline in learning_rates:
      if baseline not in runs:
        continue
      target = finals[baseline]
      mine = _steps_and_seconds(runs[opt], target, seconds_per_step[opt])
      theirs = _steps_and_seconds(runs[baseline], target, seconds_per_step[baseline])
      rows[baseline] = {
          'baseline_final_train_loss': _mean_std(target),
          'steps': mine['steps'], 'seconds': mine['seconds'],
          'reached_fraction': mine['reached_fraction'],
          'baseline_steps': theirs['steps'],
          'baseline_wall_clock_seconds': _mean_std(runs[baseline]['seconds']),
          'steps_per_task': mine['steps_per_task'],
      }
    result['learned_vs_baselines'][opt] = rows

  # Beyond the horizon: learned optimisers (and the reference) for horizon_multiplier * T.
  beyond = {}
  for opt in [*learned, reference]:
    if opt not in optimizers:
      continue
    # The whole-set loss every horizon_multiplier steps: T // 1 + 1 points over 10 T.
    every = config.horizon_multiplier if horizon % config.horizon_multiplier == 0 else 1
    curves = train_tasks(optimizers[opt], test_family, test_tasks, long_steps, evaluate,
                         every)
    tracked = np.asarray(curves['train_losses'], np.float64)
    at_long = final_train_loss(curves)
    blew_up = ~np.isfinite(at_long) | (at_long > config.blow_up_factor * tracked[:, 0])
    beyond[opt] = {
        'steps': long_steps,
        'loss_at_T': _mean_std(tracked[:, horizon // every]),
        'loss_at_long': _mean_std(at_long),
        'blew_up_fraction': float(np.mean(blew_up)),
        'any_non_finite': bool(not np.all(np.isfinite(curves['losses']))),
        **{f'{metric}_at_long': _mean_std(v) for metric, v in curves['metrics'].items()},
    }
    beyond[opt]['mean_curve'], beyond[opt]['std_curve'] = _curve_stats(curves)
    beyond[opt]['curve_every'] = every
  result['beyond_horizon'] = beyond

  # The extra reports are recorded as an error rather than losing the family's results.
  try:
    heldout = heldout_family(family_cfg)
    if heldout is not None:
      result['heldout_dataset'] = _heldout_report(family_cfg, heldout, learned, optimizers,
                                                  reference, horizon)
  except Exception as error:  # noqa: BLE001
    logging.exception('held-out dataset of %s failed', name)
    result['heldout_dataset'] = {'error': repr(error)}

  if isinstance(test_family, LeastSquaresFamily):
    sgd_lr = family_cfg.meta.init_learning_rate
    divergences = {f'sgd_init (lr {sgd_lr:g})': _sgd_divergence(family_cfg, test_family, sgd_lr)}
    if learning_rates.get('sgd') not in (None, sgd_lr):
      divergences[f"sgd_tuned (lr {learning_rates['sgd']:g})"] = _sgd_divergence(
          family_cfg, test_family, learning_rates['sgd'])
    divergences.update(learned)
    try:
      result['convex'] = _convex_report(test_family, divergences, test_tasks, horizon)
    except Exception as error:  # noqa: BLE001
      logging.exception('convex report of %s failed', name)
      result['convex'] = {'error': repr(error)}

  result['targets'] = _targets(name, result, learned, learning_rates)
  result['seconds'] = time.perf_counter() - started
  _plot_family(name, result, workdir, _title(family_cfg))
  return result


def _sgd_divergence(family_cfg, family, learning_rate: float):
  meta = family_cfg.meta
  return metamd_jax.init_divergence(family.init_params(), float(learning_rate),
                                    structure='kronecker', eps=meta.eps,
                                    max_factor_size=meta.max_factor_size)


def _heldout_report(family_cfg, family, learned, optimizers, reference, horizon):
  """All optimisers (learning rates tuned on the meta-train family) on another dataset."""
  for divergence in learned.values():
    metamd_jax.artifact.check_compatible(divergence, family.init_params())
  tasks = meta_train_lib.sample_tasks(
      family, jax.random.key(family_cfg.seed + TEST_KEY_OFFSET), 0, family_cfg.eval.num_tasks)
  evaluate = _evaluator(family)
  curves = {opt: train_tasks(optimizer, family, tasks, horizon, evaluate)
            for opt, optimizer in optimizers.items()}
  spec = family_cfg.heldout
  report = {'dataset': spec.dataset, 'generator': dict(spec.generator),
            'train': family.train.name, 'test': family.test.name, 'optimizers': {}}
  target = final_train_loss(curves[reference]) if reference in curves else None
  for opt, run in curves.items():
    entry = {'final_train_loss': _mean_std(final_train_loss(run))}
    if target is not None:
      reach = _steps_and_seconds(run, target, 0.0)
      entry[f'steps_to_{reference}_final_loss'] = reach['steps']
      entry['reached_fraction'] = reach['reached_fraction']
    for metric, values in run['metrics'].items():
      entry[metric] = _mean_std(values)
    report['optimizers'][opt] = entry
  return report


def _le(a, b) -> bool:
  return a is not None and b is not None and a <= b


def _targets(name: str, result: dict, learned: dict, learning_rates: dict) -> dict:
  """The issue's targets for MetaMD on this family, checked on the mean over tasks."""
  horizon, reference = result['horizon'], result['reference']
  metamd = result['optimizers'].get('metamd')
  vs = result['learned_vs_baselines'].get('metamd', {})
  del learned
  if metamd is None:
    return {}
  targets = {}
  if name.startswith('mnist_mlp') and reference in vs:
    ref = result['optimizers'][reference]
    row = vs[reference]
    all_reached = row['reached_fraction'] == 1.0
    targets[f'steps_to_{reference}_at_most_T_over_8'] = {
        'value': row['steps'][0], 'limit': horizon / 8,
        'met': all_reached and _le(row['steps'][0], horizon / 8)}
    targets[f'seconds_at_most_a_third_of_{reference}'] = {
        'value': row['seconds'][0], 'limit': ref['wall_clock_seconds'][0] / 3,
        'met': all_reached and _le(row['seconds'][0], ref['wall_clock_seconds'][0] / 3)}
    if 'test_accuracy' in metamd:
      targets[f'test_accuracy_at_least_{reference}'] = {
          'value': metamd['test_accuracy'][0], 'limit': ref['test_accuracy'][0],
          'met': _le(ref['test_accuracy'][0], metamd['test_accuracy'][0])}
  else:
    for baseline, row in vs.items():
      if baseline not in learning_rates:
        continue
      baseline_steps = row['baseline_steps'][0]
      met = (row['reached_fraction'] == 1.0 and row['steps'][0] is not None
             and baseline_steps is not None and row['steps'][0] < baseline_steps)
      targets[f'fewer_steps_than_{baseline}'] = {'value': row['steps'][0],
                                                 'limit': baseline_steps, 'met': bool(met)}
  return targets


# ---------------------------------------------------------------------------
# Tables and plots.
# ---------------------------------------------------------------------------


def _title(family_cfg) -> str:
  task = family_cfg.task
  if task.family == 'classification':
    return f'{task.model.upper()} on {task.dataset}'
  return task.family.replace('_', ' ')


def _fmt(pair, digits: int = 4, fmt: str = 'g') -> str:
  if pair is None or pair[0] is None:
    return 'n/a'
  mean, std = pair
  return f'{mean:.{digits}{fmt}} ± {std:.{digits}{fmt}}'


def _num(x) -> str:
  return 'n/a' if x is None else f'{x:.4g}'


def _fmt_reach(pair, reached: float, digits: int = 1, fmt: str = 'f') -> str:
  if pair is None or pair[0] is None or reached == 0:
    return 'not reached'
  text = _fmt(pair, digits, fmt)
  return text if reached == 1.0 else f'{text} ({reached:.0%} reached)'


def format_family(name: str, result: dict) -> str:
  """The markdown tables of one family."""
  reference, horizon = result['reference'], result['horizon']
  lines = [f"## {name} (T = {horizon}, {result['num_tasks']} held-out tasks)", '']
  meta = result['meta_training']
  lines.append(f"Meta-training (starting from SGD with lr {result['init_learning_rate']:g}, "
               f"{result['init_from']}): "
               + '; '.join(
                   f"{v} ({m['structure']}, {m['objective']}): {m['num_meta_steps']} "
                   f"meta-steps, {m['seconds_logged']:.0f} s"
                   + (f", kept meta-step {m['best_meta_step']}" if m.get('select') == 'best'
                      and 'best_meta_step' in m else '')
                   for v, m in meta.items()))
  lines += ['', f'| optimiser | learning rate | steps to {reference} final loss | '
            f'seconds to {reference} final loss | seconds for T steps | final train loss | '
            'test accuracy |', '| --- | --- | --- | --- | --- | --- | --- |']
  for opt, e in result['optimizers'].items():
    lr = 'learned' if e['learning_rate'] is None else f"{e['learning_rate']:g}"
    reached = e.get('reached_fraction', 0.0)
    metric = e.get('test_accuracy')
    metric_text = _fmt(metric, 3, 'f') if metric else (
        f"subopt {_fmt(e['suboptimality'], 3)}" if 'suboptimality' in e else 'n/a')
    lines.append(
        f"| {opt} | {lr} | {_fmt_reach(e.get(f'steps_to_{reference}_final_loss'), reached)} | "
        f"{_fmt_reach(e.get(f'seconds_to_{reference}_final_loss'), reached, 3)} | "
        f"{_fmt(e['wall_clock_seconds'], 3, 'f')} | {_fmt(e['final_train_loss'])} | "
        f'{metric_text} |')
  for opt, rows in result['learned_vs_baselines'].items():
    if opt != 'metamd':
      continue
    lines += ['', f'{opt} against each tuned baseline (steps and seconds {opt} needs to reach '
              "the baseline's final training loss at T):", '',
              '| baseline | its final train loss | its steps | its seconds (T steps) | '
              f'{opt} steps | {opt} seconds |', '| --- | --- | --- | --- | --- | --- |']
    for baseline, row in rows.items():
      lines.append(
          f"| {baseline} | {_fmt(row['baseline_final_train_loss'])} | "
          f"{_fmt(row['baseline_steps'], 1, 'f')} | "
          f"{_fmt(row['baseline_wall_clock_seconds'], 3, 'f')} | "
          f"{_fmt_reach(row['steps'], row['reached_fraction'])} | "
          f"{_fmt_reach(row['seconds'], row['reached_fraction'], 3)} |")
  beyond = result['beyond_horizon']
  if beyond:
    steps = next(iter(beyond.values()))['steps']
    lines += ['', f'Beyond the horizon ({steps} steps = {steps // horizon} T):', '',
              '| optimiser | train loss at T | train loss at 10T | blew up | '
              'test accuracy at 10T |', '| --- | --- | --- | --- | --- |']
    for opt, e in beyond.items():
      lines.append(f"| {opt} | {_fmt(e['loss_at_T'])} | {_fmt(e['loss_at_long'])} | "
                   f"{e['blew_up_fraction']:.0%} of tasks | "
                   f"{_fmt(e.get('test_accuracy_at_long'), 3, 'f')} |")
  heldout = result.get('heldout_dataset')
  if heldout and 'error' in heldout:
    lines += ['', f"Held-out dataset: failed ({heldout['error']})."]
  elif heldout:
    generator = ', '.join(f'{k}={v}' for k, v in heldout['generator'].items())
    lines += ['', f"Held-out dataset {heldout['dataset']}"
              f"{f' ({generator})' if generator else ''}: {heldout['train']} / "
              f"{heldout['test']}, never seen in meta-training; baselines keep the learning "
              'rates tuned on the meta-train family:', '',
              f'| optimiser | steps to {reference} final loss | final train loss | '
              'test accuracy |', '| --- | --- | --- | --- |']
    for opt, e in heldout['optimizers'].items():
      reach = _fmt_reach(e.get(f'steps_to_{reference}_final_loss'),
                         e.get('reached_fraction', 0.0))
      lines.append(f"| {opt} | {reach} | {_fmt(e['final_train_loss'])} | "
                   f"{_fmt(e.get('test_accuracy'), 3, 'f')} |")
  convex = result.get('convex')
  if convex and 'error' in convex:
    lines += ['', f"Convex report: failed ({convex['error']})."]
  elif convex:
    lines += ['', 'Convex guarantee (held-out tasks; the bound is the regret bound '
              'against the final iterate, step size folded into the divergence):', '',
              '| divergence | strong convexity (floor) | bound | linearised regret | '
              'suboptimality final | suboptimality avg iterate |',
              '| --- | --- | --- | --- | --- | --- |']
    for div, e in convex.items():
      lines.append(
          f"| {div} | {e['strong_convexity']:.4g} ({e['strong_convexity_floor']:.1g}) | "
          f"{_fmt(e['bound'])} | {_fmt(e['linearised_regret_vs_final'])} | "
          f"{_fmt(e['suboptimality_final'])} | {_fmt(e['suboptimality_average_iterate'])} |")
  targets = result.get('targets')
  if targets:
    lines += ['', 'Targets (MetaMD, mean over held-out tasks): ' + '; '.join(
        f"{key}: {'met' if t['met'] else 'MISSED'} ({_num(t['value'])} vs {_num(t['limit'])})"
        for key, t in targets.items())]
  return '\n'.join(lines)


def format_tables(results: dict) -> str:
  return '\n\n'.join(format_family(name, r) for name, r in results['families'].items())


def _plot_family(name: str, result: dict, workdir: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  def draw(ax, entries, x_of):
    for opt, e in entries.items():
      mean, std = np.asarray(e['mean_curve'], float), np.asarray(e['std_curve'], float)
      x = x_of(opt, mean.size)
      lr = result['optimizers'].get(opt, {}).get('learning_rate')
      label = opt if lr is None else f'{opt} (lr {lr:g})'
      line, = ax.plot(x, mean, label=label, lw=2.2 if opt == 'metamd' else 1.2)
      # On a log axis mean - std can reach 0: the band is cut at a third of the mean.
      ax.fill_between(x, np.maximum(mean - std, mean / 3), mean + std, color=line.get_color(),
                      alpha=0.15)
    ax.set_yscale('log')
    ax.set_ylabel('training loss, whole training set (mean ± std over tasks)')
    ax.legend(fontsize=7)

  def steps(entries):
    return lambda opt, n: np.arange(n) * entries[opt].get('curve_every', 1)

  def seconds(opt, n):
    entry = result['optimizers'][opt]
    return np.arange(n) * entry.get('curve_every', 1) * entry['seconds_per_step'][0]

  for suffix, x_of, xlabel, entries in (
      ('loss_vs_step', steps(result['optimizers']), 'training step', result['optimizers']),
      ('loss_vs_time', seconds, 'wall-clock seconds (compiled run)', result['optimizers']),
      ('beyond_horizon', steps(result['beyond_horizon']), 'training step',
       result['beyond_horizon'])):
    if not entries:
      continue
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    draw(ax, entries, x_of)
    if suffix == 'beyond_horizon':
      ax.axvline(result['horizon'], color='k', ls=':', lw=1)
      ax.set_xscale('symlog', linthresh=1.0)  # linear up to one step: the curves start at 0
      ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_title(f'{title}: held-out tasks')
    fig.tight_layout()
    fig.savefig(workdir / f'{name}_{suffix}.png', dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The whole benchmark.
# ---------------------------------------------------------------------------


def _json_safe(x):
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def benchmark(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              *, progress: bool = True) -> dict:
  """Run the benchmark of ``config`` in ``workdir``; write and print the results.

  Returns:
    The results dictionary written to ``results.json``: ``{'settings': ..., 'families':
    {family: {'optimizers': {name: {'learning_rate', 'final_train_loss',
    'steps_to_<reference>_final_loss', 'seconds_to_<reference>_final_loss',
    'wall_clock_seconds', 'test_accuracy', ...}}, 'learned_vs_baselines',
    'beyond_horizon', 'heldout_dataset', 'convex', 'targets', ...}}}``; every statistic is
    ``[mean, std]`` over the held-out tasks (``null`` where no task reached it).
  """
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results = {
      'settings': {
          'quick': bool(config.quick), 'reference': config.reference,
          'baselines': list(config.baselines),
          'variants': {v: config.variants[v].to_dict() for v in config.variant_names},
          'horizon_multiplier': config.horizon_multiplier,
          'timing_repeats': config.timing_repeats,
          'device': str(jax.devices()[0]),
      },
      'families': {},
  }
  for name in family_names(config):
    family_cfg = family_config(config, name)
    results['settings'].setdefault('num_tasks', family_cfg.eval.num_tasks)
    results['settings'].setdefault('learning_rates', list(family_cfg.eval.learning_rates))
    results['families'][name] = _json_safe(benchmark_family(config, name, workdir,
                                                            progress=progress))
    (workdir / 'results.json').write_text(json.dumps(results, indent=1))
  table = format_tables(results)
  (workdir / 'results.md').write_text(table + '\n')
  print(table)
  return results


FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for the sub-runs, results and plots.')
config_flags.DEFINE_config_file('config', 'configs/benchmark.py', 'Benchmark config file.',
                                lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  benchmark(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
