"""The mirror step's argument checks (its values and gradients: test_divergence.py and
test_implicit_diff.py)."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import metamd_jax


def _problem():
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
  grads = {'w': jnp.full((3, 2), 0.5), 'b': jnp.ones(2)}
  return metamd_jax.init_divergence(params, 0.1), params, grads


def test_mirror_step_checks_params_and_grads_without_computing(structure_checks):
  divergence, params, grads = _problem()
  calls = structure_checks
  new = metamd_jax.mirror_step(divergence, params, grads)
  assert calls == ['params', 'grads']
  np.testing.assert_allclose(new['w'], 1.0 - 0.1 * 0.5, rtol=1e-6)


def test_mismatched_grads_are_named():
  divergence, params, grads = _problem()
  with pytest.raises(ValueError, match=re.escape(
      "grads leaf ['w'] has shape (2, 3) but the divergence was built for shape (3, 2).")):
    metamd_jax.mirror_step(divergence, params, dict(grads, w=jnp.ones((2, 3))))
  with pytest.raises(ValueError, match=re.escape("leaves only in grads: ['c']")):
    metamd_jax.mirror_step(divergence, params, dict(grads, c=jnp.ones(2)))
  with pytest.raises(ValueError, match=re.escape("params leaf ['b'] has shape (3,)")):
    metamd_jax.mirror_step(divergence, dict(params, b=jnp.ones(3)), grads)
