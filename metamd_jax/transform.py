"""Mirror descent with a learned Kronecker Bregman divergence as optax transformations."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax import divergence as divergence_lib
from metamd_jax.types import PyTree


class ScaleByMirrorDescentState(NamedTuple):
  """State of :func:`scale_by_mirror_descent`.

  Attributes:
    preconditioner: the cached inverse metric of every leaf, computed at ``init``
      (:func:`metamd_jax.divergence.preconditioner`; once, when ``init`` is traced, for a
      concrete divergence): a
      :class:`~metamd_jax.divergence.KroneckerOperator` holding only the inverse factors
      ``P = L^{-1}``, shape ``(m, m)`` or ``(m,)``, and ``Q = R^{-1}``, shape ``(n, n)``
      or ``(n,)`` (its factor fields are ``None``), or an
      :class:`~metamd_jax.divergence.ElementwiseOperator` holding only the inverse values
      (the leaf's shape, or ``()`` for a scalar metric).
  """

  preconditioner: PyTree


def scale_by_mirror_descent(divergence: PyTree) -> optax.GradientTransformation:
  """Map gradients to the mirror-descent direction ``M^{-1} g`` of a frozen divergence.

  The direction has the sign of the gradient (like ``optax.scale_by_adam``); follow with
  ``optax.scale_by_learning_rate`` or use :func:`metamd`. The inverse factors are
  computed in ``init``; each ``update`` is two matrix products per Kronecker leaf
  (``P G Q``), with no solve, root or eigendecomposition. For a concrete divergence (a
  learned or loaded one, not a tracer) they are computed under
  ``jax.ensure_compile_time_eval``: once, when ``init`` is traced, so a jitted training
  run holds them as constants instead of inverting the factors at every run (on the
  MNIST MLP's 784-row factor, an inversion costs about as much as ten training steps).
  A traced divergence (an argument of a jitted or differentiated function) is inverted
  inside ``init``'s program.

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence` (learned or not).

  Returns:
    An ``optax.GradientTransformation``.
  """
  divergence_lib.check_divergence(divergence)

  def init_fn(params):
    # The structure and shapes against the params (masked leaves allowed); computes nothing.
    divergence_lib.check_structure(divergence, params)
    with jax.ensure_compile_time_eval():
      preconditioner = divergence_lib.preconditioner(divergence)
    return ScaleByMirrorDescentState(preconditioner=preconditioner)

  def update_fn(updates, state, params=None):
    del params
    return divergence_lib.precondition(state.preconditioner, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
  """Raise unless ``learning_rate`` is a schedule or one positive finite number (a traced
  value, e.g. under ``optax.inject_hyperparams``, is the caller's to check).

  Raises:
    TypeError: for anything but a callable or a real scalar (``None``, a bool, a string,
      an array of several values): ``optax.scale_by_learning_rate(None)`` would be the
      identity, a step up the gradient.
    ValueError: for a scalar that is zero, negative or not finite.
  """
  if callable(learning_rate) or isinstance(learning_rate, jax.core.Tracer):
    return
  if isinstance(learning_rate, (np.ndarray, np.generic, jax.Array)):
    dtype = np.asarray(learning_rate).dtype
    scalar = np.ndim(learning_rate) == 0 and (jnp.issubdtype(dtype, jnp.floating)
                                              or jnp.issubdtype(dtype, jnp.integer))
  else:
    scalar = isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool)
  if not scalar:
    raise TypeError(f'learning_rate must be a positive float or an optax schedule, got '
                    f'{learning_rate!r}.')
  value = float(learning_rate)
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f'learning_rate must be positive and finite, got {learning_rate}.')


def metamd(divergence: PyTree, learning_rate: optax.ScalarOrSchedule = 1.0
           ) -> optax.GradientTransformation:
  """The MetaMD optimiser: ``-learning_rate * M^{-1} g`` with a (learned) divergence.

  With ``divergence = init_divergence(params, lr)`` and the default ``learning_rate=1``
  this is exactly ``optax.sgd(lr)``; after meta-training it is a learned
  Kronecker-preconditioned gradient step whose convergence guarantee is that of mirror
  descent with an ``eps**2``-strongly convex potential.

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence`.
    learning_rate: a positive float or an optax schedule; multiplies the learned step.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax, metamd_jax
    >>> params = {'w': jnp.ones((4, 3))}
    >>> divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
    >>> optimizer = optax.chain(optax.clip_by_global_norm(1.0), metamd_jax.metamd(divergence))
    >>> state = optimizer.init(params)
    >>> updates, state = optimizer.update({'w': jnp.full((4, 3), 0.01)}, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    `Meta Mirror Descent: optimiser learning for fast convergence`, arXiv:2203.02711
    (later `MetaMD: principled optimiser meta-learning for deep learning`);
    Nemirovski & Yudin (1983), mirror descent.
  """
  check_learning_rate(learning_rate)
  return optax.chain(
      scale_by_mirror_descent(divergence),
      optax.scale_by_learning_rate(learning_rate),
  )
