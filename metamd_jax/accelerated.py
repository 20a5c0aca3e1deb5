"""Accelerated MetaMD: Nesterov's method in the learned geometry.

MetaMD (and its adaptive and blended variants) takes a plain mirror-descent step: it has
no momentum, while the optimisers that train convolutional networks fastest here (Muon,
Shampoo, PSGD-Kron) all carry one. METHOD.md section 7 names the principled route:
accelerated mirror descent. With a quadratic potential ``1/2 x^T (M / h) x`` (``M`` the
learned metric, ``h = step_factor * learning_rate``) Nesterov's method reads

.. math::

  y_{t+1} = x_t - h M^{-1} \\nabla f(x_t), \\qquad
  x_{t+1} = y_{t+1} + \\beta (y_{t+1} - y_t), \\qquad y_1 = x_1,

where the gradients are taken at ``x_t``, the parameters the optimiser returns. In the
velocity form this is ``optax.trace(beta, nesterov=True)`` applied to the mirror-descent
step and scaled by ``step_factor`` (:func:`nesterov_momentum`): with ``m_t`` the trace,
``y_{t+1} = x_{t+1} - step_factor * beta * m_t``.

The guarantee. If ``f`` is ``mu``-strongly convex and 1-smooth in the norm of ``M / h``
(``mu M / h <= nabla^2 f <= M / h``) and ``beta = (1 - sqrt(mu)) / (1 + sqrt(mu))``,
Nesterov's method gives (Nesterov 2004, section 2.2; Bubeck 2015, theorem 3.18)

.. math::

  f(y_t) - f^\\star \\le \\frac{1 + \\mu}{2} \\|x_1 - x^\\star\\|^2_{M/h}\\,
      e^{-(t - 1)\\sqrt{\\mu}},

against ``(1 - mu)^t`` for the plain step: the dependence on the condition number in
the learned geometry drops from ``1 / mu`` to ``1 / sqrt(mu)``. A fixed ``beta`` is the
accelerated method for ``mu = ((1 - beta) / (1 + beta))^2`` and so for every ``f`` that is
at least that strongly convex (0.9: ``mu = 1/361``; 0.5: ``mu = 1/9``). The default
``step_factor = 1/2`` makes the smoothness condition ``nabla^2 f <= 2 M / learning_rate``:
exactly where MetaMD's own step is stable on a quadratic (every direction of the
preconditioned curvature below 2). So wherever frozen MetaMD converges on a quadratic,
accelerated MetaMD converges too (every such direction is inside Nesterov's stability
region below), at the accelerated rate when ``f`` is at least
``((1 - beta) / (1 + beta))^2``-strongly convex in that norm; the factor is fixed by this
argument, not tuned. Nesterov's iteration itself is stable on a quadratic only for
preconditioned curvatures below ``2 (1 + beta) / (1 + 2 beta)`` (between 4/3 and 2), so a
factor of 1 would lose MetaMD's edge-of-stability steps. A smaller factor keeps all of
this: the smoothness condition ``nabla^2 f <= M / (step_factor * learning_rate)`` is then
weaker than MetaMD's stability, so it holds wherever that does; only the strong convexity
the rate asks for is measured in the larger metric ``M / h``. With ``beta = 0.9`` a factor
of 1/5 takes, in steady state, steps ``step_factor / (1 - beta) = 2`` times the plain
step's where the gradients agree, against 1 time at the default ``beta = 1/2``.

With the online scale of :func:`metamd_jax.adaptive_metamd` or
:func:`metamd_jax.blended_metamd` underneath, the metric ``M_t`` never decreases, so once the
smoothness condition holds for ``M_1`` it holds at every later step (the blend's online
half makes ``M_1`` smaller than ``M``, so for blended MetaMD the condition is on ``M_1``,
not on ``M``); the rate is claimed for a fixed metric only.

Cost: one more buffer the size of the parameters (the trace, as Adam's first moment) and
three elementwise operations per parameter.
"""

from __future__ import annotations

import math

import optax

from metamd_jax import adaptive, transform
from metamd_jax.types import PyTree

__all__ = ('accelerated_metamd', 'check_momentum', 'check_step_factor', 'nesterov_momentum')

DEFAULT_STEP_FACTOR = 0.5
"""``step_factor`` of the guarantee: stable wherever MetaMD's own step is."""


def check_momentum(momentum):
  """``momentum`` as a float in ``[0, 1)`` (a traced value is returned as it is).

  Raises:
    TypeError: if it is not a real number (a bool is not one).
    ValueError: if it is outside ``[0, 1)``.
  """
  value = adaptive.real_number(momentum, 'momentum', 'a float in [0, 1)')
  if value is None:
    return momentum
  if not 0 <= value < 1:  # NaN fails the comparison too
    raise ValueError(f'momentum must be a float in [0, 1), got {momentum!r}.')
  return value


def check_step_factor(step_factor):
  """``step_factor`` as a positive finite float (a traced value is returned as it is).

  Raises:
    TypeError: if it is not a real number (a bool is not one).
    ValueError: if it is not positive and finite.
  """
  value = adaptive.real_number(step_factor, 'step_factor', 'a positive finite float')
  if value is None:
    return step_factor
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f'step_factor must be a positive finite float, got {step_factor!r}.')
  return value


def nesterov_momentum(momentum: float = 0.5, step_factor: float = DEFAULT_STEP_FACTOR
                      ) -> optax.GradientTransformation:
  """Nesterov's momentum on the updates of a mirror-descent optimiser.

  Chain it after :func:`metamd_jax.metamd`, :func:`metamd_jax.adaptive_metamd` or
  :func:`metamd_jax.blended_metamd` (whose updates are already ``-h M_t^{-1} g``): the
  result is Nesterov's method in the learned geometry (see the module docstring).

  Args:
    momentum: ``beta`` in ``[0, 1)``; 0 gives the plain step times ``step_factor``. The
      default 0.5 was chosen on validation tasks of three image families (0.7 and 0.9
      trained worse there with learned divergences; experiments/RESULTS.md section 10).
      May be traced (e.g. an epoch's setting in :func:`metamd_jax.doubling_restarts`).
    step_factor: a positive number multiplying the step (default 1/2: the guarantee's;
      any factor up to 1/2 keeps its smoothness condition, see the module docstring).
      May be traced.

  Returns:
    An ``optax.GradientTransformation`` (its state is ``optax.trace``'s).

  Raises:
    TypeError: on a momentum or step factor that is not a real number.
    ValueError: on a momentum outside ``[0, 1)`` or a step factor that is not positive
      and finite.
  """
  beta = check_momentum(momentum)
  check_step_factor(step_factor)
  return optax.chain(optax.trace(decay=beta, nesterov=True), optax.scale(step_factor))


def accelerated_metamd(divergence: PyTree, momentum: float = 0.5,
                       learning_rate: optax.ScalarOrSchedule = 1.0,
                       step_factor: float = DEFAULT_STEP_FACTOR
                       ) -> optax.GradientTransformation:
  """Accelerated MetaMD: Nesterov's method with the learned metric ``M``.

  ``optax.chain(metamd(divergence, learning_rate), nesterov_momentum(momentum,
  step_factor))``; see the module docstring for its guarantee.

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence`.
    momentum: ``beta`` in ``[0, 1)`` (default 0.5; see :func:`nesterov_momentum`).
    learning_rate: a positive float or an optax schedule multiplying the learned step.
    step_factor: a positive number (default 1/2).

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax, metamd_jax
    >>> params = {'w': jnp.ones((4, 3))}
    >>> divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
    >>> optimizer = metamd_jax.accelerated_metamd(divergence, momentum=0.9)
    >>> state = optimizer.init(params)
    >>> updates, state = optimizer.update({'w': jnp.ones((4, 3))}, state, params)
    >>> round(float(updates['w'][0, 0]), 3)  # -0.5 * 0.1 * (1 + 0.9)
    -0.095

  References:
    Nesterov (1983; 2004, section 2.2); Allen-Zhu & Orecchia (2017), linear coupling;
    Sutskever et al. (2013), the velocity form.
  """
  transform.check_learning_rate(learning_rate)
  return optax.chain(transform.metamd(divergence, learning_rate),
                     nesterov_momentum(momentum, step_factor))
