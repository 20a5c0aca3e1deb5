"""The optax transformation against optax's own optimisers and dense references."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import randomize

import metamd_jax
from metamd_jax import divergence as divergence_lib
from metamd_jax import models


def _model_and_batch(name):
  rng = np.random.default_rng(0)
  if name == 'mlp':
    model = models.MLP(hidden_sizes=(32, 16), num_classes=5)
    x = rng.standard_normal((8, 12)).astype(np.float32)
  else:
    model = models.CNN(channels=(4, 6), num_classes=5)
    x = rng.standard_normal((8, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 5, size=8)
  params = model.init(jax.random.key(0), x)['params']

  def loss(p):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def _run(optimizer, params, loss, steps=5):
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


@pytest.mark.parametrize('model', ['mlp', 'cnn'])
def test_initial_divergence_reproduces_sgd(model):
  params, loss = _model_and_batch(model)
  divergence = metamd_jax.init_divergence(params, 0.05)
  ours = _run(metamd_jax.metamd(divergence), params, loss)
  reference = _run(optax.sgd(0.05), params, loss)
  chex.assert_trees_all_close(ours, reference, rtol=1e-6, atol=1e-6)


def _chains(divergence, lr):
  """Pairs (ours, optax reference) that must agree when the divergence is SGD(lr)."""
  return {
      'chain': (
          optax.chain(optax.clip_by_global_norm(0.1), optax.add_decayed_weights(1e-2),
                      metamd_jax.metamd(divergence)),
          optax.chain(optax.clip_by_global_norm(0.1), optax.add_decayed_weights(1e-2),
                      optax.sgd(lr)),
      ),
      'schedule': (
          metamd_jax.metamd(divergence, optax.linear_schedule(1.0, 0.2, 4)),
          optax.sgd(optax.linear_schedule(lr, 0.2 * lr, 4)),
      ),
      'multi_steps': (
          optax.MultiSteps(metamd_jax.metamd(divergence), every_k_schedule=2),
          optax.MultiSteps(optax.sgd(lr), every_k_schedule=2),
      ),
      'masked': (
          optax.chain(optax.masked(metamd_jax.metamd(divergence),
                                   lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
                      optax.masked(optax.sgd(3 * lr),
                                   lambda p: jax.tree.map(lambda x: x.ndim <= 1, p))),
          optax.chain(optax.masked(optax.sgd(lr),
                                   lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
                      optax.masked(optax.sgd(3 * lr),
                                   lambda p: jax.tree.map(lambda x: x.ndim <= 1, p))),
      ),
      'apply_if_finite': (
          optax.apply_if_finite(metamd_jax.metamd(divergence), max_consecutive_errors=3),
          optax.apply_if_finite(optax.sgd(lr), max_consecutive_errors=3),
      ),
  }


@pytest.mark.parametrize('name', ['chain', 'schedule', 'multi_steps', 'masked',
                                  'apply_if_finite'])
def test_composes_with_optax_wrappers(name):
  params, loss = _model_and_batch('mlp')
  divergence = metamd_jax.init_divergence(params, 0.05)
  ours, reference = _chains(divergence, 0.05)[name]
  chex.assert_trees_all_close(_run(ours, params, loss), _run(reference, params, loss),
                              rtol=1e-6, atol=1e-6)


def test_apply_if_finite_skips_non_finite_gradients():
  params, _ = _model_and_batch('mlp')
  divergence = metamd_jax.init_divergence(params, 0.05)
  optimizer = optax.apply_if_finite(metamd_jax.metamd(divergence), max_consecutive_errors=3)
  state = optimizer.init(params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  updates, state = optimizer.update(bad, state, params)
  assert int(state.notfinite_count) == 1
  chex.assert_trees_all_close(updates, jax.tree.map(jnp.zeros_like, params))


def test_inject_hyperparams_learning_rate():
  params, loss = _model_and_batch('mlp')
  divergence = randomize(metamd_jax.init_divergence(params, 0.05), seed=1, scale=0.5)
  optimizer = optax.inject_hyperparams(metamd_jax.metamd)(divergence=divergence,
                                                           learning_rate=0.5)
  state = optimizer.init(params)
  grads = jax.grad(loss)(params)
  updates, state = optimizer.update(grads, state, params)
  direction, _ = metamd_jax.scale_by_mirror_descent(divergence).update(
      grads, metamd_jax.scale_by_mirror_descent(divergence).init(params))
  chex.assert_trees_all_close(updates, jax.tree.map(lambda d: -0.5 * d, direction),
                              rtol=1e-6, atol=1e-8)
  state.hyperparams['learning_rate'] = jnp.asarray(0.25)
  updates, state = optimizer.update(grads, state, params)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda d: -0.25 * d, direction),
                              rtol=1e-6, atol=1e-8)


def test_jitted_update_does_not_recompile():
  params, loss = _model_and_batch('cnn')
  divergence = randomize(metamd_jax.init_divergence(params, 0.05), seed=2, scale=0.3)
  optimizer = metamd_jax.metamd(divergence)
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)
    return optimizer.update(grads, state, params)

  state = optimizer.init(params)
  grads = jax.grad(loss)(params)
  for _ in range(3):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert len(traces) == 1


def test_update_is_matrix_products_only():
  """No solve, Cholesky, root or eigendecomposition in the per-step update."""
  params, loss = _model_and_batch('cnn')
  divergence = randomize(metamd_jax.init_divergence(params, 0.05), seed=3, scale=0.3)
  optimizer = metamd_jax.metamd(divergence)
  state = optimizer.init(params)
  grads = jax.grad(loss)(params)
  jaxpr = str(jax.make_jaxpr(optimizer.update)(grads, state, params))
  assert 'dot_general' in jaxpr
  for primitive in ('cholesky', 'triangular_solve', 'eigh', 'sqrt', 'lu', 'svd',
                    'custom_linear_solve'):
    assert primitive not in jaxpr, primitive


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_keeps_parameter_dtype(dtype):
  params, loss = _model_and_batch('mlp')
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  divergence = randomize(metamd_jax.init_divergence(params, 0.05), seed=4, scale=0.3)
  optimizer = metamd_jax.metamd(divergence, 0.5)
  grads = jax.tree.map(lambda x: x.astype(dtype), jax.grad(loss)(params))
  updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves(new):
    assert leaf.dtype == dtype
  assert jax.tree.leaves(metamd_jax.mirror_step(divergence, params, grads))[0].dtype == dtype


@pytest.mark.parametrize('learning_rate', [0.0, -0.1, float('nan')])
def test_metamd_rejects_bad_learning_rate(learning_rate):
  params, _ = _model_and_batch('mlp')
  divergence = metamd_jax.init_divergence(params, 0.05)
  with pytest.raises(ValueError, match='learning_rate'):
    metamd_jax.metamd(divergence, learning_rate)


_FACTORIES = {
    'metamd': lambda d, lr: metamd_jax.metamd(d, lr),
    'adaptive': lambda d, lr: metamd_jax.adaptive_metamd(d, 1.0, lr),
    'blended': lambda d, lr: metamd_jax.blended_metamd(d, 1.0, 0.1, lr),
    'eigenbasis': lambda d, lr: metamd_jax.eigenbasis_metamd(
        d, [(np.ones(2), np.ones(2))], lr),
    'low_rank': lambda d, lr: metamd_jax.low_rank_metamd(d, 1, lr),
    'accelerated': lambda d, lr: metamd_jax.accelerated_metamd(d, 0.5, lr),
}


@pytest.mark.parametrize('name', sorted(_FACTORIES))
def test_every_optimiser_rejects_a_learning_rate_that_is_not_a_scalar(name):
  """``optax.scale_by_learning_rate(None)`` is the identity: ``None`` would step up the
  gradient. Anything but a real scalar or a schedule is named when the optimiser is built."""
  divergence = metamd_jax.init_divergence({'w': jnp.ones((2, 2))}, 0.1)
  for learning_rate in (None, True, '0.1', np.array([0.1, 0.1]), 1j):
    with pytest.raises(TypeError, match='learning_rate must be a positive float'):
      _FACTORIES[name](divergence, learning_rate)
  # The same factory with a positive scalar, a 0-d array or a schedule steps down the
  # gradient.
  for good in (0.5, jnp.asarray(0.5), optax.constant_schedule(0.5)):
    optimizer = _FACTORIES[name](divergence, good)
    params = {'w': jnp.ones((2, 2))}
    updates, _ = optimizer.update({'w': jnp.ones((2, 2))}, optimizer.init(params), params)
    assert (np.asarray(updates['w']) < 0).all(), (name, good)


@pytest.mark.parametrize('name', sorted(_FACTORIES) + ['blended_kronecker'])
def test_every_optimisers_state_holds_each_buffer_once(name):
  """A state passed to ``jax.jit(..., donate_argnums=...)`` may not hold one buffer twice."""
  params = {'w': jnp.ones((2, 2))}
  divergence = metamd_jax.init_divergence(params, 0.1)
  if name == 'blended_kronecker':
    optimizer = metamd_jax.blended_metamd(divergence, 1.0, 0.1, statistics='kronecker')
  else:
    optimizer = _FACTORIES[name](divergence, 0.5)
  leaves = jax.tree.leaves(optimizer.init(params))
  assert len({id(x) for x in leaves}) == len(leaves), name


@pytest.mark.parametrize('name', sorted(_FACTORIES))
def test_every_optimisers_state_round_trips_through_flax_serialization(name):
  """``flax.serialization.to_bytes`` (a flax ``TrainState``'s checkpoint) could not write
  the factors' operators; a state read back gives the same next update, bit for bit."""
  from flax import serialization

  params = {'w': jnp.ones((2, 2))}
  grads = {'w': jnp.full((2, 2), 0.3)}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          _FACTORIES[name](metamd_jax.init_divergence(params, 0.1), 0.5))
  _, state = optimizer.update(grads, optimizer.init(params), params)
  restored = serialization.from_bytes(optimizer.init(params), serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal(optimizer.update(grads, restored, params),
                              optimizer.update(grads, state, params))


def test_state_keeps_only_the_inverse_factors():
  """The state holds P and Q (one array per meta-parameter, of its shape), not L and R."""
  params, _ = _model_and_batch('cnn')
  divergence = randomize(metamd_jax.init_divergence(params, 0.05, max_factor_size=30), seed=5)
  state = metamd_jax.scale_by_mirror_descent(divergence).init(params)
  assert ([x.shape for x in jax.tree.leaves(state)]
          == [x.shape for x in jax.tree.leaves(divergence)])
  operators = jax.tree.leaves(state.preconditioner, is_leaf=divergence_lib.is_operator)
  assert any(o.left_inverse.ndim == 1 for o in operators)  # a diagonal factor (36 > 30 rows)
  for operator in operators:
    assert isinstance(operator, divergence_lib.KroneckerOperator)
    assert operator.left is None and operator.right is None


def test_init_checks_the_params_without_computing(structure_checks):
  params, _ = _model_and_batch('mlp')
  divergence = metamd_jax.init_divergence(params, 0.05)
  calls = structure_checks
  optimizer = metamd_jax.metamd(divergence)
  optimizer.init(params)
  assert calls == ['params']
  other = jax.tree.map(lambda x: x, params)
  other['Dense_0']['kernel'] = jnp.zeros((3, 32))
  with pytest.raises(ValueError, match=re.escape(
      "params leaf ['Dense_0']['kernel'] has shape (3, 32) but the divergence was built for "
      'shape (12, 32).')):
    optimizer.init(other)


def test_concrete_divergence_is_inverted_when_init_is_traced():
  """A jitted run holds a concrete divergence's inverse factors as constants: init inverts
  nothing at run time, and its state is the eager init's (the inverse of a dense factor)."""
  params, _ = _model_and_batch('mlp')
  divergence = randomize(metamd_jax.init_divergence(params, 0.05), seed=6, scale=0.3)
  optimizer = metamd_jax.metamd(divergence)
  jaxpr = str(jax.make_jaxpr(optimizer.init)(params))
  for primitive in ('cholesky', 'triangular_solve', 'lu', 'custom_linear_solve'):
    assert primitive not in jaxpr, primitive
  jitted = jax.tree.leaves(jax.jit(optimizer.init)(params))
  for got, want in zip(jitted, jax.tree.leaves(optimizer.init(params)), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  kernel = divergence['Dense_0']['kernel']
  dense = np.linalg.inv(np.asarray(kernel.factors()[0], np.float64))
  state = optimizer.init(params)
  operator = state[0].preconditioner['Dense_0']['kernel']
  np.testing.assert_allclose(np.asarray(operator.left_inverse), dense, rtol=1e-4, atol=1e-5)


def test_traced_divergence_is_inverted_in_init_and_differentiable():
  """Built inside a function of the divergence (as a meta-gradient through a training run
  does), init inverts the traced factors: the gradient of a loss after a step equals finite
  differences in float64."""
  with jax.enable_x64():
    params, loss = _model_and_batch('mlp')
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    divergence = randomize(metamd_jax.init_divergence(params, 0.05), seed=7, scale=0.3)
    grads = jax.grad(loss)(params)

    def after_one_step(div):
      optimizer = metamd_jax.metamd(div)
      updates, _ = optimizer.update(grads, optimizer.init(params), params)
      return loss(optax.apply_updates(params, updates))

    jaxpr = str(jax.make_jaxpr(after_one_step)(divergence))
    assert 'cholesky' in jaxpr
    # Compiled whole: op by op, the step and its gradient compile hundreds of programs.
    gradient = jax.jit(jax.grad(after_one_step))(divergence)
    direction = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(8).standard_normal(x.shape)), divergence)
    h = 1e-6
    loss_after_one_step = jax.jit(after_one_step)
    plus = loss_after_one_step(jax.tree.map(lambda x, d: x + h * d, divergence, direction))
    minus = loss_after_one_step(jax.tree.map(lambda x, d: x - h * d, divergence, direction))
    directional = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(gradient),
                                                      jax.tree.leaves(direction), strict=True))
    np.testing.assert_allclose(float(directional), float((plus - minus) / (2 * h)), rtol=1e-6)
