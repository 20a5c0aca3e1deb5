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

Epoch-dependent settings. ``inner`` may also be a function of the epoch's length ``L``
(in units of ``first``: ``1`` for ``E_0``, ``factor - 1`` for ``E_1``, then ``factor``
times the last) that returns the transformation to run on that epoch. Inside an epoch the
transformation is fixed, so its own bound holds there and the sum above still bounds the
regret, each epoch's term with that epoch's settings. For blended MetaMD with the learned
half times ``L_k^{-b}`` and the online half times ``L_k^a`` on epoch ``k``
(``optax.chain(blended_metamd(..., blend_rate=rho * L**(a + b)), optax.scale(L**-b))``;
``eval.adaptive_restart_shrink`` and ``eval.adaptive_restart_growth`` in the experiments),
the epoch's metric ``M_t`` has ``M_t^{-1} = L_k^{-b} M^{-1} / s_t + rho L_k^a K_t^{-1} /
s_t^p``, so its gradient term splits into the two halves' and its distance term is at most
either half's alone (``M_t`` is below each half's metric). Per epoch, with ``G`` bounding
the gradients:

- the learned half pays ``1/2 s D^2 tr(M) L_k^b + 1/2 L_k^{1 - b} G_M^2``: with ``b = 0``
  the second term is linear in ``L_k`` (a fixed metric tuned for ``first`` steps is
  constant-step mirror descent beyond them), with ``b = 1/2`` both are ``O(sqrt(L_k))``:
  the doubling trick's step, the bound-optimal fixed metric for ``L_k`` steps being
  ``sqrt(L_k)`` times the one for ``first`` (the learned metric is optimal for ``first``);
- the online half's AdaGrad gradient term is ``rho L_k^a O(sqrt(L_k))`` (Duchi, Hazan &
  Singer 2011), sublinear in ``T`` for ``a < 1/2``.

Summed over the doubling epochs: ``b = 1/2, a = 0`` gives ``O(sqrt(T))`` regret, average
regret going to zero, a guarantee beyond the horizon that the fixed learned metric alone
does not have; ``a > 0`` weights the online half more in longer epochs, at ``O(T^{1/2 +
a})``: still sublinear for ``a < 1/2``, linear (a neighbourhood of the comparator's
average loss, as constant-step SGD reaches) at ``a = 1/2``.

The momentum may change with the epoch too (``eval.adaptive_restart_momentum`` and
``eval.adaptive_restart_step_factor`` in the experiments give the epochs longer than
``first`` their own ``beta`` and step factor). Each such epoch is then Nesterov's method in
its own metric (:mod:`metamd_jax.accelerated`) with that ``beta``: with a step factor up to
1/2 it converges on a quadratic wherever MetaMD's own step does, at the accelerated rate
for every ``((1 - beta) / (1 + beta))^2``-strongly convex ``f`` (in the metric over the
step); as for any momentum here, the regret bound above is the plain step's and is not
claimed with it. A larger ``beta`` at a smaller factor averages more gradients per step
over an epoch many horizons long. A function ``inner`` is
called under ``jax.ensure_compile_time_eval``, so what it computes from concrete values
(eigendecompositions of the learned factors) is computed once when ``init`` or
``update`` is traced, not in every step; the length itself may be traced.
``tests/test_restarts.py`` checks the bound above on least squares with dense metrics,
with the learned half as it is and shrunk by ``sqrt(L_k)``.

Cost: an integer comparison and a conditional per step, and at each of the ``K``
restarts one ``inner.init`` (for the learned half, the eigendecompositions of its factors
where the variant caches them); the state grows by two integers. On the MNIST MLP the
step time is the same within the machine's noise (experiments/RESULTS.md section 21).
"""

from __future__ import annotations

from collections.abc import Callable
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
    length: the current epoch's length in units of ``first``, float32 ``()`` (``1``, then
      ``factor - 1``, then ``factor`` times the last; what an epoch-dependent ``inner``
      is called with).
    inner: the wrapped optimiser's state, started afresh at each restart.
  """

  count: jax.Array
  next: jax.Array
  length: jax.Array
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


def _check_same_structure(fresh: Any, running: Any) -> None:
  """Raise if a fresh inner state differs from the running one in structure or shapes."""
  fresh_def, running_def = jax.tree.structure(fresh), jax.tree.structure(running)
  if fresh_def != running_def:
    raise ValueError('the restarted inner state must have the running state\'s structure '
                     '(an epoch-dependent inner may change settings, not its state): got '
                     f'{fresh_def} at a restart against {running_def}.')
  for n, o in zip(jax.tree.leaves(fresh), jax.tree.leaves(running)):
    if jnp.shape(n) != jnp.shape(o):
      raise ValueError('the restarted inner state must have the running state\'s shapes '
                       '(an epoch-dependent inner may change settings, not its state): got '
                       f'a leaf of shape {jnp.shape(n)} at a restart against {jnp.shape(o)}.')


def doubling_restarts(
    inner: optax.GradientTransformation | Callable[[jax.Array], optax.GradientTransformation],
    first: int, factor: int = 2) -> optax.GradientTransformation:
  """Start ``inner``'s state afresh after ``first``, ``factor * first``, ... updates.

  See the module docstring for the guarantee. Each restart calls ``inner.init(params)``
  with the parameters ``update`` receives, so ``update`` needs ``params``.

  Args:
    inner: the optimiser whose state restarts (e.g. :func:`metamd_jax.blended_metamd`,
      or a chain of it and :func:`metamd_jax.nesterov_momentum`); or a function of the
      epoch's length in units of ``first`` (a float32 scalar, traced: ``1``, ``factor -
      1``, ``factor (factor - 1)``, ...) returning the optimiser for that epoch, whose
      state has the same structure for every length (settings may change with the epoch,
      the state's shapes may not).
    first: updates before the first restart, an int ``>= 1`` (e.g. the horizon the
      optimiser's levels were calibrated over).
    factor: the growth of the epochs, an int ``>= 2`` (default 2: the doubling trick).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`RestartState`.

  Raises:
    TypeError: if ``inner`` is neither a ``GradientTransformation`` nor callable, if an
      epoch-dependent ``inner`` returns something else, or on a ``first`` or ``factor``
      that is not an integer.
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
    >>> longer = doubling_restarts(  # the step times the epoch's length
    ...     lambda length: optax.chain(optax.scale_by_rss(initial_accumulator_value=0.0),
    ...                                optax.scale(-length)), first=2)
    >>> state = longer.init(params)
    >>> steps = []
    >>> for _ in range(5):  # epochs of 2, 2 and 4 updates: lengths 1, 1, 2
    ...   updates, state = longer.update({'w': jnp.ones(())}, state, params)
    ...   steps.append(round(-float(updates['w']), 3))
    >>> steps
    [1.0, 0.707, 1.0, 0.707, 2.0]
  """
  if isinstance(inner, optax.GradientTransformation):
    fixed = inner

    def for_epoch(length):
      del length
      return fixed
  elif callable(inner):
    def for_epoch(length):
      # Work on concrete values while building (a learned divergence's eigendecompositions)
      # runs once, when init or update is traced, not in every step; `length` may be traced.
      with jax.ensure_compile_time_eval():
        transformation = inner(length)
      if not isinstance(transformation, optax.GradientTransformation):
        raise TypeError('an epoch-dependent inner must return an '
                        f'optax.GradientTransformation, got {type(transformation)}.')
      return transformation
  else:
    raise TypeError('inner must be an optax.GradientTransformation or a function of the '
                    f'epoch length returning one, got {type(inner)}.')
  first = check_restart_first(first)
  factor = check_restart_factor(factor)

  def init_fn(params):
    length = jnp.ones((), jnp.float32)
    return RestartState(count=jnp.zeros((), jnp.int32),
                        next=jnp.asarray(first, jnp.int32), length=length,
                        inner=for_epoch(length).init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('doubling_restarts needs params in update: a restart starts the '
                       'inner state afresh with inner.init(params).')
    # _NEVER marks a next restart past int32; the count saturates there, never restarting.
    restart = (state.count == state.next) & (state.next != _NEVER)
    # The epoch that starts at a restart at update `next` ends at `factor * next`.
    started = (state.next.astype(jnp.float32) * (factor - 1)) / first
    length = jnp.where(restart, started, state.length).astype(jnp.float32)
    transformation = for_epoch(length)

    def fresh():
      new = transformation.init(params)
      # The fresh state must match the running one leaf for leaf (lax.cond's branches).
      _check_same_structure(new, state.inner)
      return jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), new, state.inner)

    inner_state = jax.lax.cond(restart, fresh, lambda: state.inner)
    updates, inner_state = transformation.update(updates, inner_state, params)
    next_restart = jnp.where(restart, _advance(state.next, factor), state.next)
    count = optax.safe_int32_increment(state.count)
    return updates, RestartState(count=count, next=next_restart.astype(jnp.int32),
                                 length=length, inner=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
