"""The benchmark's configs: each family's and learned variant's config, checked up front.

``configs/benchmark.py`` holds the families (each a full experiment config with a
``heldout`` and a ``targets`` section), the learned variants and the benchmark's own
settings (among them the robustness ``shifts`` and ``robustness_optimizers``);
:func:`validate` checks all of it before anything runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import benchmark_targets, builders
from metamd_jax import datasets
from metamd_jax.tasks import ClassificationFamily

HELDOUT_DATASETS = ('', 'digits28', 'mnist8', 'mnist1d')
_HELDOUT_FITS = {
    # held-out dataset: (what it is, the family datasets whose models it fits)
    'digits28': ("scikit-learn's 8x8 digits resized to 28x28x1",
                 ('mnist_subset', 'mnist_idx', 'fashion_mnist_idx')),
    'mnist8': ('the MNIST subset resized to 8x8x1', ('digits',)),
    'mnist1d': ('MNIST-1D from another generator', ('mnist1d',)),
}
ADAPTIVE = 'metamd_adaptive'
"""Adaptive MetaMD's name: the learned ``metamd`` divergence, its scale calibrated."""
LOW_RANK = 'metamd_low_rank'
"""Frozen MetaMD with each long factor at rank ``eval.frozen_rank`` plus a level
(:func:`metamd_jax.low_rank_metamd`), where a family's config sets it: the cheaper step."""
SHIFTS = tuple(name for name in builders.SHIFTS if name != 'heldout_text')
"""The shifts of :data:`experiments.builders.SHIFTS` a classification family takes."""


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
  if heldout is not None and heldout.dataset:
    what, fits = _HELDOUT_FITS[heldout.dataset]
    if family.task.dataset not in fits:
      raise ValueError(
          f'config.families.{name}.heldout.dataset {heldout.dataset!r} ({what}) fits the '
          f'models of task.dataset {" or ".join(map(repr, fits))}; the family\'s '
          f'task.dataset is {family.task.dataset!r}.')
  benchmark_targets.validate_targets(family, f'config.families.{name}')
  start = family.get('init_from_tuned_sgd', None)
  if start is not None and not isinstance(start, bool):
    raise ValueError(f'config.families.{name}.init_from_tuned_sgd must be True, False or '
                     f'None (the benchmark-wide config.init_from_tuned_sgd), got {start!r}.')
  return family


def init_from_tuned_sgd(config: ml_collections.ConfigDict,
                        family: ml_collections.ConfigDict) -> bool:
  """Whether family ``family`` (from :func:`family_config`) starts meta-training from tuned
  SGD: its own ``init_from_tuned_sgd`` where set, else the benchmark-wide one."""
  start = family.get('init_from_tuned_sgd', None)
  return bool(config.init_from_tuned_sgd if start is None else start)


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


def shift_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The robustness shifts to run (``quick_shifts`` in a quick run)."""
  return tuple(config.quick_shifts if config.quick else config.shifts)


def _validate_shifts(config: ml_collections.ConfigDict, field: str) -> None:
  shifts = config[field]
  if isinstance(shifts, str) or not isinstance(shifts, (tuple, list)):
    raise ValueError(f'config.{field} must be a tuple of shift names from {SHIFTS}, '
                     f'got {shifts!r}.')
  for name in shifts:
    if name not in builders.SHIFTS:
      raise ValueError(f'config.{field} names {name!r}, which is not a shift; the shifts '
                       f'of classification families are {SHIFTS}.')
    if name not in SHIFTS:
      raise ValueError(f'config.{field} names {name!r}, which applies to language-model '
                       f'families only; the benchmark shifts classification families: '
                       f'{SHIFTS}.')
  if len(set(shifts)) != len(shifts):
    raise ValueError(f'config.{field} must not repeat a shift, got {tuple(shifts)!r}.')


def _validate_robustness_optimizers(config: ml_collections.ConfigDict) -> None:
  names = config.robustness_optimizers
  known = (*config.variants, ADAPTIVE, LOW_RANK, *builders.BASELINES)
  if isinstance(names, str) or not isinstance(names, (tuple, list)):
    raise ValueError(f'config.robustness_optimizers must be a tuple of optimiser names '
                     f'from {known}, got {names!r}.')
  for name in names:
    if name not in known:
      raise ValueError(f'config.robustness_optimizers names {name!r}, which is neither a '
                       f'learned variant ({tuple(config.variants)}), {ADAPTIVE!r}, '
                       f'{LOW_RANK!r} nor a '
                       f'baseline ({tuple(builders.BASELINES)}).')


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
    if name == ADAPTIVE:
      raise ValueError(f'config.variant_names names {ADAPTIVE!r}, the name of adaptive '
                       'MetaMD (the metamd variant with a calibrated scale).')
    if name == LOW_RANK:
      raise ValueError(f'config.variant_names names {LOW_RANK!r}, the name of the metamd '
                       'variant at low rank (eval.frozen_rank).')
  if 'metamd' not in config.variant_names:
    raise ValueError("config.variant_names must include 'metamd'.")
  for field in ('num_tasks', 'num_tune_tasks', 'horizon_multiplier', 'timing_repeats'):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'config.{field} must be an integer >= 1, got {value!r}.')
  for field in ('shifts', 'quick_shifts'):
    _validate_shifts(config, field)
  _validate_robustness_optimizers(config)
  for name in family_names(config):
    family = family_config(config, name)
    for variant in config.variant_names:
      variant_config(family, config.variants[variant])


# ---------------------------------------------------------------------------
# Held-out datasets (never seen by meta-training).
# ---------------------------------------------------------------------------


_RESIZED = {'digits28': ('digits', 28), 'mnist8': ('mnist_subset', 8)}


def resized_dataset(name: str, split: str) -> datasets.Dataset:
  """Held-out dataset ``name`` of :data:`_RESIZED`: another dataset's images resized.

  ``'digits28'``: scikit-learn's 8x8 digits resized to 28x28x1, new data that fits an MNIST
  model; ``'mnist8'``: the MNIST subset resized to 8x8x1, new data that fits a digits
  model. Bilinear, antialiased when shrinking (``jax.image.resize``); pixel values stay
  in [0, 1], labels and class count are the source's.
  """
  source, side = _RESIZED[name]
  data = datasets.load_dataset(source, split=split)
  shape = (len(data), side, side, data.x.shape[-1])
  x = jax.image.resize(jnp.asarray(data.x), shape, 'linear')
  return datasets.Dataset(np.asarray(x), data.y, data.num_classes, f'{name}:{split}')


def heldout_family(family: ml_collections.ConfigDict) -> ClassificationFamily | None:
  """The family's held-out-dataset meta-test family (``None`` if it has none)."""
  heldout = family.get('heldout', None)
  if heldout is None or not heldout.dataset or family.task.family != 'classification':
    return None
  if heldout.dataset in _RESIZED:
    train = resized_dataset(heldout.dataset, 'train')
    test = resized_dataset(heldout.dataset, 'test')
  else:
    generator = dict(heldout.generator)
    train = datasets.load_dataset('mnist1d', split='train', **generator)
    test = datasets.load_dataset('mnist1d', split='test', **generator)
  task = family.task
  subset_size = min(task.subset_size or len(train), len(train))
  return ClassificationFamily(train=train, test=test,
                              model=builders.build_model(task, train.num_classes),
                              batch_size=task.batch_size, subset_size=subset_size, l2=task.l2)
