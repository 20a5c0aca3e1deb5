"""The one place where a config becomes library objects (families, divergence, optimisers).

Every field is checked before anything runs; a bad value fails with a message naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import metamd_jax
from experiments import kronecker_baselines
from metamd_jax import calibrated as calibrated_lib
from metamd_jax import datasets, models, text
from metamd_jax.bound import ADJOINTS, resolve_adjoint
from metamd_jax.linear_solve import make_solver
from metamd_jax.objectives import OBJECTIVES
from metamd_jax.tasks import (
    ClassificationFamily,
    LanguageModelFamily,
    LeastSquaresFamily,
    LogisticRegressionFamily,
    TaskFamily,
)

# The calibration record's settings (metamd_jax.calibrated) and the eval fields they come
# from; a field the config lacks takes the record's default (metamd_jax.calibrated.DEFAULTS).
CALIBRATION_FIELDS = {
    'decay': 'adaptive_decay', 'per_leaf': 'adaptive_per_leaf',
    'eigenbasis': 'adaptive_eigenbasis', 'eigenbasis_rank': 'adaptive_eigenbasis_rank',
    'blend_rate': 'adaptive_blend_rate', 'blend_statistics': 'adaptive_blend_statistics',
    'momentum': 'adaptive_momentum', 'online_power': 'adaptive_online_power',
    'max_dimension': 'adaptive_blend_max_dimension',
    'block_size': 'adaptive_blend_block_size', 'sketch_rank': 'adaptive_blend_sketch_rank',
    'sketch_interval': 'adaptive_blend_sketch_interval',
    'lengthen_below': 'adaptive_lengthen_below', 'min_scale': 'adaptive_min_scale',
    'overshoot': 'adaptive_overshoot', 'overshoot_decay': 'adaptive_overshoot_decay',
    'refresh_growth': 'adaptive_refresh_growth', 'overshoot_cap': 'adaptive_overshoot_cap',
    'overshoot_scope': 'adaptive_overshoot_scope', 'restarts': 'adaptive_restarts',
    'restart_growth': 'adaptive_restart_growth', 'restart_shrink': 'adaptive_restart_shrink',
    'restart_momentum': 'adaptive_restart_momentum',
    'restart_step_factor': 'adaptive_restart_step_factor',
    'guard_margin': 'adaptive_guard_margin', 'guard_steps': 'adaptive_guard_steps',
    'guard_progress': 'adaptive_guard_progress', 'guard_prior': 'adaptive_guard_prior',
    'frozen_rank': 'frozen_rank', 'frozen_rank_fill': 'frozen_rank_fill',
}
FAMILIES = ('classification', 'least_squares', 'logistic_regression', 'language_model')
MODELS = ('mlp', 'cnn', 'resnet')  # classification; language models are transformers
SOLVERS = ('exact', 'cg', 'neumann', 'dense')
META_OPTIMIZERS = {
    'adam': optax.adam,
    'adamw': optax.adamw,
    'sgd': optax.sgd,
    'rmsprop': optax.rmsprop,
    'adagrad': optax.adagrad,
    'muon': lambda lr: optax.contrib.muon(lr),
}


def _rate_as_array(make: Callable) -> Callable[[float], optax.GradientTransformation]:
  """``make`` with a numeric learning rate passed as a float32 array.

  As an array the rate is data, not a constant of the compiled program: runs of one
  baseline at two learning rates (a re-tuned one, a grid's) share one compiled program
  (:func:`metamd_jax.evaluation.compile_hoisted`). A traced rate passes through.
  """
  def build(learning_rate):
    if isinstance(learning_rate, (int, float, np.integer, np.floating)):
      learning_rate = jnp.asarray(learning_rate, jnp.float32)
    return make(learning_rate)

  return build


BASELINES: dict[str, Callable[[float], optax.GradientTransformation]] = {
    name: _rate_as_array(make) for name, make in {
        'sgd': optax.sgd,
        'momentum': lambda lr: optax.sgd(lr, momentum=0.9),
        'adam': optax.adam,
        # Decoupled weight decay with the GPT-style second-moment decay (the transformer
        # default).
        'adamw': lambda lr: optax.adamw(lr, b2=0.95, weight_decay=0.1),
        'adagrad': optax.adagrad,
        'rmsprop': optax.rmsprop,
        'muon': lambda lr: optax.contrib.muon(lr),
        # Optional packages, imported on first use (kronecker_baselines.PACKAGES).
        'psgd_kron': kronecker_baselines.psgd_kron,
        'shampoo': kronecker_baselines.shampoo,
    }.items()
}
"""Baseline name -> ``learning_rate -> optax.GradientTransformation`` (a traced rate works)."""


SHIFTS: dict[str, str] = {
    'inputs_x2': 'inputs multiplied by 2',
    'inputs_offset': 'inputs plus 1',
    'inputs_x255': 'inputs multiplied by 255 (pixel values left as bytes, 0 to 255)',
    'inputs_div255': 'inputs divided by 255 (images in [0, 1] divided by 255 again)',
    'inputs_standardised': 'inputs standardised per feature over the training pool',
    'features_permuted': 'input features in a fixed random order',
    'batch_quarter': 'a quarter of the batch size',
    'batch_x4': 'four times the batch size (at most the task subset)',
    'label_noise': 'a fifth of the training labels replaced by random classes',
    'heldout_text': 'the held-out text task.eval_text (a dataset never seen in meta-training)',
}
"""The changes of ``eval.shifts`` (:func:`shifted_family`), with descriptions."""

LABEL_NOISE = 0.2
"""Fraction of training-pool labels ``'label_noise'`` replaces (with uniform random classes)."""

LANGUAGE_MODEL_SHIFTS = ('batch_quarter', 'batch_x4', 'heldout_text')
"""The shifts that apply to a language-model family (the others change image inputs)."""


def _fail(field: str, value, requirement: str):
  raise ValueError(f'config.{field} {requirement}, got {value!r}.')


def _positive_int(config, field: str, minimum: int = 1):
  value = config
  for part in field.split('.'):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(field, value, f'must be an integer >= {minimum}')


def _positive_float(config, field: str):
  value = config
  for part in field.split('.'):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      math.isfinite(value) and value > 0):
    _fail(field, value, 'must be a positive finite number')


def _one_of(value, field: str, choices):
  if value not in choices:
    _fail(field, value, f'must be one of {tuple(choices)}')


def num_validation_tasks(evaluation: ml_collections.ConfigDict) -> int:
  """How many validation tasks :mod:`experiments.choose_variant` and
  :mod:`experiments.sweep` choose on: ``eval.num_validation_tasks``, or ``eval.num_tasks``
  where that is 0 or absent."""
  return evaluation.get('num_validation_tasks', 0) or evaluation.num_tasks


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Check every field the launches use; raise ``ValueError`` naming the first bad one."""
  for section in ('task', 'meta', 'eval'):
    if section not in config:
      raise ValueError(f'config.{section} is missing.')
  task, meta, evaluation = config.task, config.meta, config.eval
  _one_of(task.family, 'task.family', FAMILIES)
  _positive_int(config, 'task.batch_size')
  if task.family == 'classification':
    _one_of(task.dataset, 'task.dataset', datasets.DATASETS)
    _one_of(task.model, 'task.model', MODELS)
    field = 'hidden_sizes' if task.model == 'mlp' else 'channels'
    sizes = task.get(field)
    if isinstance(sizes, str) or not isinstance(sizes, (tuple, list)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes) or (
            task.model == 'resnet' and not sizes):
      _fail(f'task.{field}', sizes, f'must be a tuple of positive ints (the {task.model}\'s '
            f'{"widths" if task.model == "mlp" else "channels"}'
            f'{", at least one" if task.model == "resnet" else ""})')
    if task.subset_size is not None:
      _positive_int(config, 'task.subset_size')
    if task.eval_dataset:
      _one_of(task.eval_dataset, 'task.eval_dataset', datasets.DATASETS)
    if len(task.classes) != len(task.eval_classes):
      _fail('task.eval_classes', task.eval_classes,
            f'must hold as many classes as config.task.classes ({len(task.classes)}) so the '
            'learned divergence fits the meta-test model')
  elif task.family == 'language_model':
    _validate_language_model(task)
  else:
    for field in ('input_dim', 'num_samples'):
      _positive_int(config, f'task.{field}')
    _positive_float(config, 'task.condition')
  _one_of(meta.objective, 'meta.objective', OBJECTIVES)
  _one_of(meta.solver, 'meta.solver', SOLVERS)
  _one_of(meta.adjoint, 'meta.adjoint', ADJOINTS)
  try:
    resolve_adjoint(meta.adjoint, meta.solver)
  except ValueError as error:
    raise ValueError(f'config.meta.adjoint and config.meta.solver: {error}') from None
  _one_of(meta.structure, 'meta.structure', metamd_jax.divergence.STRUCTURES)
  _one_of(meta.optimizer, 'meta.optimizer', META_OPTIMIZERS)
  _one_of(meta.schedule, 'meta.schedule', ('constant', 'cosine'))
  _one_of(meta.select, 'meta.select', ('best', 'last'))
  if isinstance(meta.score_decay, bool) or not isinstance(meta.score_decay, (int, float)) \
      or not 0 <= meta.score_decay < 1:
    _fail('meta.score_decay', meta.score_decay, 'must be a number in [0, 1)')
  _positive_int(config, 'meta.horizon')
  _positive_int(config, 'meta.meta_batch_size')
  _positive_int(config, 'meta.num_devices', minimum=0)
  _positive_int(config, 'meta.num_meta_steps', minimum=0)
  _positive_int(config, 'meta.checkpoint_every')
  _positive_int(config, 'meta.max_factor_size')
  for field in ('meta.learning_rate', 'meta.init_learning_rate', 'meta.eps'):
    _positive_float(config, field)
  if meta.grad_clip is not None:
    _positive_float(config, 'meta.grad_clip')
  _positive_int(config, 'eval.num_tasks')
  _positive_int(config, 'eval.num_tune_tasks')
  _positive_int(config, 'eval.num_steps')
  _positive_int(config, 'eval.window')
  for name in evaluation.baselines:
    _one_of(name, 'eval.baselines', BASELINES)
    package = kronecker_baselines.missing_package(name)
    if package is not None:
      raise ValueError(f'config.eval.baselines names {name!r}, which needs the package '
                       f'{package}: {kronecker_baselines.INSTALL}.')
  if evaluation.baselines:  # without baselines the comparison's reference is MetaMD
    _one_of(evaluation.reference, 'eval.reference', evaluation.baselines)
  _positive_int(config, 'eval.track_every')
  if evaluation.num_steps % evaluation.track_every:
    _fail('eval.track_every', evaluation.track_every,
          f'must divide eval.num_steps ({evaluation.num_steps})')
  if not isinstance(evaluation.time_steps, bool):
    _fail('eval.time_steps', evaluation.time_steps, 'must be True or False')
  for field in ('seconds_check', 'accuracy_check'):
    if not isinstance(evaluation.get(field, False), bool):
      _fail(f'eval.{field}', evaluation[field], 'must be True or False')
  _positive_int(config, 'eval.horizon_multiplier', minimum=0)
  fraction = evaluation.get('seconds_check_fraction', 1.0)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0 < fraction <= 1):
    _fail('eval.seconds_check_fraction', fraction, 'must be a number in (0, 1]')
  if 'num_validation_tasks' in evaluation:
    _positive_int(config, 'eval.num_validation_tasks', minimum=0)
  if not evaluation.learning_rates or not all(
      isinstance(lr, (int, float)) and lr > 0 for lr in evaluation.learning_rates):
    _fail('eval.learning_rates', evaluation.learning_rates, 'must be non-empty and positive')
  if not isinstance(evaluation.adaptive, bool):
    _fail('eval.adaptive', evaluation.adaptive, 'must be True or False')
  # Each run-time setting's range: the calibration record's rules (metamd_jax.calibrated),
  # then what a config's settings need of each other.
  for name, field in CALIBRATION_FIELDS.items():
    value = evaluation.get(field, calibrated_lib.DEFAULTS.get(name))
    requirement = calibrated_lib.setting_requirement(name, value)
    if requirement is not None:
      _fail(f'eval.{field}', value, requirement)
  eigenbasis = evaluation.get('adaptive_eigenbasis', False)
  if eigenbasis and not evaluation.adaptive_per_leaf:
    _fail('eval.adaptive_eigenbasis', eigenbasis, 'needs eval.adaptive_per_leaf=True')
  restarts = evaluation.get('adaptive_restarts', False)
  for name, meaning in (('adaptive_restart_growth', 'the online half'),
                        ('adaptive_restart_shrink', 'the learned half')):
    power = evaluation.get(name, 0.0)
    if power > 0 and not restarts:
      _fail(f'eval.{name}', power,
            f'needs eval.adaptive_restarts = True ({meaning} changes from one restarted '
            'epoch to the next)')
  later_momentum = evaluation.get('adaptive_restart_momentum', None)
  if later_momentum is not None:
    if not restarts:
      _fail('eval.adaptive_restart_momentum', later_momentum,
            'needs eval.adaptive_restarts = True (the momentum of the restarted epochs '
            'longer than the horizon)')
    if not evaluation.get('adaptive_momentum', 0.0) > 0:
      _fail('eval.adaptive_restart_momentum', later_momentum,
            'needs eval.adaptive_momentum > 0 (the first epochs\' momentum, which the '
            'later epochs replace)')
  later_step_factor = evaluation.get('adaptive_restart_step_factor', 0.5)
  if later_momentum is None and later_step_factor != 0.5:
    _fail('eval.adaptive_restart_step_factor', later_step_factor,
          'needs eval.adaptive_restart_momentum (the factor goes with that momentum)')
  guard_margin = evaluation.get('adaptive_guard_margin', None)
  guard_progress = evaluation.get('adaptive_guard_progress', None)
  if guard_progress is not None and (
      guard_margin is None or evaluation.get('adaptive_guard_steps', None) is None):
    _fail('eval.adaptive_guard_progress', guard_progress,
          'needs eval.adaptive_guard_margin and eval.adaptive_guard_steps (the steps '
          'before progress is checked)')
  guard_prior = evaluation.get('adaptive_guard_prior', False)
  if guard_prior and (guard_margin is None
                      or evaluation.get('adaptive_blend_statistics', 'sum') != 'kronecker'
                      or not evaluation.get('adaptive_blend_rate', 0.0)):
    _fail('eval.adaptive_guard_prior', guard_prior,
          "needs eval.adaptive_guard_margin (the guard), eval.adaptive_blend_statistics = "
          "'kronecker' and a positive eval.adaptive_blend_rate (the statistics it starts)")
  if evaluation.get('adaptive_blend_sketch_rank', 0) and \
      evaluation.get('adaptive_blend_block_size', 0):
    _fail('eval.adaptive_blend_sketch_rank', evaluation.adaptive_blend_sketch_rank,
          'must be 0 when eval.adaptive_blend_block_size is set (two ways to cheapen a '
          'long side: set one)')
  quantile = evaluation.adaptive_quantile
  if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) \
      or not 0 < quantile <= 1:
    _fail('eval.adaptive_quantile', quantile, 'must be a number in (0, 1]')
  shifts = evaluation.shifts
  if isinstance(shifts, str) or not isinstance(shifts, (tuple, list)):
    _fail('eval.shifts', shifts, f'must be a tuple of names from {tuple(SHIFTS)}')
  for name in shifts:
    _one_of(name, 'eval.shifts', SHIFTS)
    if task.family == 'language_model' and name not in LANGUAGE_MODEL_SHIFTS:
      _fail('eval.shifts', shifts, f'must name only {LANGUAGE_MODEL_SHIFTS} for a language '
            f'model ({name!r} changes image inputs)')
    if task.family != 'language_model' and name == 'heldout_text':
      _fail('eval.shifts', shifts, "may name 'heldout_text' only for task.family "
            "'language_model'")
    if name == 'heldout_text' and not task.eval_text:
      _fail('task.eval_text', task.eval_text, "must name a text for eval.shifts "
            "'heldout_text'")
  if len(set(shifts)) != len(shifts):
    _fail('eval.shifts', shifts, 'must not repeat a shift')


def _validate_language_model(task) -> None:
  for field in ('text', 'eval_text', 'model', 'context', 'width', 'depth', 'num_heads',
                'slice_size', 'eval_windows', 'test_windows'):
    if field not in task:
      raise ValueError(f'config.task.{field} is missing (language_model family; see '
                       'configs/transformer_lm.py).')
  _one_of(task.text, 'task.text', text.TEXTS)
  if task.eval_text:
    _one_of(task.eval_text, 'task.eval_text', text.TEXTS)
  if 'text_file' in (task.text, task.eval_text) and not task.data_dir:
    _fail('task.data_dir', task.data_dir, "must name a .txt file (or a directory with one) "
          "for the text 'text_file'")
  _one_of(task.model, 'task.model', ('transformer',))
  for field in ('context', 'width', 'depth', 'num_heads', 'slice_size', 'eval_windows',
                'test_windows'):
    _positive_int({'task': task}, f'task.{field}')
  if task.width % task.num_heads:
    _fail('task.num_heads', task.num_heads, f'must divide task.width ({task.width})')
  if task.slice_size < task.context + 1:
    _fail('task.slice_size', task.slice_size,
          f'must be at least task.context + 1 ({task.context + 1})')
  if 'text_block_size' in task:
    _positive_int({'task': task}, 'task.text_block_size', minimum=0)


def _load(task, name: str, split: str) -> datasets.Dataset:
  return datasets.load_dataset(name, data_dir=task.data_dir or None, split=split)


def build_model(task, num_classes: int):
  if task.model == 'mlp':
    return models.MLP(hidden_sizes=tuple(task.hidden_sizes), num_classes=num_classes)
  if task.model == 'cnn':
    return models.CNN(channels=tuple(task.channels), num_classes=num_classes)
  return models.ResNet(stage_channels=tuple(task.channels), num_classes=num_classes)


def _classification_family(task, dataset_name: str, classes) -> ClassificationFamily:
  train, test = _load(task, dataset_name, 'train'), _load(task, dataset_name, 'test')
  if classes:
    train = datasets.split_by_class(train, tuple(classes))
    test = datasets.split_by_class(test, tuple(classes))
  return ClassificationFamily(train=train, test=test,
                              model=build_model(task, train.num_classes),
                              batch_size=task.batch_size, subset_size=task.subset_size,
                              l2=task.l2)


def build_transformer(task) -> models.TransformerLM:
  return models.TransformerLM(vocab_size=text.Text.vocab_size, context=task.context,
                              width=task.width, depth=task.depth, num_heads=task.num_heads)


def language_model_family(task, name: str, region: str) -> LanguageModelFamily:
  """Tasks on slices of region ``region`` of text ``name``, evaluated on its test region.

  Regions are those of :func:`metamd_jax.text.split_text` (contiguous, or interleaved
  blocks of ``task.text_block_size`` bytes): meta-training slices come from ``'train'``,
  held-out tasks' slices from ``'heldout'``, test bits per byte from ``'test'``.
  """
  whole = text.load_text(name, data_dir=task.data_dir or None)
  block_size = task.get('text_block_size', 0)
  try:
    regions = text.split_text(whole, block_size)
  except ValueError as error:
    raise ValueError(f'config.task.text_block_size {block_size}: {error} (0: contiguous '
                     'regions)') from None
  return LanguageModelFamily(train=regions[region], test=regions['test'],
                             model=build_transformer(task), batch_size=task.batch_size,
                             context=task.context, slice_size=task.slice_size,
                             eval_windows=task.eval_windows, test_windows=task.test_windows,
                             dimension_numbers=models.transformer_axes)


def build_families(config: ml_collections.ConfigDict) -> tuple[TaskFamily, TaskFamily]:
  """``(meta_train_family, meta_test_family)``.

  For classification the meta-test family may use other classes (``task.eval_classes``)
  or another dataset (``task.eval_dataset``); for a language model, held-out tasks train
  on slices of text meta-training never sees (the ``'heldout'`` region of ``task.text``);
  otherwise held-out tasks differ by data subset, initialisation and batch order (they
  are sampled with other keys).
  """
  task = config.task
  if task.family == 'language_model':
    return (language_model_family(task, task.text, 'train'),
            language_model_family(task, task.text, 'heldout'))
  if task.family == 'classification':
    meta_train = _classification_family(task, task.dataset, task.classes)
    if task.eval_dataset or tuple(task.eval_classes) != tuple(task.classes):
      meta_test = _classification_family(task, task.eval_dataset or task.dataset,
                                         task.eval_classes)
    else:
      meta_test = meta_train
    return meta_train, meta_test
  if task.family == 'least_squares':
    family = LeastSquaresFamily(input_dim=task.input_dim, output_dim=task.output_dim,
                                num_samples=task.num_samples, batch_size=task.batch_size,
                                condition=task.condition, noise=task.noise, seed=task.seed)
  else:
    family = LogisticRegressionFamily(input_dim=task.input_dim, num_classes=task.num_classes,
                                      num_samples=task.num_samples,
                                      batch_size=task.batch_size, condition=task.condition,
                                      seed=task.seed)
  return family, family


def feature_permutation(config: ml_collections.ConfigDict, num_features: int) -> np.ndarray:
  """The fixed permutation of ``'features_permuted'``: a function of ``config.seed`` only."""
  return np.random.default_rng(config.seed).permutation(num_features)


def _standardise(family: ClassificationFamily):
  """Per-feature ``(x - mean) / std`` over the family's training pool (constant: 0)."""
  x = family.train.x.astype(np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0)
  std = np.where(std > 0, std, 1.0)  # a constant feature becomes x - mean = 0
  return lambda data: ((data - mean) / std).astype(np.float32)


def applicable_shifts(family: TaskFamily, shifts) -> tuple[str, ...]:
  """The names of ``shifts`` that :func:`shifted_family` can apply to ``family``.

  Classification families take every shift but ``'heldout_text'``, language models
  :data:`LANGUAGE_MODEL_SHIFTS`, other families (the convex ones) none.
  """
  if isinstance(family, LanguageModelFamily):
    return tuple(s for s in shifts if s in LANGUAGE_MODEL_SHIFTS)
  if isinstance(family, ClassificationFamily):
    return tuple(s for s in shifts if s != 'heldout_text')
  return ()


def _shifted_language_model(config: ml_collections.ConfigDict, family: LanguageModelFamily,
                            shift: str, role: str) -> LanguageModelFamily:
  if shift == 'heldout_text':  # tasks on the held-out text; its test region for metrics
    region = 'train' if role == 'meta_train' else 'heldout'
    return language_model_family(config.task, config.task.eval_text, region)
  batch_size = (max(1, family.batch_size // 4) if shift == 'batch_quarter'
                else 4 * family.batch_size)
  return LanguageModelFamily(train=family.train, test=family.test, model=family.model,
                             batch_size=batch_size, context=family.context,
                             slice_size=family.slice_size, eval_windows=family.eval_windows,
                             test_windows=family.test_windows,
                             dimension_numbers=family.dimension_numbers)


def shifted_family(config: ml_collections.ConfigDict, family: TaskFamily,
                   shift: str, role: str = 'meta_test') -> TaskFamily:
  """``family`` under one everyday change of :data:`SHIFTS`, same model and tasks.

  The inputs of the training pool and of the test set change alike (or the batch size
  does); task parameters (keys and subset indices) mean the same tasks as in ``family``.

  * ``'inputs_x2'``: every input times 2;
  * ``'inputs_standardised'``: per feature, mean 0 and std 1 over the training pool
    (constant features become 0), the test set with the pool's statistics;
  * ``'features_permuted'``: the input features (flattened) in the order of
    :func:`feature_permutation`, the same for every task and for the test set;
  * ``'inputs_offset'``: every input plus 1;
  * ``'inputs_x255'``: every input times 255 (images in [0, 1] as the bytes they were read
    from: a preprocessing step forgotten);
  * ``'inputs_div255'``: every input divided by 255 (images already in [0, 1] divided
    again: a preprocessing step done twice);
  * ``'batch_quarter'``: ``max(1, batch_size // 4)``;
  * ``'batch_x4'``: ``min(subset_size, 4 * batch_size)``;
  * ``'label_noise'``: each training-pool label, with probability :data:`LABEL_NOISE`,
    replaced by a uniformly random class (fixed by ``config.seed``); test labels clean.

  A language-model family (:data:`LANGUAGE_MODEL_SHIFTS`) takes the batch sizes and
  ``'heldout_text'``: tasks on ``task.eval_text`` instead, slices of its ``'train'``
  region for ``role='meta_train'`` (tuning) and of its ``'heldout'`` region for
  ``role='meta_test'``, test metrics on its ``'test'`` region.

  Args:
    config: the experiment config (its ``seed`` fixes the permutation).
    family: a classification or language-model family from :func:`build_families`.
    shift: a name of :data:`SHIFTS`.
    role: ``'meta_train'`` or ``'meta_test'``, which family of the pair ``family`` is.

  Returns:
    A new family of the same kind.

  Raises:
    ValueError: on an unknown shift, or one that does not apply to the family.
  """
  if shift not in SHIFTS:
    raise ValueError(f'shift must be one of {tuple(SHIFTS)}, got {shift!r}.')
  if role not in ('meta_train', 'meta_test'):
    raise ValueError(f"role must be 'meta_train' or 'meta_test', got {role!r}.")
  if isinstance(family, LanguageModelFamily):
    if shift not in LANGUAGE_MODEL_SHIFTS:
      raise ValueError(f'shift {shift!r} changes image inputs; a language model takes '
                       f'{LANGUAGE_MODEL_SHIFTS}.')
    return _shifted_language_model(config, family, shift, role)
  if shift == 'heldout_text':
    raise ValueError("shift 'heldout_text' applies to language-model families only.")
  if not isinstance(family, ClassificationFamily):
    raise ValueError(f'shifts apply to classification families, got {type(family).__name__}.')
  train, test, batch_size = family.train, family.test, family.batch_size
  transform = None
  if shift == 'inputs_x2':
    transform = lambda x: 2 * x  # noqa: E731
  elif shift == 'inputs_offset':
    transform = lambda x: x + 1  # noqa: E731
  elif shift == 'inputs_x255':
    transform = lambda x: 255 * x  # noqa: E731
  elif shift == 'inputs_div255':
    transform = lambda x: x / 255  # noqa: E731
  elif shift == 'inputs_standardised':
    transform = _standardise(family)
  elif shift == 'features_permuted':
    permutation = feature_permutation(config, math.prod(family.input_shape))
    transform = lambda x: x.reshape(len(x), -1)[:, permutation].reshape(x.shape)  # noqa: E731
  elif shift == 'batch_quarter':
    batch_size = max(1, batch_size // 4)
  elif shift == 'batch_x4':
    batch_size = min(family.subset_size, 4 * batch_size)
  elif shift == 'label_noise':
    rng = np.random.default_rng(config.seed)
    flip = rng.random(len(train)) < LABEL_NOISE
    noisy = np.where(flip, rng.integers(0, train.num_classes, len(train)), train.y)
    train = dataclasses.replace(train, y=noisy.astype(np.int32), name=f'{train.name}:{shift}')

  def apply(data):
    if data is None or transform is None:
      return data
    return dataclasses.replace(data, x=transform(data.x), name=f'{data.name}:{shift}')

  return ClassificationFamily(train=apply(train), test=apply(test),
                              model=family.model, batch_size=batch_size,
                              subset_size=family.subset_size, l2=family.l2,
                              eval_batch_size=family.eval_batch_size)


def build_divergence(config: ml_collections.ConfigDict, family: TaskFamily):
  """The initial divergence (SGD with ``meta.init_learning_rate``) for the family's model."""
  meta = config.meta
  return metamd_jax.init_divergence(family.param_shapes(), meta.init_learning_rate,
                                    structure=meta.structure, eps=meta.eps,
                                    max_factor_size=meta.max_factor_size,
                                    dimension_numbers=family.dimension_numbers)


def build_meta_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  meta = config.meta
  learning_rate = meta.learning_rate
  if meta.schedule == 'cosine':
    learning_rate = optax.cosine_decay_schedule(meta.learning_rate,
                                                max(meta.num_meta_steps, 1), alpha=0.1)
  optimizer = META_OPTIMIZERS[meta.optimizer](learning_rate)
  if meta.grad_clip is not None:
    optimizer = optax.chain(optax.clip_by_global_norm(meta.grad_clip), optimizer)
  return optimizer


def build_solver_options(config: ml_collections.ConfigDict) -> dict:
  options = dict(config.meta.solver_options or {})
  make_solver(config.meta.solver, **options)  # fails early on bad options
  return options
