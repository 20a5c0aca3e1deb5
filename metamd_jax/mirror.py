"""The mirror-descent step: the closed-form argmin of the strongly convex sub-problem."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from metamd_jax import divergence as divergence_lib

PyTree = Any


def mirror_step(divergence: PyTree, params: PyTree, grads: PyTree) -> PyTree:
  """One mirror-descent step with the step size folded into the divergence.

  .. math::

    \\theta^+ = \\arg\\min_x \\langle g, x \\rangle + B_\\phi(x, \\theta)
              = \\theta - M^{-1} g,

  i.e. ``W+ = W - L^{-1} G R^{-1}`` for a Kronecker leaf.

  Args:
    divergence: the divergence (from :func:`metamd_jax.init_divergence`).
    params: current parameters ``theta``.
    grads: gradients ``g`` at ``params``.

  Returns:
    The new parameters, with the dtypes of ``params``.
  """
  divergence_lib.check_divergence(divergence)
  direction = divergence_lib.solve_metric(divergence, grads)
  return jax.tree.map(lambda p, d: (p - d).astype(jnp.result_type(p)), params, direction)
