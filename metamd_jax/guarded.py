"""Guarded MetaMD: a cheap learned optimiser first, a robust one once it is out of its depth.

Frozen MetaMD (at low rank, :func:`metamd_jax.low_rank_metamd`) is the cheapest learned
step, and on the family it was meta-trained for it is the fastest; under an everyday
change (inputs rescaled, a smaller batch) its fixed steps are too long and it diverges.
The adaptive optimisers (:func:`metamd_jax.blended_metamd` with its checks) survive those
changes but each of their steps costs several times more. :func:`guarded_switch` runs
``fast`` while its gradients, measured in its own geometry, stay within the levels seen on
the meta-train tasks, and hands over to ``fallback`` for good at the first step where
they do not (or after ``switch_after`` steps, or, with ``min_progress``, at the first step
after those whose loss has stopped falling fast enough):

.. math::

  v_t = \\beta v_{t-1} + (1 - \\beta) x_t, \\qquad x_t = -\\langle g_t, u_t \\rangle
  = \\|g_t\\|^2_{M^{-1}}, \\qquad \\text{switch at the first } t \\text{ with }
  \\sqrt{v_t / (1 - \\beta^t)} > \\mu c,

per parameter leaf (``levels`` ``c``, one per leaf or one for all; ``margin`` ``mu``),
with ``u_t`` the fast optimiser's update: for mirror descent of unit learning rate,
``u_t = -M^{-1} g_t`` and ``x_t`` is the squared dual norm of the gradient, the quantity
the adaptive optimisers' scales follow (:func:`metamd_jax.adaptive.gradient_levels`; its
per-leaf peaks on the meta-train tuning tasks are the natural levels). A non-finite check
switches too. The step that fires the check is already the fallback's (its state started
at that step with ``fallback.init`` on the current parameters, or, where ``update`` gets no
parameters, the state ``init`` made):
the fast update that tripped it is discarded, so a change that makes the first learned
step far too long never takes it.

The switch on progress. A step count set from the steps a meta-train task needs hands a
task that needs a few more over to ``fallback`` just before the end. With
``min_progress`` ``p``, ``update`` takes the
loss as ``value`` (``optax``'s extra arguments: ``update(grads, state, params,
value=loss)``, the loss at the parameters the gradient was taken at) and keeps the moving
average of its relative decrease,

.. math::

  w_t = \\beta w_{t-1} + (1 - \\beta) r_t, \\qquad r_t = \\frac{L_{t-1} - L_t}{|L_{t-1}|}
  \\quad (t \\ge 2),

and the step count switch fires at the first update ``t > switch_after`` with
``w_t / (1 - beta^{t-1}) < p``: the fast steps go on while they still make progress. A
non-finite loss switches at once. Measured on minibatch losses it helps little once the
loss is near its minibatch noise, and the handover has its own cost: a ``fallback`` with
online statistics started afresh mid-run (the adaptive default's) takes long first steps
and jumps the loss (experiments/RESULTS.md section 39).

The handover. ``handover`` is applied to ``fallback``'s fresh state at the switch, with
the gradient mass of the fast steps, per leaf ``mu = sum_{t < tau} ||g_t||^2`` (one
squared norm per leaf and step to keep). :func:`metamd_jax.statistics.statistics_prior`
starts ``fallback``'s online (Shampoo) statistics from it, as if those gradients had been
spread evenly over each leaf's entries: its first steps are then of the size an online
half run from the start would take, not unit steps. The statistics still never decrease
from the switch on, so ``fallback``'s bound below holds on its epoch unchanged (on the MNIST
MLP it removes part of the jump, and more with the fallback's longer first steps off:
experiments/RESULTS.md section 40).

The guarantee. Let ``tau`` be the switch step (``T + 1`` if it never comes). The steps
before ``tau`` are ``fast``'s, the steps from ``tau`` on are ``fallback``'s started
afresh: two epochs, as in :func:`metamd_jax.doubling_restarts`, and the regret against
any comparator splits over them,

.. math::

  \\sum_{t \\le T} f_t(\\theta_t) - f_t(u) \\le B_{\\mathrm{fast}}([1, \\tau))
      + B_{\\mathrm{fallback}}([\\tau, T]),

each optimiser's own bound on its epoch (``tau`` is a stopping time, decided by the
gradients and losses seen so far; each bound holds for an epoch starting anywhere). With ``fast``
mirror descent in a frozen metric ``M``, its bound is ``1/2 D^2 tr(M) + 1/2 sum_{t <
tau} ||g_t||^2_{M^{-1}}``, and the guard caps its gradient terms: for ``t < tau``, ``(1 -
beta) x_t <= v_t <= (1 - beta^t) mu^2 c^2`` per leaf, so each step adds at most ``mu^2
c^2 / (1 - beta)`` per leaf to the bound, a constant set on the meta-train tasks, where
frozen MetaMD's own bound has no such cap. ``fallback``'s term is its own bound (for the
adaptive optimisers, METHOD.md section 7's adaptive-mirror-descent bound, started at
``tau``).

Cost: ``fast``'s step, one inner product per leaf and a conditional at every step, and
``fallback``'s step from the switch on. ``fast``'s step is taken after the switch too (its
result unused): that keeps ``fallback``'s state in one conditional only, which matters
because a conditional that passes a large state through may copy it at every step (on the
MNIST MLP the guard reached Adam's loss in 0.46 of Adam's time with the fast step behind a
second conditional, and in 0.28 without: experiments/RESULTS.md section 38).
The state holds both optimisers' states (``fallback``'s untouched until the switch), ``2 L``
floats and five scalars. Under ``jax.vmap`` (tasks batched) the conditional becomes a
select and both branches run; a single run (``jax.jit`` of one task, as a user trains)
runs one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax.types import Array

__all__ = ('GuardedState', 'check_levels', 'guarded_switch')


class GuardedState(NamedTuple):
  """State of :func:`guarded_switch`.

  Attributes:
    fast: ``fast``'s state (frozen once the switch has come).
    fallback: ``fallback``'s state (its ``init`` until the switch).
    average: ``v_t``, float32 ``(L,)``, per leaf (``(1,)`` with one level for all).
    count: updates taken, int32 ``()``.
    switched: bool ``()``, whether ``fallback`` has taken over.
    switch_step: int32 ``()``, the update at which it did (0 before).
    last_value: float32 ``()``, the loss passed to the last update (``min_progress``
      only; 0 otherwise).
    progress: ``w_t``, float32 ``()``, the moving average of the loss's relative
      decrease (``min_progress`` only; 0 otherwise).
    mass: float32 ``(L,)``, per parameter leaf the gradient mass ``sum_t ||g_t||^2`` of
      the fast steps (``handover`` only; 0 otherwise).
  """

  fast: Any
  fallback: Any
  average: Array
  count: Array
  switched: Array
  switch_step: Array
  last_value: Array
  progress: Array
  mass: Array


def check_levels(levels: Any, num_leaves: int) -> np.ndarray:
  """``levels`` as float32 ``(num_leaves,)`` or ``(1,)``: positive, or ``inf`` for a leaf
  that never fires the check (a leaf whose calibration gradients were all zero, as the
  adaptive optimisers' levels have it).

  Raises:
    ValueError: naming ``levels`` on a wrong length, a zero, negative or NaN one.
  """
  values = np.atleast_1d(np.asarray(levels, np.float64))
  if values.ndim != 1 or values.shape[0] not in (1, num_leaves):
    raise ValueError(f'levels must be one number or one per parameter leaf ({num_leaves}), '
                     f'got shape {np.shape(levels)}.')
  if not np.all(values > 0):
    raise ValueError(f'levels must be positive (or inf: never fire), got {values.tolist()}.')
  return values.astype(np.float32)


def _positive(value: Any, name: str, meaning: str) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer))
      or not np.isfinite(value) or value <= 0):
    raise ValueError(f'{name} must be a positive finite number ({meaning}), got {value!r}.')
  return float(value)


def guarded_switch(fast: optax.GradientTransformation,
                   fallback: optax.GradientTransformation, levels: Any, *,
                   margin: float = 1.0, switch_after: int | None = None,
                   min_progress: float | None = None,
                   handover: Callable[[Any, Any, Array], Any] | None = None,
                   decay: float = 0.9) -> optax.GradientTransformation:
  """Run ``fast`` until its gradients leave their levels, then ``fallback`` for good.

  See the module docstring for the check and the guarantee.

  Args:
    fast: a mirror-descent step of unit learning rate (``u = -M^{-1} g``), e.g.
      :func:`metamd_jax.metamd` or :func:`metamd_jax.low_rank_metamd`; the check reads
      ``-<g, u>`` as ``||g||^2_{M^{-1}}``.
    fallback: the optimiser that takes over (e.g. the adaptive default); its ``update``
      gets ``params``.
    levels: ``c``, one positive number or one per parameter leaf (``jax.tree.leaves``
      order): e.g. :func:`metamd_jax.adaptive.reference_gradient_norm` with
      ``per_leaf=True`` on meta-train tasks; ``inf`` where a leaf never fires the check.
    margin: ``mu > 0``: the check fires above ``mu c``.
    switch_after: ``None``, or ``k >= 0``: ``fallback`` takes over at update ``k + 1``
      whatever the check (``0``: ``fallback`` alone); with ``min_progress``, at the first
      update after ``k`` whose loss's averaged relative decrease is below it.
    min_progress: ``None`` (the step count alone), or ``p >= 0``, finite: the fast steps
      go on past ``switch_after`` while the bias-corrected moving average of the loss's
      relative decrease per step is at least ``p`` (e.g. ``0.02``: 2% a step). ``update``
      then needs the loss, ``update(grads, state, params, value=loss)``, and the result
      is an ``optax.GradientTransformationExtraArgs``; needs ``switch_after``.
    handover: ``None`` (``fallback`` starts from its ``init``), or a function
      ``(fallback_state, params, masses) -> fallback_state`` applied to that ``init`` at
      the switch, with ``masses`` float32 ``(L,)``, per parameter leaf the gradient mass
      ``sum ||g_t||^2`` of the fast steps before it: e.g.
      :func:`metamd_jax.statistics.statistics_prior`, which starts ``fallback``'s online
      statistics from that mass instead of empty. ``update`` then needs ``params``.
    decay: ``beta`` in ``[0, 1)``, the moving average's decay (that of the levels).

  Returns:
    An ``optax.GradientTransformation`` (``GradientTransformationExtraArgs`` with
    ``min_progress``) whose state is a :class:`GuardedState`.

  Raises:
    ValueError: on bad ``levels`` (at ``init``, against the parameters' leaves),
      ``margin``, ``switch_after``, ``min_progress``, ``handover`` (not callable) or
      ``decay``; at ``update``, on a missing or non-scalar ``value`` with
      ``min_progress``, or missing ``params`` with ``handover``.
  """
  margin = _positive(margin, 'margin', 'the check fires above margin times the level')
  if switch_after is not None and (isinstance(switch_after, bool)
                                   or not isinstance(switch_after, (int, np.integer))
                                   or switch_after < 0):
    raise ValueError(f'switch_after must be None or an integer >= 0 (the fast steps '
                     f'before the fallback takes over), got {switch_after!r}.')
  if (isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating))
      or not 0 <= decay < 1):
    raise ValueError(f'decay must be a float in [0, 1), got {decay!r}.')
  decay = float(decay)
  if min_progress is not None:
    if (isinstance(min_progress, bool)
        or not isinstance(min_progress, (int, float, np.floating, np.integer))
        or not np.isfinite(min_progress) or min_progress < 0):
      raise ValueError(f'min_progress must be None or a finite number >= 0 (the relative '
                       f'loss decrease per step below which the fast steps stop), got '
                       f'{min_progress!r}.')
    if switch_after is None:
      raise ValueError('min_progress needs switch_after (the fast steps taken before '
                       'their progress is checked), got switch_after=None.')
    min_progress = float(min_progress)
  if handover is not None and not callable(handover):
    raise ValueError(f'handover must be None or a function (fallback_state, params, '
                     f'masses) -> fallback_state, got {handover!r}.')
  limit = np.iinfo(np.int32).max if switch_after is None else int(switch_after)

  def init_fn(params):
    width = check_levels(levels, len(jax.tree.leaves(params))).shape[0]
    return GuardedState(fast=fast.init(params), fallback=fallback.init(params),
                        average=jnp.zeros((width,), jnp.float32),
                        count=jnp.zeros((), jnp.int32), switched=jnp.zeros((), bool),
                        switch_step=jnp.zeros((), jnp.int32),
                        last_value=jnp.zeros((), jnp.float32),
                        progress=jnp.zeros((), jnp.float32),
                        mass=jnp.zeros((len(jax.tree.leaves(params)),), jnp.float32))

  def progress_check(state, count, value):
    """``(stop, last_value, progress)``: whether the step count switch may fire now."""
    if min_progress is None:
      return count > limit, state.last_value, state.progress
    if value is None:
      raise ValueError('guarded_switch with min_progress needs the loss: call '
                       'update(grads, state, params, value=loss).')
    value = jnp.asarray(value)
    if value.shape != ():
      raise ValueError(f'value must be the scalar loss, got shape {value.shape}.')
    value = value.astype(jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    relative = (state.last_value - value) / jnp.maximum(jnp.abs(state.last_value), tiny)
    progress = jnp.where(count > 1, decay * state.progress + (1 - decay) * relative, 0.0)
    corrected = progress / (1 - decay ** jnp.maximum(count - 1, 1).astype(jnp.float32))
    stop = ((count > limit) & (corrected < min_progress)) | ~jnp.isfinite(value)
    return stop, value, progress

  def update_fn(updates, state, params=None, value=None, **extra_args):
    del extra_args
    c = jnp.asarray(check_levels(levels, len(jax.tree.leaves(updates))))
    count = optax.safe_increment(state.count)
    stop, last_value, progress = progress_check(state, count, value)
    # The fast step and its check, every step (cheap): computing them after the switch
    # too keeps the fallback's state out of all but one conditional (a conditional that
    # passes a large state through copies it).
    direction, fast_state = fast.update(updates, state.fast, params)
    squared = jnp.stack([
        -jnp.vdot(g.astype(jnp.float32), u.astype(jnp.float32)).real
        for g, u in zip(jax.tree.leaves(updates), jax.tree.leaves(direction))])
    if c.shape[0] == 1:
      squared = jnp.sum(squared, keepdims=True)
    average = decay * state.average + (1 - decay) * squared
    level = jnp.sqrt(jnp.maximum(average, 0) / (1 - decay ** count.astype(jnp.float32)))
    fire = ~state.switched & (jnp.any(level > margin * c) | ~jnp.all(jnp.isfinite(level))
                              | stop)
    switched = state.switched | fire

    def started():
      fresh = fallback.init(params)
      return fresh if handover is None else handover(fresh, params, state.mass)

    def take_over(fallback_state):
      if params is not None:
        fallback_state = jax.lax.cond(fire, lambda _: started(),
                                      lambda _: fallback_state, None)
      return fallback.update(updates, fallback_state, params)

    if handover is not None:
      if params is None:
        raise ValueError('guarded_switch with handover needs the parameters: call '
                         'update(grads, state, params).')
      # The fast steps' gradient mass, up to the step before the switch (the switch's own
      # gradient goes to fallback's update).
      mass = state.mass + jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32)))
                                     for g in jax.tree.leaves(updates)])
    else:
      mass = state.mass

    direction, fallback_state = jax.lax.cond(
        switched, take_over, lambda fallback_state: (direction, fallback_state),
        state.fallback)
    keep = lambda new, old: jnp.where(state.switched, old, new)  # frozen after the switch
    return direction, GuardedState(
        fast=jax.tree.map(keep, fast_state, state.fast), fallback=fallback_state,
        average=keep(average, state.average), count=count, switched=switched,
        switch_step=jnp.where(fire, count, state.switch_step).astype(jnp.int32),
        last_value=keep(last_value, state.last_value), progress=keep(progress, state.progress),
        mass=jnp.where(switched, state.mass, mass))

  if min_progress is None:
    return optax.GradientTransformation(
        init_fn, lambda updates, state, params=None: update_fn(updates, state, params))
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
