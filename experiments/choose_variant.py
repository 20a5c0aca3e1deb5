"""Choose adaptive MetaMD's variant on validation tasks under the everyday changes.

  python -m experiments.choose_variant --config configs/mnist1d_cnn.py --workdir runs/cnn

Adaptive MetaMD (:func:`metamd_jax.adaptive_metamd`) comes with one scale for the whole
model or one per parameter leaf (``eval.adaptive_per_leaf``), and blended MetaMD
(:func:`metamd_jax.blended_metamd`) adds an online direction weighted by
``eval.adaptive_blend_rate``. Which one to use is a
choice, so it is made here on *validation tasks*, never on the held-out tasks: the
learned divergence of ``<workdir>/divergence.npz`` (a main job's or a meta-training
run's artifact) trains :func:`metamd_jax.evaluation.tuning_tasks` of the meta-train
family (``eval.num_validation_tasks`` of them, :func:`experiments.builders.num_validation_tasks`;
meta-train tasks that meta-training never samples),
as they are (the check ``'in_distribution'``) and under each of ``eval.shifts`` that
applies to the family (:func:`experiments.builders.shifted_family`, role
``'meta_train'``). In every check the reference (``eval.reference``, Adam) is re-tuned
on the changed tuning tasks and every other optimiser keeps what it has in distribution:
the learning rate tuned there, the levels calibrated there
(:func:`experiments.evaluate.calibrate`).

Candidates (:data:`CANDIDATES`): ``'adaptive'`` (one scale), ``'adaptive_per_leaf'``
(one scale per leaf), ``'blended_<rate>'`` (one scale per leaf plus the online
direction from running sums at blend rates 0.01, 0.03, 0.1) and ``'blended_peak_<rate>'``
(the same from peak moving averages, ``statistics='peak_average'``, at 0.003 and 0.01)
and ``'blended_kron_<rate>'`` (Shampoo's full Kronecker statistics,
``statistics='kronecker'``, at 0.01, 0.03, 0.1, 0.3), and
``'blended_0.01_nesterov_<beta>'`` and ``'blended_kron_0.1_nesterov_<beta>'`` (the same
followed by Nesterov's momentum, :func:`metamd_jax.nesterov_momentum`, at 0.5, 0.7 and 0.9)
and ``'blended_peak_<rate>_nesterov_0.5'`` (the peak averages at 0.003 and 0.01, then
momentum 0.5); ``'eigen'``, ``'eigen_kron_0.1'``, ``'eigen_0.01'`` and their
``_nesterov_0.5`` forms and ``'eigen_peak_<rate>_nesterov_0.5'`` (at 0.003 and 0.01)
(one scale per eigendirection of the learned factors, :mod:`metamd_jax.eigenbasis`, alone
or as the learned half of the blends above); ``'eigen_kron_0.1_nesterov_0.5_online_<p>'``
(at 0 and 0.5: the online half divided by the learned scale to the power ``p``, 1
elsewhere, ``eval.adaptive_online_power``) and ``'eigen_kron_<rate>_nesterov_0.5_online_0.5'``
(the same at ``p = 0.5`` with Shampoo's statistics at the blend rates 0.003, 0.01, 0.03
and 0.3) and ``'eigen_kron_<rate>_nesterov_0.5_online_<p>'`` (the blend rates 0.01 and
0.03 at ``p`` 0 and 1);
``'eigen_kron_0.1_nesterov_0.5_online_0.5_blocks_<size>'`` (at 256, 128 and 64) and
``'..._max_512'`` (the default's cheaper forms: a side of Shampoo's statistics longer
than ``size`` in diagonal blocks of at most ``size``, ``eval.adaptive_blend_block_size``,
or one longer than 512 diagonal, ``eval.adaptive_blend_max_dimension``);
and ``'config'`` (:data:`OWN`: the config's own settings, as they are) and
``'config_overshoot_<decay>'`` (:data:`OVERSHOOT`: the config's own settings with the
overshoot check of :func:`metamd_jax.blended_metamd` at the decays 0, 0.5 and 0.8,
``eval.adaptive_overshoot`` and ``eval.adaptive_overshoot_decay``; ``'..._0.5_blend_<rate>'``
and ``'..._0.5_online_<p>'``: the check at 0.5 with the blend rate 0.03 or 0.3, or the
online power 0 or 1, instead of the config's), ``'config_refresh_<kappa>'`` (the config's
own settings with the roots of Shampoo's statistics also refreshed once a leaf's gradient
mass has grown by the fraction ``kappa`` since their last refresh, at 0, 0.1, 0.3, 1 and
``inf``, ``eval.adaptive_refresh_growth``; 0: every step; ``inf``: the schedule alone;
``'..._blend_<rate>'``: at 0 and 0.1 with the blend rate 0.03, 0.1, 0.15, 0.2 or 0.3
instead of the config's), ``'config_cap_<c>'`` (the config's own settings with the
overshoot check's factor at most ``c``, at 2, 3, 10, 30 and ``inf``,
``eval.adaptive_overshoot_cap``), ``'config_restart'`` and ``'config_restart_blend_<rate>'``
(the config's own settings with the state started afresh after ``eval.num_steps``
updates, twice as many, four times, ..., :func:`metamd_jax.doubling_restarts`,
``eval.adaptive_restarts``; at the config's blend rate or at 0.03 or 0.1),
``'config_restart_growth_<a>'`` (the same restarts with each epoch's online half the
config's times the epoch's length over ``eval.num_steps``, 1, 1, 2, 4, ..., to the power
``a``, 0.25 or 0.5, ``eval.adaptive_restart_growth``), ``'config_restart_shrink_<b>'`` (the
learned half times the length to the power ``-b``, 0, 0.25 or 0.5, the last the doubling
trick's step, ``eval.adaptive_restart_shrink``), ``'config_restart_growth_0.5_shrink_0.5'``
(both) and
``'config_restart_momentum_<m>_step_<f>'`` (the same restarts with the epochs longer than
the horizon taking Nesterov's momentum ``m`` at the step factor ``f``: 0.8 at 0.2, 0.9 at
0.1, 0.2 and 0.3, 0.95 at 0.1; ``eval.adaptive_restart_momentum``,
``eval.adaptive_restart_step_factor``), ``'config_sketch_<r>'`` (the config's own
settings with a side of Shampoo's statistics longer than ``r`` plus its leaf's other side
kept as a rank-``r`` frequent-directions sketch, at 16, 32 and 64, or 0: no sketch,
the whole statistics, ``eval.adaptive_blend_sketch_rank``), ``'config_blend_<rate>'``
(the config's own settings with the blend rate 0 (no online half), 0.03, 0.05 or 0.07
alone changed),
``'config_overshoot_step'`` and ``'config_overshoot_step_blend_<rate>'`` (the config's own
settings with the overshoot check shortening the whole blended step,
``eval.adaptive_overshoot_scope='step'``, at the
config's blend rate or at 0.03 or 0.05), and with the check at
0.5 the cheaper online halves ``'eigen_<sum|peak>_<rate>_nesterov_0.5_online_0.5_overshoot_0.5'``
(the diagonal running sums or peak averages at 0.01, 0.03 and 0.1) and
``'eigen_kron_0.1_nesterov_0.5_online_0.5_blocks_128_overshoot_0.5'``;
``--candidates=a,b`` compares a subset; frozen ``'metamd'`` and the reference at its
meta-train-tuned learning rate run next to them for comparison. The rule, fixed before any run:

1. fewest failed runs over the checks where the reference, at its meta-train-tuned
   learning rate, trains (:func:`experiments.benchmark_targets.robustness_summary`): runs
   that diverged (a non-finite loss) or ended above their initial loss, the two outcomes
   the benchmark's robustness table reports (:func:`failed_runs`; counting the second as well
   changes none of the choices recorded in experiments/RESULTS.md up to section 27);
2. then the most checks won: those where the candidate reaches the re-tuned reference's
   final loss on every task in fewer mean steps than the re-tuned reference (and, with
   ``eval.seconds_check`` and ``eval.accuracy_check``, the checks in time and in test
   accuracy below);
3. then, with ``eval.seconds_check``, among the candidates still tied: those whose
   time to the reference's loss in distribution is at most :data:`TIME_FACTOR` (2) times
   the fastest one's (a candidate that does not reach it on every task has none); so a
   candidate that wins the same checks in many times another's wall-clock time is not
   chosen for its final loss alone, whether or not either wins the check in time
   (experiments/RESULTS.md section 31);
4. then the lowest geometric mean, over the checks, of the candidate's mean final
   training loss divided by the re-tuned reference's (a diverged check counts as
   infinite);
5. ties go to ``'config'``, then to the earlier candidate in :data:`CANDIDATES` (the
   single scale first, the blended ones last), then in :data:`OVERSHOOT`.

Writes ``choose_variant.json`` and ``choose_variant.md`` in the workdir and prints the
table; set ``eval.adaptive_per_leaf``, ``eval.adaptive_blend_rate``,
``eval.adaptive_blend_statistics``, ``eval.adaptive_momentum``, ``eval.adaptive_eigenbasis``,
``eval.adaptive_eigenbasis_rank``, ``eval.adaptive_online_power``,
``eval.adaptive_blend_max_dimension``,
``eval.adaptive_blend_block_size``, ``eval.adaptive_blend_sketch_rank``,
``eval.adaptive_blend_sketch_interval``,
``eval.adaptive_overshoot``, ``eval.adaptive_overshoot_decay``,
``eval.adaptive_refresh_growth``,
``eval.adaptive_overshoot_cap``, ``eval.adaptive_overshoot_scope``,
``eval.adaptive_restarts``, ``eval.adaptive_restart_growth``, ``eval.adaptive_restart_shrink``,
``eval.adaptive_restart_momentum`` and ``eval.adaptive_restart_step_factor`` (in the
family's config, or with ``--config.eval...``) to the choice.

The checks are the validation tasks as they are and under each change of
``eval.shifts``; with ``eval.horizon_multiplier = m > 1`` also ``'<m>T'``: the same tasks
for ``m`` times the horizon, the reference re-tuned for that many steps on the tuning
tasks, the whole-set loss every ``m`` steps (every step when ``m`` does not divide ``T``),
as the benchmark's check beyond the horizon. With ``eval.seconds_check`` also
``'in_distribution_seconds'`` (:func:`seconds_check`): in distribution, the time each
candidate takes to the reference's final loss, timed to the step, against the reference's
own ``T``-step time; won when faster, so that a candidate whose steps are few but dear
does not win the time a user waits by counting steps alone. With ``eval.accuracy_check``
(a classification family) also ``'in_distribution_accuracy'`` (:func:`accuracy_won`):
in distribution, won when the candidate's mean test accuracy over the validation tasks is
at least the re-tuned reference's, the benchmark's accuracy target, so that a candidate whose
loss falls fast but which generalises worse than the reference does not win on steps
alone (experiments/RESULTS.md section 27).
"""

from __future__ import annotations

import ast
import math
import os
import time

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import benchmark_runs, benchmark_targets, builders, cli, evaluate, protocol, report  # noqa: E402
from experiments import meta_train as meta_train_exp  # noqa: E402
from metamd_jax import evaluation  # noqa: E402
from metamd_jax.types import PyTree  # noqa: E402

CANDIDATES = {
    'adaptive': {'adaptive_per_leaf': False, 'adaptive_blend_rate': 0.0},
    'adaptive_per_leaf': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.0},
    'blended_0.01': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.01,
                     'adaptive_blend_statistics': 'sum'},
    'blended_0.03': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.03,
                     'adaptive_blend_statistics': 'sum'},
    'blended_0.1': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.1,
                    'adaptive_blend_statistics': 'sum'},
    'blended_peak_0.003': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.003,
                           'adaptive_blend_statistics': 'peak_average'},
    'blended_peak_0.01': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.01,
                          'adaptive_blend_statistics': 'peak_average'},
    **{f'blended_kron_{rate}': {'adaptive_per_leaf': True, 'adaptive_blend_rate': rate,
                                'adaptive_blend_statistics': 'kronecker'}
       for rate in (0.01, 0.03, 0.1, 0.3)},
    **{f'blended_0.01_nesterov_{beta}': {'adaptive_per_leaf': True,
                                         'adaptive_blend_rate': 0.01,
                                         'adaptive_blend_statistics': 'sum',
                                         'adaptive_momentum': beta}
       for beta in (0.5, 0.7, 0.9)},
    **{f'blended_kron_0.1_nesterov_{beta}': {'adaptive_per_leaf': True,
                                             'adaptive_blend_rate': 0.1,
                                             'adaptive_blend_statistics': 'kronecker',
                                             'adaptive_momentum': beta}
       for beta in (0.5, 0.7, 0.9)},
    **{f'blended_peak_{rate}_nesterov_0.5': {'adaptive_per_leaf': True,
                                             'adaptive_blend_rate': rate,
                                             'adaptive_blend_statistics': 'peak_average',
                                             'adaptive_momentum': 0.5}
       for rate in (0.003, 0.01)},
    'eigen': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.0,
              'adaptive_eigenbasis': True},
    **{f'eigen_kron_0.1{tail}': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.1,
                                 'adaptive_blend_statistics': 'kronecker',
                                 'adaptive_eigenbasis': True, 'adaptive_momentum': beta}
       for tail, beta in (('', 0.0), ('_nesterov_0.5', 0.5))},
    **{f'eigen_0.01{tail}': {'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.01,
                             'adaptive_blend_statistics': 'sum',
                             'adaptive_eigenbasis': True, 'adaptive_momentum': beta}
       for tail, beta in (('', 0.0), ('_nesterov_0.5', 0.5))},
    **{f'eigen_kron_0.1_nesterov_0.5_online_{power}': {
        'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.1,
        'adaptive_blend_statistics': 'kronecker', 'adaptive_eigenbasis': True,
        'adaptive_momentum': 0.5, 'adaptive_online_power': power}
       for power in (0.0, 0.5)},
    **{f'eigen_kron_{rate}_nesterov_0.5_online_0.5': {
        'adaptive_per_leaf': True, 'adaptive_blend_rate': rate,
        'adaptive_blend_statistics': 'kronecker', 'adaptive_eigenbasis': True,
        'adaptive_momentum': 0.5, 'adaptive_online_power': 0.5}
       for rate in (0.003, 0.01, 0.03, 0.3)},
    **{f'eigen_kron_{rate}_nesterov_0.5_online_{power}': {
        'adaptive_per_leaf': True, 'adaptive_blend_rate': rate,
        'adaptive_blend_statistics': 'kronecker', 'adaptive_eigenbasis': True,
        'adaptive_momentum': 0.5, 'adaptive_online_power': power}
       for rate in (0.01, 0.03) for power in (0.0, 1.0)},
    **{f'eigen_peak_{rate}_nesterov_0.5': {'adaptive_per_leaf': True,
                                           'adaptive_blend_rate': rate,
                                           'adaptive_blend_statistics': 'peak_average',
                                           'adaptive_eigenbasis': True,
                                           'adaptive_momentum': 0.5}
       for rate in (0.003, 0.01)},
    **{f'eigen_kron_0.1_nesterov_0.5_online_0.5_{tail}': {
        'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.1,
        'adaptive_blend_statistics': 'kronecker', 'adaptive_eigenbasis': True,
        'adaptive_momentum': 0.5, 'adaptive_online_power': 0.5, **sides}
       for tail, sides in (*((f'blocks_{size}', {'adaptive_blend_block_size': size})
                             for size in (256, 128, 64)),
                           ('max_512', {'adaptive_blend_max_dimension': 512}))},
    # With the overshoot check at 0.5: the cheaper online halves (the diagonal running
    # sums or peak averages, or Shampoo's statistics in blocks of 128).
    **{f'eigen_{short}_{rate}_nesterov_0.5_online_0.5_overshoot_0.5': {
        'adaptive_per_leaf': True, 'adaptive_blend_rate': rate,
        'adaptive_blend_statistics': statistics, 'adaptive_eigenbasis': True,
        'adaptive_momentum': 0.5, 'adaptive_online_power': 0.5,
        'adaptive_overshoot': True, 'adaptive_overshoot_decay': 0.5}
       for short, statistics in (('sum', 'sum'), ('peak', 'peak_average'))
       for rate in (0.01, 0.03, 0.1)},
    'eigen_kron_0.1_nesterov_0.5_online_0.5_blocks_128_overshoot_0.5': {
        'adaptive_per_leaf': True, 'adaptive_blend_rate': 0.1,
        'adaptive_blend_statistics': 'kronecker', 'adaptive_eigenbasis': True,
        'adaptive_momentum': 0.5, 'adaptive_online_power': 0.5,
        'adaptive_blend_block_size': 128, 'adaptive_overshoot': True,
        'adaptive_overshoot_decay': 0.5},
}
"""The candidates and their ``eval`` settings; earlier ones win ties."""
for _settings in CANDIDATES.values():  # no momentum unless a candidate names one
  _settings.setdefault('adaptive_momentum', 0.0)
  _settings.setdefault('adaptive_eigenbasis', False)
  _settings.setdefault('adaptive_eigenbasis_rank', 0)
  _settings.setdefault('adaptive_online_power', 1.0)
  _settings.setdefault('adaptive_blend_max_dimension', 1024)
  _settings.setdefault('adaptive_blend_block_size', 0)
  _settings.setdefault('adaptive_blend_sketch_rank', 0)
  _settings.setdefault('adaptive_blend_sketch_interval', 1)
  _settings.setdefault('adaptive_overshoot', False)
  _settings.setdefault('adaptive_overshoot_decay', 0.5)
  _settings.setdefault('adaptive_refresh_growth', math.inf)
  _settings.setdefault('adaptive_overshoot_cap', math.inf)
  _settings.setdefault('adaptive_overshoot_scope', 'learned')
  _settings.setdefault('adaptive_restarts', False)
  _settings.setdefault('adaptive_restart_growth', 0.0)
  _settings.setdefault('adaptive_restart_shrink', 0.0)
  _settings.setdefault('adaptive_restart_momentum', None)
  _settings.setdefault('adaptive_restart_step_factor', 0.5)
  _settings.setdefault('adaptive_lengthen_below', None)
  _settings.setdefault('adaptive_min_scale', 0.1)
  _settings.setdefault('adaptive_guard_margin', None)
  _settings.setdefault('adaptive_guard_steps', None)
  _settings.setdefault('adaptive_guard_progress', None)
  _settings.setdefault('adaptive_guard_prior', False)
OVERSHOOT = {
    **{f'config_overshoot_{decay}': {'adaptive_overshoot': True,
                                     'adaptive_overshoot_decay': decay}
       for decay in (0.0, 0.5, 0.8)},
    **{f'config_overshoot_0.5_blend_{rate}': {'adaptive_overshoot': True,
                                              'adaptive_overshoot_decay': 0.5,
                                              'adaptive_blend_rate': rate}
       for rate in (0.03, 0.3)},
    **{f'config_overshoot_0.5_online_{power}': {'adaptive_overshoot': True,
                                                'adaptive_overshoot_decay': 0.5,
                                                'adaptive_online_power': power}
       for power in (0.0, 1.0)},
    **{f'config_refresh_{growth}': {'adaptive_refresh_growth': growth}
       for growth in (0.0, 0.1, 0.3, 1.0, math.inf)},
    **{f'config_refresh_{growth}_blend_{rate}': {'adaptive_refresh_growth': growth,
                                                 'adaptive_blend_rate': rate}
       for growth in (0.0, 0.1) for rate in (0.03, 0.1, 0.15, 0.2, 0.3)},
    **{f'config_cap_{cap}': {'adaptive_overshoot_cap': cap}
       for cap in (2.0, 3.0, 10.0, 30.0, math.inf)},
    'config_restart': {'adaptive_restarts': True},
    **{f'config_restart_blend_{rate}': {'adaptive_restarts': True,
                                         'adaptive_blend_rate': rate}
       for rate in (0.03, 0.1)},
    **{f'config_restart_growth_{growth}': {'adaptive_restarts': True,
                                            'adaptive_restart_growth': growth}
       for growth in (0.25, 0.5)},
    **{f'config_restart_shrink_{shrink}': {'adaptive_restarts': True,
                                            'adaptive_restart_shrink': shrink}
       for shrink in (0.0, 0.25, 0.5)},
    'config_restart_growth_0.5_shrink_0.5': {'adaptive_restarts': True,
                                             'adaptive_restart_growth': 0.5,
                                             'adaptive_restart_shrink': 0.5},
    **{f'config_restart_momentum_{momentum}_step_{factor}': {
        'adaptive_restarts': True, 'adaptive_restart_momentum': momentum,
        'adaptive_restart_step_factor': factor}
       for momentum, factor in ((0.8, 0.2), (0.9, 0.1), (0.9, 0.2), (0.9, 0.3), (0.95, 0.1))},
    **{f'config_sketch_{rank}': {'adaptive_blend_sketch_rank': rank}
       for rank in (0, 16, 32, 64)},
    **{f'config_sketch_interval_{interval}': {'adaptive_blend_sketch_interval': interval}
       for interval in (0, 1, 2, 4)},
    **{f'config_blend_{rate}': {'adaptive_blend_rate': rate} for rate in (0, 0.03, 0.05, 0.07)},
    **{f'config_lengthen_{below}_min_{floor}': {'adaptive_lengthen_below': below,
                                                'adaptive_min_scale': floor}
       for below in (0.1, 0.3) for floor in (0.01, 0.1)},
    'config_overshoot_step': {'adaptive_overshoot_scope': 'step'},
    **{f'config_eigenbasis_rank_{rank}': {'adaptive_eigenbasis_rank': rank}
       for rank in (0, 16, 32, 64, 128)},
    **{f'config_overshoot_step_blend_{rate}': {'adaptive_overshoot_scope': 'step',
                                               'adaptive_blend_rate': rate}
       for rate in (0.03, 0.05)},
    **{f'config_guard_{margin:g}_steps_{steps}': {'adaptive_guard_margin': margin,
                                                  'adaptive_guard_steps': steps}
       for margin in (2.0, 3.0) for steps in (15, 20, 30, None)},
    **{f'config_guard_2_steps_{steps}_progress_{progress}': {
        'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': steps,
        'adaptive_guard_progress': progress}
       for steps in (15, 20) for progress in (0.01, 0.02)},
    'config_guard_2_steps_20_blend_0': {'adaptive_guard_margin': 2.0,
                                        'adaptive_guard_steps': 20, 'adaptive_blend_rate': 0.0},
    'config_guard_2_steps_20_blend_0_lengthen_off': {
        'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': 20, 'adaptive_blend_rate': 0.0,
        'adaptive_lengthen_below': None},
    'config_guard_2_steps_20_prior': {'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': 20,
                                      'adaptive_guard_prior': True},
    'config_guard_2_steps_20_prior_lengthen_off': {
        'adaptive_guard_margin': 2.0, 'adaptive_guard_steps': 20, 'adaptive_guard_prior': True,
        'adaptive_lengthen_below': None},
}
"""Candidates that keep the config's own settings and add the overshoot check at a
decay (``eval.adaptive_overshoot``, ``eval.adaptive_overshoot_decay``), or at 0.5 with
another blend rate or online power, or refresh the roots of Shampoo's statistics also
after a growth of their gradient mass (``eval.adaptive_refresh_growth``), or cap the
check's factor (``eval.adaptive_overshoot_cap``), or start the state afresh after the
horizon, twice it, ... (``eval.adaptive_restarts``, alone or with the blend rate 0.03 or
0.1, or with each epoch's online half grown as the epoch's length to the power 0.25 or 0.5,
``eval.adaptive_restart_growth``, or its learned half shrunk as the length to the power
-0, -0.25 or -0.5, ``eval.adaptive_restart_shrink``, or growth and shrink both at 0.5,
or with the epochs longer than the horizon taking Nesterov's momentum ``m`` at the step
factor ``f``,
``'config_restart_momentum_<m>_step_<f>'``, ``eval.adaptive_restart_momentum`` and
``eval.adaptive_restart_step_factor``), or keep a rank-``r`` frequent-directions sketch
on the long sides of Shampoo's statistics (``'config_sketch_<r>'``, or the whole
statistics at ``r = 0``, ``eval.adaptive_blend_sketch_rank``), or apply the overshoot
check to the whole blended step, alone or with the blend rate 0.03 or 0.05
(``'config_overshoot_step'``, ``'config_overshoot_step_blend_<rate>'``,
``eval.adaptive_overshoot_scope``), or keep
eigenbasis scales for the ``k`` longest-step eigendirections of each learned factor longer
than ``k`` and one for the rest (``'config_eigenbasis_rank_<k>'``, 16, 32, 64 or 128, or
0: a scale per direction, ``eval.adaptive_eigenbasis_rank``; calibrated at that rank), or
merge a gradient into the sketches at every step, every 2 or 4 steps or at the roots'
refreshes only (``'config_sketch_interval_<j>'``, 1, 2, 4 or 0,
``eval.adaptive_blend_sketch_interval``), or start a leaf's eigenbasis scales below 1,
down to ``f``, when its first gradient is below ``q`` times its calibrated level
(``'config_lengthen_<q>_min_<f>'``, ``eval.adaptive_lengthen_below``,
``eval.adaptive_min_scale``), or put the config's optimiser behind frozen MetaMD (at
``eval.frozen_rank``) with :func:`metamd_jax.guarded_switch`, the frozen step until its
gradients exceed ``m`` times the calibrated levels or until step ``k``
(``'config_guard_<m>_steps_<k>'``, ``m`` 2 or 3, ``k`` 15, 20, 30 or ``None``: no switch
on the step count; ``eval.adaptive_guard_margin``, ``eval.adaptive_guard_steps``), or at
margin 2 from the first step after ``k`` (15 or 20) where the loss's averaged relative
decrease per step is below ``p`` (0.01 or 0.02;
``'config_guard_2_steps_<k>_progress_<p>'``, ``eval.adaptive_guard_progress``), or at
margin 2 switching at 20 with a fallback without the online half
(``'config_guard_2_steps_20_blend_0'``, ``eval.adaptive_blend_rate = 0``) and also without
the longer first steps (``'..._lengthen_off'``, ``eval.adaptive_lengthen_below = None``),
or with the fallback's Shampoo statistics started from the frozen steps' gradient mass
(``'config_guard_2_steps_20_prior'``, ``eval.adaptive_guard_prior``), also without the
longer first steps (``'..._prior_lengthen_off'``); after :data:`CANDIDATES` in ties.

Any other combination is the candidate ``'config:<field>=<value>[:<field>=<value>...]'``
(:func:`parse_set`): the config's own settings with the named fields (those the
candidates set, without ``eval.``) set to Python literals, e.g.
``'config:adaptive_momentum=0.7'`` or ``'config:adaptive_lengthen_below=None'``; after
the named candidates in ties, in the order given."""
OWN = 'config'
"""The candidate that keeps the config's own ``eval`` settings (always allowed; first in
ties): how :mod:`experiments.sweep` scores a meta-training setting by this rule."""
IN_DISTRIBUTION = 'in_distribution'
SECONDS = 'in_distribution_seconds'
"""The check in wall-clock time (``eval.seconds_check``): see :func:`seconds_check`."""
ACCURACY = 'in_distribution_accuracy'
"""The check in test accuracy (``eval.accuracy_check``): see :func:`accuracy_won`."""
TIME_FACTOR = 2.0
"""Step 3 of the rule: among candidates tied on failed runs and checks won, those whose
in-distribution time to the reference's loss is more than this many times the fastest
one's drop out (twice: well beyond the timing noise of repeated runs here, about 20%)."""
TIMING_REPEATS = 3
"""Timed runs per task and step count in :data:`SECONDS` (the median is kept)."""
RESULT = 'choose_variant'
SET = ':'
"""Separates a candidate's own settings in ``'config:<field>=<value>[:<field>=<value>...]'``
(:func:`parse_set`)."""


def parse_set(name: str) -> dict:
  """The settings of a candidate ``'config:<field>=<value>[:...]'``: the config's own
  settings with each named ``eval`` field (one of those the candidates set, without the
  ``eval.`` prefix) set to a Python literal (``0.7``, ``None``, ``True``; ``inf`` for
  infinity).

  Raises:
    ValueError: naming an entry that is not ``field=value``, a field the candidates do
      not set, a field set twice or a value that is not a literal.
  """
  fields = CANDIDATES['eigen_kron_0.1_nesterov_0.5_online_0.5']
  entries = name.split(SET)[1:]
  if not entries or entries == ['']:
    raise ValueError(f'candidate {name!r} sets nothing: write {OWN}{SET}<field>=<value>.')
  settings = {}
  for entry in entries:
    field, equals, text = entry.partition('=')
    if not equals or not field or not text:
      raise ValueError(f'candidate {name!r}: {entry!r} is not <field>=<value>.')
    if field not in fields:
      raise ValueError(f'candidate {name!r}: unknown field {field!r}; the candidates set '
                       f'{tuple(fields)}.')
    if field in settings:
      raise ValueError(f'candidate {name!r} sets {field!r} twice.')
    if text in ('inf', '-inf'):
      value = float(text)
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        raise ValueError(f'candidate {name!r}: the value {text!r} of {field!r} is not a '
                         'Python literal (a number, None, True, False or a quoted '
                         'string).') from None
    settings[field] = value
  return settings


def settings_of(config: ml_collections.ConfigDict, name: str) -> dict:
  """The ``eval`` settings of candidate ``name``; :data:`OWN`: the config's own values of
  the fields the candidates set."""
  if name in OVERSHOOT:
    return {**settings_of(config, OWN), **OVERSHOOT[name]}
  if name.startswith(OWN + SET):
    return {**settings_of(config, OWN), **parse_set(name)}
  if name != OWN:
    return CANDIDATES[name]
  template = CANDIDATES['eigen_kron_0.1_nesterov_0.5_online_0.5']
  return {field: config.eval.get(field, default) for field, default in template.items()}


def _loss_ratio(check: dict, name: str) -> float:
  """``name``'s mean final training loss over the re-tuned reference's in ``check``."""
  entries = check['optimizers']
  mine = entries.get(name, {}).get('final_train_loss', [None])[0]
  theirs = entries.get(check['reference'], {}).get('final_train_loss', [None])[0]
  if mine is None or theirs is None or not theirs > 0 or not math.isfinite(mine):
    return math.inf
  diverged = entries[name]['diverged']  # a mean over the finite runs hides diverged ones
  return math.inf if diverged else mine / theirs


def has_accuracy(checks: dict) -> bool:
  """Whether the in-distribution check reports test accuracy (a classification family)."""
  check = checks.get(IN_DISTRIBUTION)
  return check is not None and 'test_accuracy' in check['optimizers'].get(
      check['reference'], {})


def accuracy_won(check: dict, name: str) -> bool:
  """The check in test accuracy, on the in-distribution ``check``: won when ``name``
  has no diverged run and its mean test accuracy over the validation tasks is at least
  the re-tuned reference's (the benchmark's "test accuracy no lower than Adam's")."""
  entries = check['optimizers']
  mine = entries.get(name, {})
  theirs = entries[check['reference']]
  if mine.get('diverged', 1) or 'test_accuracy' not in mine:
    return False
  return bool(mine['test_accuracy'][0] >= theirs['test_accuracy'][0])


def score(checks: dict, name: str, reference: str, seconds: dict | None = None,
          accuracy: bool = False) -> dict:
  """The rule's numbers for one candidate over ``checks`` (see the module doc);
  ``seconds``: :func:`seconds_check`'s result, one more check, won where it marks
  ``name`` ``'faster'`` (it adds no loss ratio); ``accuracy``: also the check
  :data:`ACCURACY` (:func:`accuracy_won`), where ``checks`` reports test accuracy
  (:func:`has_accuracy`; it adds no loss ratio either)."""
  summary = benchmark_targets.robustness_summary(checks, [name], reference)[name]
  ratios = [_loss_ratio(check, name) for check in checks.values()]
  geometric = (math.inf if not ratios or not all(map(math.isfinite, ratios))
               else math.exp(sum(map(math.log, ratios)) / len(ratios)))
  above = sum(checks[check]['optimizers'].get(name, {}).get('above_initial_loss', 0)
              for check in summary['baseline_trained'])
  faster = list(summary['faster'])
  if seconds is not None and seconds['optimizers'].get(name, {}).get('faster'):
    faster.append(SECONDS)
  accuracy = accuracy and has_accuracy(checks)
  if accuracy and accuracy_won(checks[IN_DISTRIBUTION], name):
    faster.append(ACCURACY)
  row = {'diverged_runs': summary['diverged_runs'], 'diverged_in': summary['diverged_in'],
         'above_initial_runs': int(above),
         'failed_runs': summary['diverged_runs'] + int(above),
         'faster': faster, 'num_faster': len(faster),
         'num_checks': len(checks) + (seconds is not None) + accuracy,
         'loss_ratio_geometric_mean': geometric}
  entry = {} if seconds is None else seconds['optimizers'].get(name, {})
  if 'elapsed_seconds_to_reference_final_loss' in entry:  # the mean time, for step 3
    mean = entry['elapsed_seconds_to_reference_final_loss'][0]
    row['seconds_to_reference_loss'] = (
        float(mean) if entry['reached_fraction'] == 1.0 and mean is not None else math.inf)
  return row


def won_in_time(entry: dict, fraction: float) -> bool:
  """Whether a :func:`seconds_check` entry (:func:`experiments.benchmark_runs.elapsed_summary`)
  wins it: every task reaches the reference's loss, in less than ``fraction`` of the
  reference's ``T``-step time on average."""
  share = entry['elapsed_fraction_of_reference_T_seconds']
  return bool(entry['reached_fraction'] == 1.0 and share is not None and share < fraction)


def seconds_check(optimizers: dict, reference: str, family, tasks: PyTree,
                  curves: dict[str, evaluation.Curves], num_steps: int,
                  repeats: int = TIMING_REPEATS, fraction: float = 1.0) -> dict:
  """The in-distribution check in wall-clock time: faster than the reference in seconds.

  Per task, each optimiser's run stopped at the step where it reaches the reference's
  final loss is timed (:func:`experiments.benchmark_runs.elapsed_to`: compiled per step
  count, the median of ``repeats``; a step whose cost varies along the run, or a cost
  paid once at ``init``, is counted as it falls), and so are the reference's own
  ``num_steps``-step runs (:func:`experiments.benchmark_runs.time_runs`). An optimiser
  wins the check when it reaches the loss on every task and its mean seconds are below
  ``fraction`` times the reference's mean ``num_steps``-step seconds: with ``fraction =
  1`` the steps checks' "faster than the re-tuned reference", counted in the time a user
  waits; with ``1/3`` the benchmark's wall-clock target (``eval.seconds_check_fraction``).

  Args:
    optimizers: ``{name: optimizer}``, the reference among them.
    reference: the reference's name (in distribution the re-tuned reference is the tuned
      one: the same runs).
    family, tasks: the validation tasks the ``curves`` ran.
    curves: ``{name: Curves}`` of ``num_steps`` steps on ``tasks``.
    num_steps: ``T``.
    repeats: timed runs per task and step count.
    fraction: in ``(0, 1]``, the share of the reference's ``T``-step seconds to beat.

  Returns:
    ``{'description', 'reference', 'reference_seconds_for_T_steps', 'repeats', 'fraction',
    'optimizers': {name: {**benchmark_runs.elapsed_summary(...), 'faster'}}}`` for every
    name but the reference's.
  """
  target = evaluation.final_train_loss(curves[reference].train_losses)
  reference_seconds = float(np.mean(benchmark_runs.time_runs(
      optimizers[reference], family, tasks, num_steps, repeats)))
  entries = {}
  for name, optimizer in optimizers.items():
    if name == reference:
      continue
    elapsed = benchmark_runs.elapsed_to(optimizer, family, tasks, curves[name], target,
                                        repeats)
    entry = benchmark_runs.elapsed_summary(elapsed, reference_seconds)
    entry['faster'] = won_in_time(entry, fraction)
    entries[name] = entry
  share = '' if fraction == 1.0 else f'{fraction:.4g} of '
  return {'description': f'in distribution, seconds to the final loss of {reference} '
                         f'against {share}its own {num_steps}-step seconds',
          'reference': reference, 'reference_seconds_for_T_steps': reference_seconds,
          'repeats': repeats, 'fraction': fraction, 'optimizers': entries}


def failed_runs(row: dict) -> int:
  """A :func:`score` row's runs that diverged or ended above their initial loss, where the
  reference trains (a row without the second count, as written before it was kept: its
  diverged runs)."""
  return row.get('failed_runs', row['diverged_runs'])


def _tied_best(scores: dict) -> list[str]:
  """The candidates best on the rule's first two steps (failed runs, then checks won)."""
  def robustness(name):
    return failed_runs(scores[name]), -scores[name]['num_faster']

  best = min(map(robustness, scores))
  return [name for name in scores if robustness(name) == best]


def dropped_by_time(scores: dict) -> list[str]:
  """The candidates step 3 of the rule drops: tied on the first two steps, more than
  :data:`TIME_FACTOR` times the fastest tied one's time to the reference's loss.

  Applies where every tied row has ``'seconds_to_reference_loss'`` (rows scored with the
  check in seconds; rows stored before it was kept have none): else none is dropped.
  """
  tied = _tied_best(scores)
  times = [scores[name].get('seconds_to_reference_loss') for name in tied]
  if not all(t is not None for t in times):
    return []
  fastest = min(times)
  return [name for name, t in zip(tied, times) if t > TIME_FACTOR * fastest]


def choose(scores: dict) -> str:
  """The candidate the rule picks from :func:`score` results (insertion order breaks ties)."""
  dropped = dropped_by_time(scores)
  tied = [name for name in _tied_best(scores) if name not in dropped]
  return min(tied, key=lambda name: scores[name]['loss_ratio_geometric_mean'])


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """``config`` with candidate ``name``'s ``eval`` settings, validated
  (:func:`experiments.builders.validate_config`).

  Raises:
    ValueError: naming the candidate, when a setting has the wrong type or a bad value.
  """
  variant = config.copy_and_resolve_references()
  try:
    variant.eval.update(settings_of(config, name))
    builders.validate_config(variant)
  except (TypeError, ValueError) as error:
    raise ValueError(f'candidate {name!r}: {error}') from error
  return variant


def check_candidates(candidates) -> tuple[str, ...]:
  """Validate candidate names (:data:`OWN`, :data:`CANDIDATES` or :data:`OVERSHOOT`
  keys, no repeats).

  Raises:
    ValueError: naming an unknown or repeated candidate, or on an empty selection.
  """
  names = tuple(candidates)
  if not names:
    raise ValueError('candidates is empty: name at least one of '
                     f'{tuple(CANDIDATES)}.')
  for name in names:
    if name.startswith(OWN + SET):
      parse_set(name)
    elif name != OWN and name not in CANDIDATES and name not in OVERSHOOT:
      raise ValueError(f'unknown candidate {name!r}; known: '
                       f'{(OWN, *CANDIDATES, *OVERSHOOT)}, or '
                       f'{OWN}{SET}<field>=<value>[{SET}...].')
  if len(set(names)) != len(names):
    raise ValueError(f'candidates names a candidate twice: {names}.')
  return tuple(name for name in (OWN, *CANDIDATES, *OVERSHOOT)  # this order: ties
               if name in names) + tuple(name for name in names  # then as given
                                         if name.startswith(OWN + SET))


def compare(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
            divergence: PyTree | None = None, candidates=None) -> dict:
  """Run every check on the validation tasks and choose the variant.

  Args:
    config: the experiment config (``eval``: ``num_validation_tasks`` validation tasks,
      ``num_tune_tasks``, ``num_steps``, ``learning_rates``, ``reference``, ``shifts``,
      ``adaptive_decay``, ``adaptive_quantile``).
    workdir: where ``divergence.npz`` is read (unless ``divergence`` is given).
    divergence: the learned divergence.
    candidates: which of :data:`CANDIDATES` to compare (``None``: all; ties go to the
      one earlier in :data:`CANDIDATES`).

  Returns:
    ``{'tasks', 'num_tasks', 'reference', 'reference_learning_rate', 'levels':
    {candidate: calibrated levels}, 'checks': {check: evaluate_shift-like result},
    'scores': {candidate: score(...)}, 'chosen', 'adaptive_per_leaf',
    'adaptive_blend_rate'}`` (the last two: the chosen candidate's settings).

  Raises:
    ValueError: when the reference diverges at every learning rate, or when calibration
      fails for every candidate (frozen MetaMD does not train a tuning task).
  """
  candidates = check_candidates(CANDIDATES if candidates is None else candidates)
  builders.validate_config(config)
  family, _ = builders.build_families(config)
  divergence = meta_train_exp.learned_divergence(workdir, family, divergence)
  ev = config.eval
  num_tasks = builders.num_validation_tasks(ev)
  tune_tasks = evaluation.tuning_tasks(family, config.seed, ev.num_tune_tasks)
  tuned, _ = protocol.tune_baselines((ev.reference,), ev, family, tune_tasks, ev.num_steps)
  if tuned[ev.reference] is None:
    raise ValueError(f'{ev.reference} diverged at every learning rate of '
                     f'config.eval.learning_rates {tuple(ev.learning_rates)}.')
  optimizers = {'metamd': metamd_jax.metamd(divergence)}
  levels = {}
  calibrations = {}
  variants = {name: variant_config(config, name) for name in candidates}
  for name in candidates:
    settings = settings_of(config, name)
    variant = variants[name]
    key = (settings['adaptive_per_leaf'], settings['adaptive_eigenbasis'],
           settings['adaptive_eigenbasis_rank'])
    if key not in calibrations:  # the levels depend on these three alone
      calibrations[key] = evaluate.calibrate(variant, divergence, family, tune_tasks)
    calibration = calibrations[key]
    optimizer = evaluate.adaptive_optimizer(variant, divergence, calibration)
    if optimizer is not None:
      optimizers[name], levels[name] = optimizer, calibration['reference_norm']
  if not levels:
    raise ValueError('calibration failed for every candidate: frozen MetaMD does not '
                     'train a meta-train tuning task (it diverges or ends at or above its '
                     'initial loss).')
  learning_rates = {name: None for name in optimizers}
  optimizers[ev.reference] = builders.BASELINES[ev.reference](tuned[ev.reference])
  learning_rates[ev.reference] = tuned[ev.reference]

  checks = {}
  timed = None
  shifts = builders.applicable_shifts(family, ev.shifts)
  for check in (IN_DISTRIBUTION, *shifts):
    started = time.perf_counter()
    changed = (family if check == IN_DISTRIBUTION
               else builders.shifted_family(config, family, check, 'meta_train'))
    validation = evaluation.tuning_tasks(changed, config.seed, num_tasks)
    changed_tune = evaluation.tuning_tasks(changed, config.seed, ev.num_tune_tasks)
    curves = {name: evaluation.run(optimizer, changed, validation, ev.num_steps,
                                   track_every=ev.track_every)
              for name, optimizer in optimizers.items()}
    description = ('the validation tasks as they are' if check == IN_DISTRIBUTION
                   else builders.SHIFTS[check])
    result, _ = protocol.against_retuned(ev, description, (changed, changed_tune),
                                         (changed, validation), ev.num_steps,
                                         ev.track_every, curves, learning_rates)
    result['seconds'] = time.perf_counter() - started
    checks[check] = result
    if check == IN_DISTRIBUTION and ev.get('seconds_check', False):
      timed = seconds_check(optimizers, ev.reference, family, validation, curves,
                            ev.num_steps, fraction=ev.get('seconds_check_fraction', 1.0))
  multiplier = ev.get('horizon_multiplier', 0)
  if multiplier > 1:  # beyond the horizon, as the benchmark's check
    started = time.perf_counter()
    validation = evaluation.tuning_tasks(family, config.seed, num_tasks)
    curves = {name: benchmark_runs.long_run(optimizer, family, validation, ev.num_steps,
                                            multiplier)
              for name, optimizer in optimizers.items()}
    result, _ = protocol.beyond_horizon(ev, multiplier, ev.num_steps, (family, tune_tasks),
                                        (family, validation), curves, learning_rates)
    result['seconds'] = time.perf_counter() - started
    checks[f'{multiplier}T'] = result
  scores = {name: score(checks, name, ev.reference, timed, ev.get('accuracy_check', False))
            for name in candidates if name in levels}
  chosen = choose(scores)
  return {'tasks': 'validation: meta-train tuning tasks (evaluation.tuning_tasks)',
          'num_tasks': num_tasks, 'reference': ev.reference,
          'reference_learning_rate': tuned[ev.reference], 'levels': levels,
          'checks': checks, **({SECONDS: timed} if timed is not None else {}),
          'accuracy_check': bool(ev.get('accuracy_check', False) and has_accuracy(checks)),
          'scores': scores, 'chosen': chosen,
          **settings_of(config, chosen)}


def format_choice(result: dict) -> str:
  """The markdown of :func:`compare`'s result: the rule's numbers, then every check."""
  reference = result['reference']
  lines = [f"Adaptive MetaMD's variant on {result['num_tasks']} validation tasks (meta-train "
           'tasks never used in meta-training or meta-testing), '
           f"{len(result['checks']) + (SECONDS in result) + bool(result.get('accuracy_check'))} "
           f"checks; chosen: **{result['chosen']}** "
           f"(eval.adaptive_per_leaf={result['adaptive_per_leaf']}, "
           f"eval.adaptive_blend_rate={result['adaptive_blend_rate']}"
           + (f", eval.adaptive_blend_statistics={result['adaptive_blend_statistics']!r}"
              if 'adaptive_blend_statistics' in result else '')
           + (f", eval.adaptive_momentum={result['adaptive_momentum']}"
              if result.get('adaptive_momentum') else '')
           + (', eval.adaptive_eigenbasis=True' if result.get('adaptive_eigenbasis') else '')
           + (f", eval.adaptive_eigenbasis_rank={result['adaptive_eigenbasis_rank']}"
              if result.get('adaptive_eigenbasis_rank', 0) else '')
           + (f", eval.adaptive_online_power={result['adaptive_online_power']}"
              if result.get('adaptive_online_power', 1.0) != 1.0 else '')
           + (f", eval.adaptive_blend_max_dimension={result['adaptive_blend_max_dimension']}"
              if result.get('adaptive_blend_max_dimension', 1024) != 1024 else '')
           + (f", eval.adaptive_blend_block_size={result['adaptive_blend_block_size']}"
              if result.get('adaptive_blend_block_size', 0) else '')
           + (f", eval.adaptive_blend_sketch_rank={result['adaptive_blend_sketch_rank']}"
              if result.get('adaptive_blend_sketch_rank', 0) else '')
           + (", eval.adaptive_blend_sketch_interval="
              f"{result['adaptive_blend_sketch_interval']}"
              if result.get('adaptive_blend_sketch_interval', 1) != 1 else '')
           + (f", eval.adaptive_lengthen_below={result['adaptive_lengthen_below']}, "
              f"eval.adaptive_min_scale={result['adaptive_min_scale']}"
              if result.get('adaptive_lengthen_below') is not None else '')
           + (', eval.adaptive_overshoot=True, eval.adaptive_overshoot_decay='
              f"{result['adaptive_overshoot_decay']}" if result.get('adaptive_overshoot')
              else '')
           + (f", eval.adaptive_overshoot_cap={result['adaptive_overshoot_cap']}"
              if result.get('adaptive_overshoot')
              and result.get('adaptive_overshoot_cap', math.inf) != math.inf else '')
           + (f", eval.adaptive_overshoot_scope={result['adaptive_overshoot_scope']!r}"
              if result.get('adaptive_overshoot')
              and result.get('adaptive_overshoot_scope', 'learned') != 'learned' else '')
           + (f", eval.adaptive_refresh_growth={result['adaptive_refresh_growth']}"
              if result.get('adaptive_refresh_growth', math.inf) != math.inf else '')
           + (', eval.adaptive_restarts=True' if result.get('adaptive_restarts') else '')
           + (f", eval.adaptive_restart_growth={result['adaptive_restart_growth']}"
              if result.get('adaptive_restart_growth', 0.0) else '')
           + (f", eval.adaptive_restart_shrink={result['adaptive_restart_shrink']}"
              if result.get('adaptive_restart_shrink', 0.0) else '')
           + (f", eval.adaptive_restart_momentum={result['adaptive_restart_momentum']}, "
              'eval.adaptive_restart_step_factor='
              f"{result.get('adaptive_restart_step_factor', 0.5)}"
              if result.get('adaptive_restart_momentum') is not None else '')
           + ').', '',
           f'| candidate | runs diverged or ended above their start where {reference} '
           f'trains | checks won (faster '
           f'than {reference} re-tuned'
           + (f'; {ACCURACY}: test accuracy at least its' if result.get('accuracy_check')
              else '')
           + f') | final loss / re-tuned {reference} (geometric mean) |',
           '| --- | --- | --- | --- |']
  for name, row in result['scores'].items():
    faster = ', '.join(row['faster']) or 'none'
    lines.append(f"| {name} | {failed_runs(row)} | {row['num_faster']} of "
                 f"{row['num_checks']} ({faster}) | "
                 f"{report.number_text(row['loss_ratio_geometric_mean'])} |")
  dropped = dropped_by_time(result['scores'])
  if dropped:
    lines += ['', f"Dropped by the rule's step on time (more than {TIME_FACTOR:g} times the "
                  'fastest tied candidate\'s time to the reference\'s loss): '
                  + ', '.join(dropped) + '.']
  optimizers = {name: {'reference_norm': level} for name, level in result['levels'].items()}
  if SECONDS in result:
    lines += ['', *seconds_lines(result[SECONDS])]
  lines += ['', *report.shift_table(result['checks'], optimizers, label='check')]
  return '\n'.join(lines)


def seconds_lines(timed: dict) -> list[str]:
  """The markdown table of :func:`seconds_check`'s result."""
  reference = timed['reference']
  lines = [f"Check {SECONDS}: {timed['description']} "
           f"({timed['reference_seconds_for_T_steps']:.4f} s; median of {timed['repeats']} "
           'timed runs per task).', '',
           f'| optimiser | elapsed s to {reference} final loss | x {reference} T-step s '
           '| faster |', '| --- | --- | --- | --- |']
  for name, row in timed['optimizers'].items():
    fraction = row['elapsed_fraction_of_reference_T_seconds']
    elapsed = report.reach_text(row['elapsed_seconds_to_reference_final_loss'],
                                row['reached_fraction'], '.4f')
    lines.append(f"| {name} | {elapsed} | {report.number_text(fraction)} | "
                 f"{'yes' if row['faster'] else 'no'} |")
  return lines


def main(argv):
  flag_values = cli.start(argv)
  result = compare(flag_values.config, flag_values.workdir,
                   candidates=flag_values.candidates or None)
  report.write_result(flag_values.workdir, RESULT, result, format_choice(result))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Directory with the learned divergence.npz; the '
                      'results are written there.')
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config file.',
                                  lock_config=True)
  flags.DEFINE_list('candidates', [], 'Candidates to compare (names of CANDIDATES or '
                    'OVERSHOOT, or config:<field>=<value>[:...], comma-separated); empty: '
                    'all of CANDIDATES.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
