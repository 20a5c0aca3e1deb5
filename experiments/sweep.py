"""Choose a config value on validation tasks, never on the held-out test tasks.

  python -m experiments.sweep --config configs/default.py --workdir runs/sweep_eps \
      --field=meta.eps --values=0.001,0.01,0.1,0.3

For each value of one numeric config field (e.g. the eigenvalue floor ``meta.eps`` or
``meta.learning_rate``) the config is meta-trained in ``<workdir>/<field>=<value>``
(:func:`experiments.meta_train.meta_train`, so a rerun resumes) and its learned divergence
trains the *validation tasks*: :func:`metamd_jax.evaluation.tuning_tasks` of the
meta-train family, ``eval.num_validation_tasks`` of them
(:func:`experiments.builders.num_validation_tasks`). Those are meta-train tasks with keys that
neither meta-training nor the held-out tasks use, the tasks the baselines are tuned on.
Nothing here touches the held-out tasks or the test split:

* ``final_train_loss``: the loss on each task's whole training subset after
  ``eval.num_steps`` steps;
* ``steps_to_reference``: steps to the final loss of the config's reference
  (``eval.reference``: Adam in the default config, AdamW for the transformer) tuned on the
  same tasks;
* ``validation_accuracy`` (classification): accuracy on the examples of the training pool
  outside the task's own subset, which the task never trains on.

The chosen value is the one with the highest mean validation accuracy (the lowest mean
final training loss for families without accuracy); ties go to the first value listed.

With ``--rule=robustness`` the value is chosen for the learned optimiser the config
meta-tests instead (adaptive MetaMD with the config's own ``eval.adaptive_*`` settings),
by the rule of :mod:`experiments.choose_variant` on the same validation tasks as they are
and under each of ``eval.shifts``: fewest runs diverged or ended above their start, then
the most checks won (faster than the re-tuned reference; in seconds and in test accuracy with
``eval.seconds_check`` and ``eval.accuracy_check``), then, with ``eval.seconds_check``,
the values within twice the fastest one's time to the reference's loss, then the lowest
geometric mean of the final loss over the re-tuned reference's
(:func:`experiments.choose_variant.compare` with the candidate ``'config'`` on each
value's divergence; ties go to the first value listed).
Writes ``sweep.json`` and prints a markdown table.
"""

from __future__ import annotations

import math
import os
import pathlib

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import metamd_jax  # noqa: E402
from experiments import builders, choose_variant, cli, protocol, report  # noqa: E402
from experiments import meta_train as meta_train_exp  # noqa: E402
from metamd_jax import evaluation  # noqa: E402
from metamd_jax.tasks import ClassificationFamily  # noqa: E402
from metamd_jax.tasks.base import TaskFamily  # noqa: E402
from metamd_jax.types import PyTree  # noqa: E402

RULES = ('accuracy', 'robustness')


def parse_values(text: str) -> list[float]:
  """``'0.001,0.1'`` -> ``[0.001, 0.1]``; a clear error on anything else."""
  try:
    values = [float(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise ValueError(f'--values must be comma-separated numbers, got {text!r}.') from None
  if not values or not all(math.isfinite(v) for v in values):
    raise ValueError(f'--values must be finite numbers, at least one, got {text!r}.')
  if len(set(values)) != len(values):
    raise ValueError(f'--values must not repeat a value, got {text!r}.')
  return values


def with_value(config: ml_collections.ConfigDict, field: str, value: float
               ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the numeric ``field`` (``'section.name'``) set to ``value``."""
  config = config.copy_and_resolve_references()
  *sections, name = field.split('.')
  node = config
  for part in sections:
    if part not in node:
      raise ValueError(f'--field {field!r}: config has no section {part!r}.')
    node = node[part]
  if name not in node:
    raise ValueError(f'--field {field!r}: config.{".".join(sections)} has no field {name!r}.')
  current = node[name]
  if isinstance(current, bool) or not isinstance(current, (int, float)):
    raise ValueError(f'--field {field!r} must name a numeric field, it holds {current!r}.')
  node[name] = int(value) if isinstance(current, int) and float(value).is_integer() else value
  builders.validate_config(config)
  return config


def validation_run(optimizer, family: TaskFamily, task_params: PyTree, num_steps: int
                   ) -> evaluation.Curves:
  """:func:`metamd_jax.evaluation.run` with the whole-set loss tracked every step and,
  for a classification family, ``'validation_accuracy'`` among the metrics: accuracy on
  the training-pool examples outside each task's subset.
  """
  if not isinstance(family, ClassificationFamily) or family.subset_size == len(family.train):
    return evaluation.run(optimizer, family, task_params, num_steps, track_every=1)
  x, y = jnp.asarray(family.train.x), jnp.asarray(family.train.y)

  def validation_accuracy(tp, params):
    correct = jnp.argmax(family.logits(params, x), axis=-1) == y
    outside = jnp.ones(len(y), bool).at[tp['subset']].set(False)
    return {'validation_accuracy': jnp.sum(correct & outside) / jnp.sum(outside)}

  return evaluation.run(optimizer, family, task_params, num_steps, track_every=1,
                        extra_metrics=validation_accuracy)


def _workdir_name(field: str, value: float) -> str:
  """The folder of one value's meta-training in a sweep's workdir."""
  return f'{field}={value:g}'


def sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike, field: str,
          values: list[float], *, rule: str = 'accuracy', progress: bool = True) -> dict:
  """Meta-train one config per value of ``field``; compare them on validation tasks.

  Args:
    rule: ``'accuracy'`` (frozen MetaMD's validation accuracy, or final loss) or
      ``'robustness'`` (the config's adaptive MetaMD under ``eval.shifts``, the rule of
      :mod:`experiments.choose_variant`).

  Returns:
    ``{'field', 'values', 'reference', 'reference_learning_rate', 'num_tasks',
    'chosen', 'criterion', 'rows': {value: {'final_train_loss', 'steps_to_reference',
    'reached_fraction', 'validation_accuracy', 'dropped_tasks', 'best_meta_step'}}}``,
    statistics as ``[mean, std]`` over the validation tasks; with ``rule='robustness'``
    each row also has ``'robustness'`` (the rule's score) and ``'checks'`` (and, with
    ``eval.seconds_check``, ``'in_distribution_seconds'``).
  """
  if rule not in RULES:
    raise ValueError(f'rule must be one of {RULES}, got {rule!r}.')
  workdir = pathlib.Path(workdir)
  configs = {value: with_value(config, field, value) for value in values}  # all checked first
  names = [_workdir_name(field, value) for value in values]
  if len(set(names)) != len(names):
    raise ValueError(f'values {list(values)} of {field} name the same workdirs {names}: '
                     'give values that differ in 6 significant digits.')
  ev = config.eval
  family, _ = builders.build_families(config)
  num_tasks = builders.num_validation_tasks(ev)
  tasks = evaluation.tuning_tasks(family, config.seed, num_tasks)
  reference = ev.reference  # the checks' reference too (experiments.choose_variant)
  tuned, _ = protocol.tune_baselines((reference,), ev, family, tasks, ev.num_steps)
  target = None
  if tuned[reference] is not None:
    curves = evaluation.run(builders.BASELINES[reference](tuned[reference]), family, tasks,
                            ev.num_steps, track_every=1)
    target = evaluation.final_train_loss(curves.train_losses)
  rows = {}
  for value, value_config in configs.items():
    value_workdir = workdir / _workdir_name(field, value)
    result = meta_train_exp.meta_train(value_config, value_workdir, progress=progress)
    curves = validation_run(metamd_jax.metamd(result.divergence), family, tasks, ev.num_steps)
    row = {'final_train_loss': report.pair(evaluation.final_train_loss(curves.train_losses)),
           'dropped_tasks': int(result.state.dropped_tasks),
           'best_meta_step': int(result.state.best_step)}
    if target is not None:
      reached = protocol.reach(curves, target)
      row.update(steps_to_reference=reached['steps'],
                 reached_fraction=reached['reached_fraction'])
    if 'validation_accuracy' in curves.metrics:
      row['validation_accuracy'] = report.pair(curves.metrics['validation_accuracy'])
    if rule == 'robustness':
      compared = choose_variant.compare(value_config, value_workdir, result.divergence,
                                        candidates=(choose_variant.OWN,))
      if choose_variant.OWN not in compared['scores']:  # calibration failed: never chosen
        raise ValueError(f'{field}={value:g}: adaptive MetaMD could not be calibrated.')
      row['robustness'] = compared['scores'][choose_variant.OWN]
      row['checks'] = compared['checks']
      if choose_variant.SECONDS in compared:  # eval.seconds_check: the check in seconds
        row[choose_variant.SECONDS] = compared[choose_variant.SECONDS]
    rows[f'{value:g}'] = row
  if rule == 'robustness':
    chosen = choose_variant.choose({key: row['robustness'] for key, row in rows.items()})
    return {'field': field, 'values': [f'{v:g}' for v in values], 'reference': reference,
            'reference_learning_rate': tuned[reference], 'num_tasks': num_tasks,
            'tasks': 'validation: meta-train tuning tasks (evaluation.tuning_tasks)',
            'criterion': 'robustness', 'chosen': chosen, 'rows': rows}
  criterion = ('validation_accuracy' if all('validation_accuracy' in r for r in rows.values())
               else 'final_train_loss')
  sign = 1 if criterion == 'validation_accuracy' else -1

  def score(key):
    mean = rows[key][criterion][0]
    return -math.inf if mean is None else sign * mean

  chosen = max(rows, key=score)  # max keeps the first of equal scores
  return {'field': field, 'values': [f'{v:g}' for v in values], 'reference': reference,
          'reference_learning_rate': tuned[reference], 'num_tasks': num_tasks,
          'tasks': 'validation: meta-train tuning tasks (evaluation.tuning_tasks)',
          'criterion': criterion, 'chosen': chosen, 'rows': rows}


def format_sweep(result: dict) -> str:
  """The markdown table of :func:`sweep`'s result."""
  lines = [f"{result['field']} on {result['num_tasks']} validation tasks (meta-train tasks "
           f"never used in meta-training or meta-testing); chosen by {result['criterion']}: "
           f"{result['chosen']}.", '',
           f"| {result['field']} | final train loss | steps to {result['reference']} final "
           'loss | validation accuracy | dropped inner runs | kept meta-step |',
           '| --- | --- | --- | --- | --- | --- |']
  for value, row in result['rows'].items():
    # 'steps_to_adam': results written before the reference followed eval.reference.
    reached = row.get('steps_to_reference', row.get('steps_to_adam'))
    steps = 'n/a' if reached is None else report.reach_text(reached, row['reached_fraction'])
    lines.append(f"| {value} | {report.pair_text(row['final_train_loss'], '.4f')} | {steps} | "
                 f"{report.pair_text(row.get('validation_accuracy'), '.3f')} | "
                 f"{row['dropped_tasks']} | {row['best_meta_step']} |")
  if result['criterion'] == 'robustness':
    lines += ['', "The config's adaptive MetaMD under the checks (the rule of "
              "experiments.choose_variant; the table above is frozen MetaMD's):", '',
              f"| {result['field']} | runs diverged or ended above their start where "
              f"{result['reference']} trains | "
              f"faster than {result['reference']} re-tuned | final loss / re-tuned "
              f"{result['reference']} (geometric mean) |", '| --- | --- | --- | --- |']
    for value, row in result['rows'].items():
      score = row['robustness']
      faster = ', '.join(score['faster']) or 'none'
      lines.append(f"| {value} | {choose_variant.failed_runs(score)} | {score['num_faster']} of "
                   f"{score['num_checks']} ({faster}) | "
                   f"{report.number_text(score['loss_ratio_geometric_mean'])} |")
  return '\n'.join(lines)


def main(argv):
  flag_values = cli.start(argv)
  result = sweep(flag_values.config, flag_values.workdir, flag_values.field,
                 parse_values(flag_values['values'].value), rule=flag_values.rule)
  report.write_result(flag_values.workdir, 'sweep', result, format_sweep(result))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Directory for the sub-runs and the results.')
  flags.DEFINE_string('field', 'meta.eps', 'The numeric config field to sweep.')
  flags.DEFINE_string('values', None, 'Comma-separated values of the field.')
  flags.DEFINE_enum('rule', 'accuracy', RULES, "How the value is chosen: frozen MetaMD's "
                    "validation accuracy, or the config's adaptive MetaMD under eval.shifts "
                    '(the rule of experiments.choose_variant).')
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['workdir', 'values'])
  app.run(main)
