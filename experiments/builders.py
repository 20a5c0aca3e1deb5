"""The one place where a config becomes library objects (families, divergence, optimisers).

Every field is checked before anything runs; a bad value fails with a message naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections
import optax

import metamd_jax
from metamd_jax import datasets, models
from metamd_jax.inner_loop import ADJOINTS
from metamd_jax.linear_solve import make_solver
from metamd_jax.objectives import OBJECTIVES
from metamd_jax.tasks import (
    ClassificationFamily,
    LeastSquaresFamily,
    LogisticRegressionFamily,
    TaskFamily,
)

FAMILIES = ('classification', 'least_squares', 'logistic_regression')
MODELS = ('mlp', 'cnn', 'resnet')
SOLVERS = ('exact', 'cg', 'neumann', 'dense')
META_OPTIMIZERS = {
    'adam': optax.adam,
    'adamw': optax.adamw,
    'sgd': optax.sgd,
    'rmsprop': optax.rmsprop,
    'adagrad': optax.adagrad,
    'muon': lambda lr: optax.contrib.muon(lr),
}
BASELINES: dict[str, Callable[[float], optax.GradientTransformation]] = {
    'sgd': optax.sgd,
    'momentum': lambda lr: optax.sgd(lr, momentum=0.9),
    'adam': optax.adam,
    'adagrad': optax.adagrad,
    'rmsprop': optax.rmsprop,
    'muon': lambda lr: optax.contrib.muon(lr),
}


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
    if task.subset_size is not None:
      _positive_int(config, 'task.subset_size')
    if task.eval_dataset:
      _one_of(task.eval_dataset, 'task.eval_dataset', datasets.DATASETS)
    if len(task.classes) != len(task.eval_classes):
      _fail('task.eval_classes', task.eval_classes,
            f'must hold as many classes as config.task.classes ({len(task.classes)}) so the '
            'learned divergence fits the meta-test model')
  else:
    for field in ('input_dim', 'num_samples'):
      _positive_int(config, f'task.{field}')
    _positive_float(config, 'task.condition')
  _one_of(meta.objective, 'meta.objective', OBJECTIVES)
  _one_of(meta.solver, 'meta.solver', SOLVERS)
  _one_of(meta.adjoint, 'meta.adjoint', ADJOINTS)
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
  if not evaluation.learning_rates or not all(
      isinstance(lr, (int, float)) and lr > 0 for lr in evaluation.learning_rates):
    _fail('eval.learning_rates', evaluation.learning_rates, 'must be non-empty and positive')


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


def build_families(config: ml_collections.ConfigDict) -> tuple[TaskFamily, TaskFamily]:
  """``(meta_train_family, meta_test_family)``.

  For classification the meta-test family may use other classes (``task.eval_classes``)
  or another dataset (``task.eval_dataset``); otherwise held-out tasks differ by data
  subset, initialisation and batch order (they are sampled with other keys).
  """
  task = config.task
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


def build_divergence(config: ml_collections.ConfigDict, family: TaskFamily):
  """The initial divergence (SGD with ``meta.init_learning_rate``) for the family's model."""
  meta = config.meta
  return metamd_jax.init_divergence(family.init_params(), meta.init_learning_rate,
                                    structure=meta.structure, eps=meta.eps,
                                    max_factor_size=meta.max_factor_size)


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
