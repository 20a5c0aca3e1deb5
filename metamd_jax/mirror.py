"""The mirror-descent step: closed form forward, implicit differentiation backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metamd_jax import divergence as divergence_lib
from metamd_jax import implicit_diff, linear_solve
from metamd_jax.types import PyTree


def step_optimality(new_params: PyTree, divergence: PyTree, params: PyTree,
                    grads: PyTree) -> PyTree:
  """``F = grad phi(x+) - grad phi(x) + g = M (x+ - x) + g``: zero at the mirror step."""
  diff = jax.tree.map(lambda a, b: a - b.astype(a.dtype), new_params, params)
  moved = divergence_lib.apply_metric(divergence, diff)
  return jax.tree.map(lambda m, g: m + g.astype(m.dtype), moved, grads)


def _closed_form(operators: PyTree, params: PyTree, grads: PyTree) -> PyTree:
  direction = divergence_lib.solve_metric(operators, grads)
  return jax.tree.map(lambda p, d: (p - d).astype(jnp.result_type(p)), params, direction)


def operator_step(operators: PyTree, params: PyTree, grads: PyTree, *,
                  solver: str | linear_solve.Solver = 'exact', **solver_options) -> PyTree:
  """:func:`mirror_step` with materialised metrics (:func:`divergence.operators`).

  The inner loop materialises the metrics once per run, so that each step, and each
  step's implicit VJP, is matrix products only. Gradients flow to ``operators``' factors.
  """
  solve = linear_solve.make_solver(solver, **solver_options)
  step = implicit_diff.custom_root(step_optimality, solve)(_closed_form)
  return step(operators, params, grads)


def mirror_step(divergence: PyTree, params: PyTree, grads: PyTree, *,
                solver: str | linear_solve.Solver = 'exact', **solver_options) -> PyTree:
  """One mirror-descent step with the step size folded into the divergence.

  .. math::

    \\theta^+ = \\arg\\min_x \\langle g, x \\rangle + B_\\phi(x, \\theta)
              = \\theta - M^{-1} g,

  i.e. ``W+ = W - L^{-1} G R^{-1}`` for a Kronecker leaf. Differentiable in all three
  arguments: the backward pass solves the adjoint system of the optimality condition
  ``M (theta+ - theta) + g = 0`` (implicit function theorem) with ``solver``, and never
  differentiates through the closed form.

  Args:
    divergence: the divergence (from :func:`metamd_jax.init_divergence`).
    params: current parameters ``theta``.
    grads: gradients ``g`` at ``params``.
    solver: adjoint solver, ``'exact'`` (Kronecker inverse, default), ``'cg'``,
      ``'neumann'``, ``'dense'`` or a callable ``solve(matvec, b, *args)`` (see
      :func:`metamd_jax.linear_solve.make_solver`).
    **solver_options: options of the matrix-free solvers (``tol``, ``maxiter``).

  Returns:
    The new parameters, with the dtypes of ``params``.
  """
  divergence_lib.check_divergence(divergence)
  # Clear errors (leaf path, both shapes) before tracing the custom VJP; computes nothing.
  divergence_lib.check_structure(divergence, params)
  divergence_lib.check_structure(divergence, grads, name='grads')
  return operator_step(divergence_lib.operators(divergence), params, grads, solver=solver,
                       **solver_options)
