"""Online Kronecker preconditioners from other packages, as tuned baselines.

A user who wants a Kronecker-factored preconditioner without meta-learning one would pick
PSGD-Kron (``psgdax``) or Shampoo (``precondition-opt``). Both are optional
(``pip install -e '.[benchmark]'``): each is imported when its factory is first called,
so the library and the other baselines work without them, and
:func:`missing_package` lets config validation fail early with the install command.

Each factory takes only the learning rate, like every entry of
``experiments.builders.BASELINES``; everything else is the package's recommended default
unless said otherwise below. The learning rate may be a traced array (the tuning grid is
vmapped over it, or mapped for :data:`SEQUENTIAL_GRID`): both packages use it only as the
factor of the final update.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import jax
import optax

INSTALL = "pip install -e '.[benchmark]'"

PACKAGES = {
    'psgd_kron': ('psgdax', 'psgdax'),
    'shampoo': ('precondition.distributed_shampoo', 'precondition-opt'),
}
"""Baseline name -> ``(module imported, pip distribution)``."""

SEQUENTIAL_GRID = frozenset({'shampoo'})
"""Baselines whose learning-rate grid is tuned one rate after another (``lax.map``).

``evaluation.tune_learning_rate`` vmaps over the grid's rates and over the tasks. With
both axes, XLA 0.10's CPU algebraic simplifier aborts the whole process (a ``RET_CHECK``
shape mismatch between a ``transpose`` and the ``dot`` it folds in, e.g. ``f32[21,2,2,128,
128]`` vs ``f32[2,21,2,128,128]``) on Shampoo's batched ``128 x 128`` preconditioner
blocks (the digits MLP); an abort cannot be caught. With one vmapped axis (the tasks; the
rates in a ``lax.map``, still one compiled program) it compiles, and the scores are those
of the same protocol. The held-out runs (tasks vmapped) and timed runs (one task) have a
single axis and are unaffected.
"""

SHAMPOO_BLOCK_SIZE = 128
"""Shampoo's largest preconditioned block (the package's recommended default).

A dimension above it is split into blocks of at most this size, so a preconditioner
inverse root costs at most ``128^3`` per block: small on CPU, and every layer of the
benchmark's models is covered by a few blocks.
"""

SHAMPOO_PRECONDITIONING_STEPS = 10
"""Steps between two recomputations of Shampoo's inverse roots (the package default is 1).

The inverse roots are iterative matrix solves, by far the dearest part of a step; on CPU,
and with the tuning grid's learning rates and tasks vmapped together, every 10 steps keeps
a Shampoo step within a small multiple of Adam's. The statistics are still updated every
step.
"""


def _restore_tree_aliases() -> None:
  """Restore the ``jax.tree_*`` aliases that ``precondition-opt`` 0.3.0 still calls.

  JAX removed ``jax.tree_map``, ``jax.tree_flatten`` and ``jax.tree_unflatten`` (use
  ``jax.tree.map`` and friends); ``precondition.distributed_shampoo`` calls them when it
  builds and updates its state. Only names that are missing are set, to the ``jax.tree``
  functions they were aliases of.
  """
  for old, new in (('tree_map', jax.tree.map), ('tree_flatten', jax.tree.flatten),
                   ('tree_unflatten', jax.tree.unflatten)):
    if not hasattr(jax, old):
      setattr(jax, old, new)


def _import(name: str) -> ModuleType:
  module, distribution = PACKAGES[name]
  if name == 'shampoo':
    _restore_tree_aliases()
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise ImportError(f'baseline {name!r} needs the package {distribution}: {INSTALL}.'
                      ) from error


def missing_package(name: str) -> str | None:
  """The pip distribution baseline ``name`` needs when it cannot be imported, else ``None``.

  ``None`` also for a name that needs no optional package.
  """
  if name not in PACKAGES:
    return None
  try:
    _import(name)
  except ImportError:
    return PACKAGES[name][1]
  return None


def psgd_kron(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """PSGD-Kron (``psgdax.kron``) with the package's defaults.

  Momentum ``b1=0.9``, the gradient whitened by Kronecker factors fitted online
  (``Q0.5EQ1.5`` geometry, preconditioner learning rate 0.1, initial scale from the
  first gradient), the preconditioner updated with a probability annealed from 1 to 0.03,
  and the preconditioned gradient's RMS clipped at 1.

  Args:
    learning_rate: the step size (a float, a traced scalar or a schedule).

  Returns:
    An optax transformation (it takes ``params`` in ``update`` like any other).

  References:
    Li, `Preconditioned stochastic gradient descent <https://arxiv.org/abs/1512.04202>`_,
    2015; the Kron variant of https://github.com/lixilinx/psgd_torch.
  """
  kron = _import('psgd_kron').kron(learning_rate)
  # psgdax types its chain for optax's extra arguments, but an inner update refuses them;
  # the runs pass the loss as one (metamd_jax.evaluation), so take the plain type.
  return optax.GradientTransformation(
      kron.init, lambda updates, state, params=None: kron.update(updates, state, params))


def shampoo(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """Distributed Shampoo (``precondition.distributed_shampoo``), sized for small models.

  The package's defaults (``beta1=0.9``, ``beta2=0.999``, Nesterov momentum, layer-wise
  grafting onto SGD's step size, diagonal steps for the first 5 steps, relative matrix
  epsilon ``1e-6``) with ``block_size=SHAMPOO_BLOCK_SIZE`` and the inverse roots
  recomputed every ``SHAMPOO_PRECONDITIONING_STEPS`` steps. Training metrics are off:
  they only grow the state.

  Args:
    learning_rate: the step size (a float, a traced scalar or a schedule).

  Returns:
    An optax transformation; ``update`` needs ``params``.

  References:
    Anil et al., `Scalable second order optimization for deep learning
    <https://arxiv.org/abs/2002.09018>`_, 2020.
  """
  return _import('shampoo').distributed_shampoo(
      learning_rate, block_size=SHAMPOO_BLOCK_SIZE,
      preconditioning_compute_steps=SHAMPOO_PRECONDITIONING_STEPS,
      generate_training_metrics=False)
