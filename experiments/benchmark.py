"""Benchmark MetaMD against tuned optax optimisers on several task families (issue #6).

  python -m experiments.benchmark --config configs/benchmark.py --workdir runs/benchmark
  python -m experiments.benchmark --config configs/benchmark.py --workdir runs/smoke \
      --config.quick=True

For every family of the config (each a full experiment config, see ``configs/benchmark.py``;
resolved and checked by :mod:`experiments.benchmark_setup`):

1. tune each baseline's learning rate on meta-train tasks
   (:func:`experiments.protocol.tune_baselines`, scored by the final loss on the whole
   training set);
2. meta-train the learned optimisers at horizon ``T = meta.horizon``: MetaMD (Kronecker,
   bound objective), the diagonal (Meta-SGD) divergence and the Kronecker divergence on
   the unrolled objective, each with :func:`experiments.meta_train.meta_train` in its own
   sub-workdir ``<workdir>/<family>/<variant>`` (a rerun resumes from the checkpoints),
   starting from tuned SGD when ``init_from_tuned_sgd``; with the family's
   ``eval.adaptive``, adaptive MetaMD (``'metamd_adaptive'``,
   :func:`metamd_jax.adaptive_metamd`: the MetaMD divergence, its reference norm
   calibrated on the meta-train tuning tasks by :func:`experiments.evaluate.calibrate`,
   recorded as ``result['adaptive']``) joins as one more learned optimiser in every
   comparison below (left out, with a warning, when the calibration fails); with the
   family's ``eval.frozen_rank``, so does ``'metamd_low_rank'`` (the MetaMD divergence with
   each longer factor at that rank plus a level, :func:`metamd_jax.low_rank_metamd`);
3. train every optimiser on the same held-out tasks
   (:func:`metamd_jax.evaluation.held_out_tasks`) for ``T`` steps, recording the loss on
   each task's whole training set after every step; separately, each run is compiled once
   (a warm-up call) and then timed (``block_until_ready``), per task, training only
   (:func:`experiments.benchmark_runs.time_runs`);
4. report, mean and std over held-out tasks: the steps (and seconds: steps times the timed
   seconds per step) MetaMD needs to reach each tuned baseline's final training loss,
   every optimiser's steps and seconds to the reference's (tuned Adam's) final loss, final
   training loss and test metrics; the learned optimisers' and the reference's elapsed
   seconds to that loss (per task, a timed run stopped at the step where the task reaches
   it: :func:`experiments.benchmark_runs.elapsed_to`, right also for a step whose cost
   varies along the run; the wall-clock target takes these); and the learned optimisers'
   training loss at ``T`` and
   at ``horizon_multiplier * T``. "Training loss" is the whole-training-set loss: no
   minibatch noise and no moving-average lag in the step counts;
5. on a held-out dataset (``heldout.dataset``), the same comparison without timing; on the
   convex least-squares family, each divergence's strong-convexity constant, its bound
   next to SGD's and the observed suboptimality
   (:mod:`experiments.benchmark_runs`);
6. robustness, on classification families: the optimisers of ``robustness_optimizers``
   (present in the run; the reference always joins), unchanged (learned divergences,
   meta-train-tuned learning rates, calibrated reference norm), on the held-out tasks
   under each shift of ``shifts`` (``quick_shifts`` in a quick run;
   :func:`experiments.evaluate.evaluate_shift`, the family's ``eval.reference`` re-tuned
   on the shift is the reference, e.g. ``'adam_retuned'``), and two checks from runs made
   above: ``'<multiplier>T'`` (the beyond-horizon runs, the reference re-tuned for that
   many steps on the meta-train tuning tasks; it joins the beyond-horizon section) and
   ``'heldout_dataset'`` (the held-out-dataset runs, the reference re-tuned on that
   dataset's tuning tasks). Per check and optimiser: diverged runs, runs that ended above
   their initial loss, steps to the re-tuned reference's final loss, final loss, test
   accuracy (``result['robustness'][check]``); per learned optimiser, the counts of
   :func:`experiments.benchmark_targets.robustness_summary`
   (``result['robustness_summary']``);
7. check the targets the family declares (``targets``, :mod:`experiments.benchmark_targets`).

Writes to the workdir ``results.json``, ``results.md`` (printed; :mod:`experiments.report`)
and per family ``<family>_loss_vs_step.png``, ``<family>_loss_vs_time.png``,
``<family>_beyond_horizon.png`` and, with robustness checks, ``<family>_robustness.png``
(:mod:`experiments.plots`).
"""

from __future__ import annotations

import os
import pathlib
import time

# One OpenBLAS thread, as in experiments/main.py (set before numpy loads; a user's
# value wins).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import (  # noqa: E402
    benchmark_runs,
    benchmark_setup,
    benchmark_targets,
    builders,
    cli,
    evaluate,
    plots,
    protocol,
    report,
)
from experiments.benchmark_setup import ADAPTIVE, LOW_RANK  # noqa: E402
from metamd_jax import evaluation  # noqa: E402
from metamd_jax.tasks import ClassificationFamily, LeastSquaresFamily  # noqa: E402


def _versus_baselines(run: evaluation.Curves, seconds_per_step, runs: dict, seconds: dict,
                      baselines) -> dict:
  """Steps (and seconds) ``run`` needs to reach every baseline's final loss.

  Next to them, the steps the baseline itself needs (its first step at its final loss).
  """
  rows = {}
  for baseline in baselines:
    if baseline not in runs:
      continue
    target = evaluation.final_train_loss(runs[baseline].train_losses)
    mine = protocol.reach(run, target, seconds_per_step)
    theirs = protocol.reach(runs[baseline], target)
    rows[baseline] = {
        'baseline_final_train_loss': report.pair(target),
        'steps': mine['steps'], 'seconds': mine['seconds'],
        'reached_fraction': mine['reached_fraction'],
        'baseline_steps': theirs['steps'],
        'baseline_wall_clock_seconds': report.pair(seconds[baseline]),
        'steps_per_task': mine['steps_per_task'],
    }
  return rows


def robustness_names(config: ml_collections.ConfigDict, reference: str,
                     optimizers: dict) -> list[str]:
  """The optimisers of the robustness checks: ``config.robustness_optimizers`` present.

  In their order, skipping names not in this run; the reference baseline (whose training
  or not decides which checks the divergence target counts) always joins.
  """
  names = [n for n in config.robustness_optimizers if n in optimizers]
  if reference in optimizers and reference not in names:
    names.append(reference)
  return names


def benchmark_family(config: ml_collections.ConfigDict, name: str, workdir: pathlib.Path,
                     *, progress: bool = True) -> dict:
  """Tune, meta-train, run and compare on family ``name``; plots go to ``workdir``."""
  family_cfg = benchmark_setup.family_config(config, name)
  ev = family_cfg.eval
  horizon, reference = family_cfg.meta.horizon, config.reference
  started = time.perf_counter()

  train_family, test_family = builders.build_families(family_cfg)
  tune_tasks = evaluation.tuning_tasks(train_family, family_cfg.seed, ev.num_tune_tasks)
  test_tasks = evaluation.held_out_tasks(test_family, family_cfg.seed, ev.num_tasks)
  learning_rates, tuning_scores = protocol.tune_baselines(config.baselines, ev, train_family,
                                                          tune_tasks, ev.num_steps)
  tuning_seconds = time.perf_counter() - started

  init_from = 'config'
  if (benchmark_setup.init_from_tuned_sgd(config, family_cfg)
      and learning_rates.get('sgd') is not None):
    init_from = 'tuned sgd'
    # Every learned optimiser starts from the divergence of tuned SGD (meta-train tasks).
    family_cfg.meta.init_learning_rate = float(learning_rates['sgd'])
  learned, meta_info = benchmark_runs.meta_train_variants(config, family_cfg, workdir / name,
                                                          progress)
  meta_seconds = time.perf_counter() - started - tuning_seconds
  for divergence in learned.values():
    metamd_jax.artifact.check_compatible(divergence, test_family.param_shapes())
  optimizers = {v: metamd_jax.metamd(d) for v, d in learned.items()}
  # Adaptive MetaMD: the metamd divergence, its reference norm calibrated on the
  # meta-train tuning tasks (left out, with a warning, where frozen MetaMD does not train
  # them: metamd_jax.calibrate).
  adaptive = None
  if 'metamd' in learned and ev.adaptive:
    adaptive = evaluate.calibrate(family_cfg, learned['metamd'], train_family, tune_tasks)
    if (adaptive_metamd := evaluate.adaptive_optimizer(family_cfg, learned['metamd'],
                                                        adaptive)) is not None:
      optimizers[ADAPTIVE] = adaptive_metamd
  # Frozen MetaMD at low rank (eval.frozen_rank, where the family's config sets it).
  if 'metamd' in learned and (
      low_rank_metamd := evaluate.low_rank_optimizer(family_cfg, learned['metamd'])) is not None:
    optimizers[LOW_RANK] = low_rank_metamd
  learned_names = list(optimizers)  # the learned variants, adaptive and low-rank MetaMD
  optimizers.update({b: builders.BASELINES[b](lr) for b, lr in learning_rates.items()
                     if lr is not None})
  rates = {opt: learning_rates.get(opt) for opt in optimizers}  # None: learned

  repeats = 1 if config.quick else config.timing_repeats
  runs, seconds = {}, {}
  for opt, optimizer in optimizers.items():
    runs[opt] = evaluation.run(optimizer, test_family, test_tasks, horizon, track_every=1)
    seconds[opt] = benchmark_runs.time_runs(optimizer, test_family, test_tasks, horizon,
                                            repeats)
  seconds_per_step = {opt: s / horizon for opt, s in seconds.items()}
  target = (evaluation.final_train_loss(runs[reference].train_losses)
            if reference in runs else None)
  # The learned optimisers and the reference also timed to the step where each task
  # reaches the reference's loss: runs stopped there (benchmark_runs.elapsed_to).
  elapsed = {}
  if target is not None:
    for opt in dict.fromkeys([*learned_names, reference]):
      elapsed[opt] = benchmark_runs.elapsed_to(optimizers[opt], test_family, test_tasks,
                                               runs[opt], target, repeats)

  result = {'horizon': horizon, 'num_tasks': ev.num_tasks, 'reference': reference,
            'window': ev.window, 'meta_training': meta_info,
            'init_learning_rate': family_cfg.meta.init_learning_rate, 'init_from': init_from,
            'adaptive': adaptive, 'tuning_seconds': tuning_seconds,
            'meta_training_seconds': meta_seconds, 'optimizers': {}}
  for opt, run in runs.items():
    entry = {'kind': 'learned' if opt in learned_names else 'baseline',
             'learning_rate': learning_rates.get(opt),
             'wall_clock_seconds': report.pair(seconds[opt]),
             'seconds_per_step': report.pair(seconds_per_step[opt])}
    if opt == ADAPTIVE:
      entry['reference_norm'] = adaptive['reference_norm']
    if opt in tuning_scores:
      entry['tuning_scores'] = tuning_scores[opt]
    entry.update(protocol.summarize(run, target, reference, seconds_per_step[opt]))
    if opt in elapsed:
      entry[f'elapsed_seconds_to_{reference}_final_loss'] = report.pair(elapsed[opt])
    entry['final_minibatch_loss'] = report.pair(evaluation.final_loss(run.losses, ev.window))
    entry.update(protocol.curves_summary(run))
    result['optimizers'][opt] = entry

  result['learned_vs_baselines'] = {
      opt: _versus_baselines(runs[opt], seconds_per_step[opt], runs, seconds, learning_rates)
      for opt in learned_names}
  # Robustness (classification families): the shifts, and these runs reused as checks.
  robust = isinstance(test_family, ClassificationFamily)
  robust_names = robustness_names(config, ev.reference, optimizers) if robust else []
  robustness = {}
  # Beyond the horizon: learned optimisers, the reference (and the robustness optimisers)
  # for horizon_multiplier * T.
  multiplier = config.horizon_multiplier
  long_curves = {
      opt: benchmark_runs.long_run(optimizers[opt], test_family, test_tasks, horizon,
                                   multiplier)
      for opt in dict.fromkeys([*learned_names, reference, *robust_names]) if opt in optimizers}
  result['beyond_horizon'] = {
      opt: {'learning_rate': rates[opt],
            **benchmark_runs.long_run_summary(curves, horizon, config.blow_up_factor)}
      for opt, curves in long_curves.items()}
  shifts = benchmark_setup.shift_names(config) if robust else ()
  for shift in shifts:
    robustness[shift] = evaluate.evaluate_shift(
        family_cfg, shift, (train_family, test_family),
        {opt: optimizers[opt] for opt in robust_names}, {opt: rates[opt] for opt in robust_names})
    robustness[shift]['num_steps'] = horizon
  if robust and multiplier > 1:
    check, retuned_curves = protocol.beyond_horizon(
        ev, multiplier, horizon, (train_family, tune_tasks), (test_family, test_tasks),
        {opt: long_curves[opt] for opt in robust_names}, rates)
    robustness[f'{multiplier}T'] = check
    if retuned_curves is not None:  # the re-tuned reference joins the beyond-horizon section
      result['beyond_horizon'][check['reference']] = {
          'learning_rate': check[f"{check['reference']}_learning_rate"],
          **benchmark_runs.long_run_summary(retuned_curves, horizon, config.blow_up_factor)}

  heldout = benchmark_setup.heldout_family(family_cfg)
  if heldout is not None:
    heldout_tasks, heldout_curves = benchmark_runs.heldout_runs(family_cfg, heldout, learned,
                                                               optimizers, horizon)
    result['heldout_dataset'] = benchmark_runs.heldout_report(family_cfg, heldout,
                                                              heldout_curves, reference)
    if robust:
      robustness['heldout_dataset'], _ = protocol.against_retuned(
          ev, f'the held-out dataset {heldout.train.name} / {heldout.test.name} (never seen in '
          f'meta-training; {ev.reference} re-tuned on its tuning tasks)',
          (heldout, evaluation.tuning_tasks(heldout, family_cfg.seed, ev.num_tune_tasks)),
          (heldout, heldout_tasks), horizon, 1,
          {opt: heldout_curves[opt] for opt in robust_names}, rates)
  if robustness:
    result['robustness'] = robustness
    result['robustness_summary'] = benchmark_targets.robustness_summary(
        robustness, [opt for opt in learned_names if opt in robust_names], ev.reference)
  if isinstance(test_family, LeastSquaresFamily):
    sgd_lr = family_cfg.meta.init_learning_rate
    divergences = {f'sgd_init (lr {sgd_lr:g})':
                   benchmark_runs.sgd_divergence(family_cfg, test_family, sgd_lr)}
    if learning_rates.get('sgd') not in (None, sgd_lr):
      divergences[f"sgd_tuned (lr {learning_rates['sgd']:g})"] = benchmark_runs.sgd_divergence(
          family_cfg, test_family, learning_rates['sgd'])
    divergences.update(learned)
    result['convex'] = benchmark_runs.convex_report(test_family, divergences, test_tasks,
                                                    horizon)

  result['targets'] = benchmark_targets.evaluate_targets(family_cfg.get('targets', None),
                                                         result)
  result['seconds'] = time.perf_counter() - started
  plots.plot_benchmark_family(name, result, workdir, report.title(family_cfg))
  return result


def benchmark(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              *, progress: bool = True) -> dict:
  """Run the benchmark of ``config`` in ``workdir``; write and print the results.

  Returns:
    The results dictionary written to ``results.json``: ``{'settings': ..., 'families':
    {family: {'optimizers': {name: {'learning_rate', 'final_train_loss',
    'steps_to_<reference>_final_loss', 'seconds_to_<reference>_final_loss',
    'wall_clock_seconds', 'test_accuracy', ...}}, 'adaptive', 'learned_vs_baselines',
    'beyond_horizon', 'heldout_dataset', 'robustness': {check: {'description',
    'reference', '<reference>_learning_rate', 'num_steps', 'seconds', 'optimizers': {name:
    {'learning_rate', 'diverged', 'above_initial_loss', 'num_runs', 'final_train_loss',
    'steps_to_<reference>_final_loss', 'reached_fraction', 'test_accuracy'}}}},
    'robustness_summary', 'convex', 'targets', ...}}}``; every statistic is ``[mean, std]``
    over the held-out tasks (``null`` where no task reached it).
  """
  benchmark_setup.validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results = {
      'settings': {
          'quick': bool(config.quick), 'reference': config.reference,
          'baselines': list(config.baselines),
          'variants': {v: config.variants[v].to_dict() for v in config.variant_names},
          'horizon_multiplier': config.horizon_multiplier,
          'timing_repeats': config.timing_repeats,
          'shifts': list(benchmark_setup.shift_names(config)),
          'robustness_optimizers': list(config.robustness_optimizers),
          'device': str(jax.devices()[0]),
      },
      'families': {},
  }
  for name in benchmark_setup.family_names(config):
    family_cfg = benchmark_setup.family_config(config, name)
    results['settings'].setdefault('num_tasks', family_cfg.eval.num_tasks)
    results['settings'].setdefault('learning_rates', list(family_cfg.eval.learning_rates))
    results['families'][name] = report.json_safe(
        benchmark_family(config, name, workdir, progress=progress))
    report.write_json(workdir / 'results.json', results)
  table = report.format_benchmark(results)
  (workdir / 'results.md').write_text(table + '\n')
  print(table)
  return results


def main(argv):
  flag_values = cli.start(argv)
  benchmark(flag_values.config, flag_values.workdir)


if __name__ == '__main__':
  # Flags are defined only when run as a script, so importing this module next to the
  # other experiments (which define --workdir and --config too) does not clash.
  flags.DEFINE_string('workdir', None, 'Directory for the sub-runs, results and plots.')
  config_flags.DEFINE_config_file('config', 'configs/benchmark.py', 'Benchmark config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
