"""The benchmark's targets for MetaMD: declared per family in the config, checked here.

A family config's ``targets`` section (``configs/benchmark.py``) switches on any of these
kinds of target, each checked on the mean over the held-out tasks (its key in
``results.json`` in brackets):

- ``steps_at_most_T_over = n`` (0: off): MetaMD's steps to the reference's final loss at
  most ``T / n``, every task reaching it (``steps_to_<reference>_at_most_T_over_<n>``);
- ``seconds_at_most_reference_over = n`` (0: off): MetaMD's seconds to the reference's
  final loss at most the reference's seconds for ``T`` steps over ``n``, every task
  reaching it (``seconds_at_most_<reference>_seconds_over_<n>``); the seconds are the
  elapsed ones (runs stopped where each task reaches the loss,
  ``elapsed_seconds_to_<reference>_final_loss``) where the results have them, else the
  steps times the mean seconds per step;
- ``test_accuracy_at_least_reference = True``: MetaMD's test accuracy at least the
  reference's (``test_accuracy_at_least_<reference>``; classification families only);
- ``fewer_steps_than_every_baseline = True``: for every tuned baseline, MetaMD reaches the
  baseline's final loss in fewer steps than the baseline itself, every task reaching it
  (``fewer_steps_than_<baseline>``);
- ``robust_no_divergence_and_faster_fraction = f`` (in ``(0, 1]``; 0: off; classification
  families only): from the family's robustness checks (:func:`robustness_summary`),
  no diverged run of MetaMD in any check where the reference baseline at its
  meta-train-tuned learning rate trains (``no_diverged_runs_where_<baseline>_trains``,
  value: MetaMD's diverged runs there, limit 0), and MetaMD faster than the re-tuned
  reference in at least a fraction ``f`` of all checks
  (``faster_than_<baseline>_retuned_in_<f>_of_checks``, value: that fraction).

Adaptive MetaMD and low-rank MetaMD (``metamd_low_rank``), where the benchmark ran them,
are checked against every declared target but robustness alike, their keys prefixed
``metamd_adaptive_`` and ``metamd_low_rank_`` (reported next to MetaMD's; MetaMD's are the
family's target); adaptive MetaMD's robustness too.

A result is ``{'value': MetaMD's figure, 'limit': the bound, 'met': bool}``; a figure that
is missing (a baseline that diverged at every learning rate, no robustness checks) is
``None`` and not met.
"""

from __future__ import annotations

import math

import ml_collections

NUMBER_FIELDS = ('steps_at_most_T_over', 'seconds_at_most_reference_over',
                 'robust_no_divergence_and_faster_fraction')
FLAG_FIELDS = ('test_accuracy_at_least_reference', 'fewer_steps_than_every_baseline')
FIELDS = NUMBER_FIELDS + FLAG_FIELDS


def validate_targets(family: ml_collections.ConfigDict, field: str) -> None:
  """Check the ``targets`` section of a family config; raise ``ValueError`` naming a bad field.

  Args:
    family: the family's experiment config (no ``targets`` section: no targets).
    field: the family's place in the benchmark config, for messages
      (``'config.families.mnist_mlp'``).
  """
  targets = family.get('targets', None)
  if targets is None:
    return
  if not isinstance(targets, ml_collections.ConfigDict):
    raise ValueError(f'{field}.targets must be a ConfigDict of target fields {FIELDS}, '
                     f'got {targets!r}.')
  for name, value in targets.items():
    if name not in FIELDS:
      raise ValueError(f'{field}.targets.{name} is not a target; the targets are {FIELDS}.')
    if name in NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
      raise ValueError(f'{field}.targets.{name} must be a finite number >= 0 (0: no such '
                       f'target), got {value!r}.')
    if name in FLAG_FIELDS and not isinstance(value, bool):
      raise ValueError(f'{field}.targets.{name} must be True or False, got {value!r}.')
  fraction = targets.get('robust_no_divergence_and_faster_fraction', 0)
  if fraction > 1:
    raise ValueError(f'{field}.targets.robust_no_divergence_and_faster_fraction must be a '
                     f'fraction of the checks in [0, 1] (0: no such target), got {fraction!r}.')
  for name, what in (('test_accuracy_at_least_reference', 'test accuracy'),
                     ('robust_no_divergence_and_faster_fraction', 'the shifts change images')):
    if targets.get(name, False) and family.task.family != 'classification':
      raise ValueError(f'{field}.targets.{name} needs a classification family ({what}); '
                       f'this one is {family.task.family!r}.')


def robustness_summary(robustness: dict, learned, baseline: str) -> dict:
  """What the robustness checks say of each learned optimiser, for the robustness target.

  Counts, over every check of ``robustness`` (the shifts, the long-horizon check and the
  held-out-dataset check alike, each laid out as
  :func:`experiments.evaluate.evaluate_shift`'s result):

  - ``baseline_trained``: the checks where ``baseline`` (Adam), at its meta-train-tuned
    learning rate, trained: it ran there and none of its runs diverged (a non-finite
    whole-set loss; a run that ended above its initial loss still counts as trained);
  - ``diverged_runs``: the optimiser's diverged runs summed over those checks, and
    ``diverged_in`` the checks among them where it had any;
  - ``faster``: the checks where it reached the re-tuned baseline's final loss
    (``<baseline>_retuned``) on every held-out task (``reached_fraction == 1``) and in
    fewer mean steps than the re-tuned baseline itself needs to reach it (a check whose
    re-tuning diverged at every learning rate has no such loss: not faster);
  - ``faster_fraction``: ``len(faster) / len(checks)`` over all the checks (``None``
    without checks).

  Args:
    robustness: ``{check: {'reference', 'optimizers': {name: {'diverged',
      'steps_to_<reference>_final_loss', 'reached_fraction', ...}}}}``.
    learned: the learned optimisers' names (those absent from a check are skipped there:
      not diverged, not faster).
    baseline: the baseline re-tuned in each check (``'adam'``).

  Returns:
    ``{name: {'baseline', 'reference', 'checks', 'baseline_trained', 'diverged_runs',
    'diverged_in', 'faster', 'faster_fraction'}}`` for every name of ``learned``.
  """
  checks = list(robustness)
  trained = [c for c in checks
             if robustness[c]['optimizers'].get(baseline, {}).get('diverged', 1) == 0]
  # The re-tuned baseline's name (protocol.retuned_reference: '<baseline>_retuned').
  reference_name = (robustness[checks[0]]['reference'] if checks else f'{baseline}_retuned')
  summary = {}
  for name in learned:
    diverged = {c: robustness[c]['optimizers'].get(name, {}).get('diverged', 0)
                for c in trained}
    faster = []
    for check in checks:
      result = robustness[check]
      reference, entries = result['reference'], result['optimizers']
      key = f'steps_to_{reference}_final_loss'
      mine, theirs = entries.get(name, {}), entries.get(reference, {})
      steps, limit = mine.get(key, [None])[0], theirs.get(key, [None])[0]
      if (mine.get('reached_fraction') == 1.0 and steps is not None and limit is not None
          and steps < limit):
        faster.append(check)
    summary[name] = {
        'baseline': baseline, 'reference': reference_name, 'checks': checks,
        'baseline_trained': trained, 'diverged_runs': int(sum(diverged.values())),
        'diverged_in': [c for c, n in diverged.items() if n],
        'faster': faster,
        'faster_fraction': len(faster) / len(checks) if checks else None,
    }
  return summary


def _target(value, limit, met: bool) -> dict:
  return {'value': value, 'limit': limit, 'met': bool(met)}


def _at_most(value, limit) -> bool:
  return value is not None and limit is not None and value <= limit


def evaluate_targets(targets: ml_collections.ConfigDict | None, result: dict) -> dict:
  """Check the declared ``targets`` against one benchmark family's ``result``.

  Args:
    targets: the family's ``targets`` section (validated by :func:`validate_targets`), or
      ``None``.
    result: the family's results (``'horizon'``, ``'reference'``, ``'optimizers'``,
      ``'learned_vs_baselines'``, ``'robustness_summary'``), statistics as ``[mean, std]``
      pairs.

  Returns:
    ``{key: {'value', 'limit', 'met'}}`` for every declared target (empty without
    targets or without a ``'metamd'`` run).
  """
  if not targets or 'metamd' not in result['optimizers']:
    return {}
  checked = _learned_targets(targets, result, 'metamd')
  for name in ('metamd_adaptive', 'metamd_low_rank'):  # next to MetaMD's where it ran
    if name in result['optimizers'] and name in result['learned_vs_baselines']:
      checked.update(_learned_targets(targets, result, name))
  fraction = targets.get('robust_no_divergence_and_faster_fraction', 0)
  if fraction:
    checked.update(_robustness_targets(result, fraction))
  return checked


def _learned_targets(targets: ml_collections.ConfigDict, result: dict, name: str) -> dict:
  """The steps, seconds, accuracy and baseline targets of the learned optimiser ``name``
  (its keys prefixed ``<name>_`` unless it is ``'metamd'``)."""
  learned = result['optimizers'][name]
  prefix = '' if name == 'metamd' else f'{name}_'
  horizon, reference = result['horizon'], result['reference']
  versus = result['learned_vs_baselines'].get(name, {})
  row = versus.get(reference)  # the learned optimiser against the reference's final loss
  ref = result['optimizers'].get(reference)
  steps = row['steps'][0] if row else None
  seconds = row['seconds'][0] if row else None
  elapsed = learned.get(f'elapsed_seconds_to_{reference}_final_loss')
  if row and elapsed is not None:  # measured to the step, not estimated
    seconds = elapsed[0]
  all_reached = row is not None and row['reached_fraction'] == 1.0
  checked = {}
  over = targets.get('steps_at_most_T_over', 0)
  if over:
    limit = horizon / over
    checked[f'{prefix}steps_to_{reference}_at_most_T_over_{over:g}'] = _target(
        steps, limit, all_reached and _at_most(steps, limit))
  over = targets.get('seconds_at_most_reference_over', 0)
  if over:
    limit = ref['wall_clock_seconds'][0] / over if ref else None
    checked[f'{prefix}seconds_at_most_{reference}_seconds_over_{over:g}'] = _target(
        seconds, limit, all_reached and _at_most(seconds, limit))
  if targets.get('test_accuracy_at_least_reference', False):
    value = learned.get('test_accuracy', [None])[0]
    limit = ref.get('test_accuracy', [None])[0] if ref else None
    checked[f'{prefix}test_accuracy_at_least_{reference}'] = _target(value, limit,
                                                                      _at_most(limit, value))
  if targets.get('fewer_steps_than_every_baseline', False):
    for baseline, versus_row in versus.items():
      value, limit = versus_row['steps'][0], versus_row['baseline_steps'][0]
      met = (versus_row['reached_fraction'] == 1.0 and value is not None
             and limit is not None and value < limit)
      checked[f'{prefix}fewer_steps_than_{baseline}'] = _target(value, limit, met)
  return checked


def _robustness_targets(result: dict, fraction: float) -> dict:
  """The robustness target of MetaMD and, reported alike, of adaptive MetaMD."""
  summary = result.get('robustness_summary') or {}
  baseline = next(iter(summary.values()))['baseline'] if summary else result['reference']
  checked = {}
  for name in ('metamd', 'metamd_adaptive'):
    if name == 'metamd_adaptive' and name not in summary:
      continue  # calibration failed or adaptive MetaMD is off: nothing to report
    entry = summary.get(name)
    prefix = '' if name == 'metamd' else f'{name}_'
    diverged = entry['diverged_runs'] if entry else None
    faster = entry['faster_fraction'] if entry else None
    checked[f'{prefix}no_diverged_runs_where_{baseline}_trains'] = _target(
        diverged, 0, diverged == 0)
    checked[f'{prefix}faster_than_{baseline}_retuned_in_{fraction:g}_of_checks'] = _target(
        faster, fraction, faster is not None and faster >= fraction)
  return checked
