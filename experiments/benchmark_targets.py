"""The benchmark's targets for MetaMD: declared per family in the config, checked here.

A family config's ``targets`` section (``configs/benchmark.py``) switches on any of these
kinds of target, each checked on the mean over the held-out tasks (its key in
``results.json`` in brackets):

- ``steps_at_most_T_over = n`` (0: off): MetaMD's steps to the reference's final loss at
  most ``T / n``, every task reaching it (``steps_to_<reference>_at_most_T_over_<n>``);
- ``seconds_at_most_reference_over = n`` (0: off): MetaMD's seconds to the reference's
  final loss at most the reference's seconds for ``T`` steps over ``n``, every task
  reaching it (``seconds_at_most_<reference>_seconds_over_<n>``);
- ``test_accuracy_at_least_reference = True``: MetaMD's test accuracy at least the
  reference's (``test_accuracy_at_least_<reference>``; classification families only);
- ``fewer_steps_than_every_baseline = True``: for every tuned baseline, MetaMD reaches the
  baseline's final loss in fewer steps than the baseline itself, every task reaching it
  (``fewer_steps_than_<baseline>``).

A result is ``{'value': MetaMD's figure, 'limit': the bound, 'met': bool}``; a figure that
is missing (a baseline that diverged at every learning rate) is ``None`` and not met.
"""

from __future__ import annotations

import math

import ml_collections

NUMBER_FIELDS = ('steps_at_most_T_over', 'seconds_at_most_reference_over')
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
  if targets.get('test_accuracy_at_least_reference', False) \
      and family.task.family != 'classification':
    raise ValueError(f'{field}.targets.test_accuracy_at_least_reference needs a '
                     f'classification family (test accuracy); this one is '
                     f'{family.task.family!r}.')


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
      ``'learned_vs_baselines'``), statistics as ``[mean, std]`` pairs.

  Returns:
    ``{key: {'value', 'limit', 'met'}}`` for every declared target (empty without
    targets or without a ``'metamd'`` run).
  """
  metamd = result['optimizers'].get('metamd')
  if not targets or metamd is None:
    return {}
  horizon, reference = result['horizon'], result['reference']
  versus = result['learned_vs_baselines'].get('metamd', {})
  row = versus.get(reference)  # MetaMD against the reference's final loss
  ref = result['optimizers'].get(reference)
  steps = row['steps'][0] if row else None
  seconds = row['seconds'][0] if row else None
  all_reached = row is not None and row['reached_fraction'] == 1.0
  checked = {}
  over = targets.get('steps_at_most_T_over', 0)
  if over:
    limit = horizon / over
    checked[f'steps_to_{reference}_at_most_T_over_{over:g}'] = _target(
        steps, limit, all_reached and _at_most(steps, limit))
  over = targets.get('seconds_at_most_reference_over', 0)
  if over:
    limit = ref['wall_clock_seconds'][0] / over if ref else None
    checked[f'seconds_at_most_{reference}_seconds_over_{over:g}'] = _target(
        seconds, limit, all_reached and _at_most(seconds, limit))
  if targets.get('test_accuracy_at_least_reference', False):
    value = metamd.get('test_accuracy', [None])[0]
    limit = ref.get('test_accuracy', [None])[0] if ref else None
    checked[f'test_accuracy_at_least_{reference}'] = _target(value, limit,
                                                             _at_most(limit, value))
  if targets.get('fewer_steps_than_every_baseline', False):
    for baseline, versus_row in versus.items():
      value, limit = versus_row['steps'][0], versus_row['baseline_steps'][0]
      met = (versus_row['reached_fraction'] == 1.0 and value is not None
             and limit is not None and value < limit)
      checked[f'fewer_steps_than_{baseline}'] = _target(value, limit, met)
  return checked
