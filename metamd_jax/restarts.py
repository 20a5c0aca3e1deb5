"""Doubling restarts: the online state of an optimiser started afresh at T, 2T, 4T, ...

Adaptive, blended and accelerated MetaMD (:func:`metamd_jax.adaptive_metamd`,
:func:`metamd_jax.blended_metamd`, :func:`metamd_jax.nesterov_momentum`) keep their
guarantee by letting the metric only grow: the online scales, the overshoot check's
factor and the running Kronecker statistics never decrease. Over a run much longer than
the horizon they were calibrated for, that makes the steps ever shorter (the running
statistics shorten the online half as ``1 / sqrt(t)``; minibatch noise alone raises the
scales), and nothing lengthens them again. :func:`doubling_restarts` wraps any such
optimiser and starts its state afresh (``inner.init(params)`` at the current parameters)
after ``first``, ``factor * first``, ``factor**2 * first``, ... updates: the classical
doubling trick. Inside an epoch the wrapped optimiser is exactly itself; a run no longer
than ``first`` steps never sees a restart.

The guarantee. Let the epochs be ``E_0 = [1, first]``, ``E_k = (factor**(k-1) first,
factor**k first]``, and ``B(E_k)`` the wrapped optimiser's own regret bound on epoch
``k`` alone, started from the parameters the previous epoch ended at (the adaptive
mirror-descent bound of METHOD.md section 7, whose form
:mod:`metamd_jax.blended` states in closed form). The regret against any comparator
``u`` splits over the epochs, so

.. math::

  \\sum_{t \\le T} f_t(\\theta_t) - f_t(u) = \\sum_k \\sum_{t \\in E_k} f_t(\\theta_t) - f_t(u)
      \\le \\sum_{k=0}^{K} B(E_k), \\qquad K = \\lceil \\log_{factor}(T / first) \\rceil.

With ``||u - theta_t||_2 <= D`` and blended MetaMD's closed form, each epoch pays its
distance term ``1/2 s^{(k)} D^2 tr(M)`` once (``s^{(k)}`` the epoch's largest scale, times
the overshoot check's factor where there is one), so the distance terms grow from one to
``K + 1`` (logarithmic in ``T``); the learned gradient term
``1/2 sum_t ||g_t||^2_{M^{-1}} / s_t`` is a sum over the steps either way; and the online
AdaGrad terms ``sqrt(sum_{t in E_k} g_t^2)`` sum
to at most ``sqrt(K + 1) sqrt(sum_t g_t^2)`` (Cauchy-Schwarz), still ``O(sqrt(T))``.
Inside an epoch the metric never decreases, as before; at a restart it returns to its
first-step value, which the bound pays for with one more distance term.

Nesterov's momentum (:func:`metamd_jax.nesterov_momentum`) chained inside the wrapper
restarts with the rest: restarted accelerated methods keep their rate on each epoch.
``tests/test_restarts.py`` checks the bound above on least squares with dense metrics.

Cost: an integer comparison and a conditional per step, and at each of the ``K``
restarts one ``inner.init`` (for the learned half, the eigendecompositions of its factors
where the variant caches them); the state grows by two integers. On the MNIST MLP the
step time is the same within the machine's noise (experiments/RESULTS.md section 21).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ('RestartState', 'check_restart_factor', 'check_restart_first', 'doubling_restarts')

_NEVER = np.iinfo(np.int32).max
"""A restart step that is never reached (``next`` once it would overflow int32)."""


class RestartState(NamedTuple):
  """State of :func:`doubling_restarts`.

  Attributes:
    count: number of updates taken, int32 ``()``.
    next: the update count at which the next restart happens, int32 ``()``.
    inner: the wrapped optimiser's state, started afresh at each restart.
  """

  count: jax.Array
  next: jax.Array
  inner: Any


def _integer_at_least(value: Any, name: str, minimum: int, meaning: str) -> int:
  """``value`` as an int ``>= minimum``; errors name ``name`` and what it means."""
  message = f'{name} must be an integer >= {minimum} ({meaning}), got {value!r}.'
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(message)
  if value < minimum:
    raise ValueError(message)
  return int(value)


def check_restart_first(first: Any) -> int:
  """``first`` as an int ``>= 1``: the updates before the first restart.

  Raises:
    TypeError: if it is not an integer (a bool is not one).
    ValueError: if it is below 1.
  """
  return _integer_at_least(first, 'first', 1, 'updates before the first restart')


def check_restart_factor(factor: Any) -> int:
  """``factor`` as an int ``>= 2``: each epoch is this many times the last.

  Raises:
    TypeError: if it is not an integer (a bool is not one).
    ValueError: if it is below 2.
  """
  return _integer_at_least(factor, 'factor', 2, 'the growth of the epochs')


def _advance(next_restart: jax.Array, factor: int) -> jax.Array:
  """``next * factor``, or :data:`_NEVER` where that would overflow int32."""
  return jnp.where(next_restart > _NEVER // factor, _NEVER,
                   next_restart * factor).astype(jnp.int32)


def doubling_restarts(inner: optax.GradientTransformation, first: int, factor: int = 2
                      ) -> optax.GradientTransformation:
  """Start ``inner``'s state afresh after ``first``, ``factor * first``, ... updates.

  See the module docstring for the guarantee. Each restart calls ``inner.init(params)``
  with the parameters ``update`` receives, so ``update`` needs ``params``.

  Args:
    inner: the optimiser whose state restarts (e.g. :func:`metamd_jax.blended_metamd`,
      or a chain of it and :func:`metamd_jax.nesterov_momentum`).
    first: updates before the first restart, an int ``>= 1`` (e.g. the horizon the
      optimiser's levels were calibrated over).
    factor: the growth of the epochs, an int ``>= 2`` (default 2: the doubling trick).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`RestartState`.

  Raises:
    TypeError: if ``inner`` is not a ``GradientTransformation``, or on a ``first`` or
      ``factor`` that is not an integer.
    ValueError: on ``first < 1`` or ``factor < 2``; from ``update``, on ``params=None``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> adagrad = optax.chain(optax.scale_by_rss(initial_accumulator_value=0.0),
    ...                       optax.scale(-1.0))
    >>> optimizer = doubling_restarts(adagrad, first=2)
    >>> params = {'w': jnp.zeros(())}
    >>> state = optimizer.init(params)
    >>> steps = []
    >>> for _ in range(5):  # restarts after 2 and 4 updates
    ...   updates, state = optimizer.update({'w': jnp.ones(())}, state, params)
    ...   steps.append(round(-float(updates['w']), 3))
    >>> steps  # AdaGrad's 1 / sqrt(t), started again at the 3rd and the 5th update
    [1.0, 0.707, 1.0, 0.707, 1.0]
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f'inner must be an optax.GradientTransformation, got {type(inner)}.')
  first = check_restart_first(first)
  factor = check_restart_factor(factor)

  def init_fn(params):
    return RestartState(count=jnp.zeros((), jnp.int32),
                        next=jnp.asarray(first, jnp.int32), inner=inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('doubling_restarts needs params in update: a restart starts the '
                       'inner state afresh with inner.init(params).')
    # _NEVER marks a next restart past int32; the count saturates there, never restarting.
    restart = (state.count == state.next) & (state.next != _NEVER)

    def fresh():
      new = inner.init(params)
      # The fresh state must match the running one leaf for leaf (lax.cond's branches).
      return jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), new, state.inner)

    inner_state = jax.lax.cond(restart, fresh, lambda: state.inner)
    updates, inner_state = inner.update(updates, inner_state, params)
    next_restart = jnp.where(restart, _advance(state.next, factor), state.next)
    count = optax.safe_int32_increment(state.count)
    return updates, RestartState(count=count, next=next_restart.astype(jnp.int32),
                                 inner=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)

