"""LanguageModelFamily and TransformerLM: windows, loss, evaluation, causality, Kronecker views."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metamd_jax
from metamd_jax import evaluation, models, text
from metamd_jax.tasks import LanguageModelFamily

CONTEXT = 16


@pytest.fixture(scope='module')
def regions():
  return text.split_text(text.load_text('python_docs'))


def _model():
  return models.TransformerLM(context=CONTEXT, width=16, depth=1, num_heads=2)


def _family(regions, **kwargs):
  options = dict(batch_size=4, context=CONTEXT, slice_size=2048, eval_windows=8,
                 test_windows=8, dimension_numbers=models.transformer_axes)
  options.update(kwargs)
  return LanguageModelFamily(regions['train'], regions['test'], _model(), **options)


def test_sample_is_deterministic_and_slices_fit(regions):
  family = _family(regions)
  a, b = family.sample(jax.random.key(3)), family.sample(jax.random.key(3))
  c = family.sample(jax.random.key(4))
  assert set(a) == {'init_key', 'order_key', 'start'}
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a['start'], c['start'])
  starts = np.asarray(family.sample_batch(jax.random.key(0), 64)['start'])
  assert starts.min() >= 0 and starts.max() <= len(regions['train']) - 2048
  assert len(np.unique(starts)) > 32


def test_batches_are_next_byte_windows_inside_the_slice(regions):
  family = _family(regions)
  tp = family.sample(jax.random.key(1))
  task = family.task(tp)
  stream = regions['train'].tokens
  start = int(tp['start'])
  seen = set()
  for step in range(5):
    x, y = (np.asarray(a) for a in task.batch(jnp.int32(step)))
    assert x.shape == y.shape == (4, CONTEXT) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
      # Locate the window in the slice: it must be there, contiguous.
      window = np.concatenate([row_x, row_y[-1:]]).astype(np.uint8).tobytes()
      where = stream[start:start + 2048].tobytes().find(window)
      assert where >= 0
      seen.add(where)
  assert len(seen) > 10  # different offsets across steps and rows
  x0, _ = task.batch(jnp.int32(0))
  np.testing.assert_array_equal(x0, task.batch(jnp.int32(0))[0])  # order is a function of step


def _numpy_cross_entropy(logits, y):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, np.asarray(y)[..., None], -1).mean()


def test_loss_and_evaluate_match_a_numpy_cross_entropy(regions):
  family = _family(regions)
  tp = family.sample(jax.random.key(2))
  task = family.task(tp)
  params = task.init()
  logits = jax.jit(family.logits)
  x, y = task.batch(jnp.int32(0))
  expected = _numpy_cross_entropy(logits(params, x), y)
  np.testing.assert_allclose(task.loss(params, (x, y)), expected, rtol=1e-5)
  # Untrained byte model: about log(256) nats.
  assert abs(expected - math.log(256)) < 0.5

  metrics = jax.jit(task.evaluate)(params)
  start = int(tp['start'])
  offsets = np.round(np.linspace(0, 2048 - CONTEXT - 1, 8)).astype(int)
  windows = np.stack([regions['train'].tokens[start + o:start + o + CONTEXT + 1]
                      for o in offsets]).astype(np.int32)
  train_ce = _numpy_cross_entropy(logits(params, windows[:, :-1]), windows[:, 1:])
  np.testing.assert_allclose(metrics['train_loss'], train_ce, rtol=1e-5)
  test = regions['test'].tokens
  offsets = np.round(np.linspace(0, len(test) - CONTEXT - 1, 8)).astype(int)
  windows = np.stack([test[o:o + CONTEXT + 1] for o in offsets]).astype(np.int32)
  test_ce = _numpy_cross_entropy(logits(params, windows[:, :-1]), windows[:, 1:])
  np.testing.assert_allclose(metrics['test_loss'], test_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['test_bits_per_byte'], test_ce / math.log(2), rtol=1e-5)


def test_transformer_is_causal_and_checks_its_context():
  model = _model()
  tokens = jax.random.randint(jax.random.key(0), (2, CONTEXT), 0, 256)
  params = model.init(jax.random.key(1), tokens)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 256)
  a, b = model.apply(params, tokens), model.apply(params, changed)
  assert a.shape == (2, CONTEXT, 256)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)
  assert not np.allclose(a[:, 10:], b[:, 10:], atol=1e-3)
  with pytest.raises(ValueError, match='exceeds the context'):
    model.apply(params, jnp.zeros((1, CONTEXT + 1), jnp.int32))


def test_kronecker_views_of_the_transformer_leaves(regions):
  family = _family(regions)
  params = family.init_params()
  divergence = metamd_jax.init_divergence(params, 0.1, dimension_numbers=family.dimension_numbers)
  attention = divergence['block_0']['attention']
  for name in ('query', 'key', 'value'):
    metric = attention[name]['kernel']
    assert (metric.rows, metric.cols) == ((0,), (1, 2))
    assert metric.left.shape == (16, 16) and metric.right.shape == (16, 16)
  out = attention['out']['kernel']
  assert (out.rows, out.cols) == ((0, 1), (2,))
  assert divergence['embedding']['embedding'].left.shape == (256, 256)
  assert divergence['position'].left.shape == (CONTEXT, CONTEXT)
  assert divergence['block_0']['LayerNorm_0']['scale'].left.shape == (16,) or \
      divergence['block_0']['LayerNorm_0']['scale'].left.shape == (16, 16)


def test_mirror_step_on_an_attention_kernel_matches_the_dense_metric(regions):
  """A 3-D query kernel viewed (d, heads * head_dim): the step is the dense (R kron L)^-1 g."""
  family = _family(regions)
  params = family.init_params()
  divergence = metamd_jax.init_divergence(params, 0.1, dimension_numbers=family.dimension_numbers)
  key = jax.random.key(5)
  metric = divergence['block_0']['attention']['query']['kernel']
  a = jax.random.normal(key, metric.left.shape)
  b = jax.random.normal(jax.random.fold_in(key, 1), metric.right.shape)
  divergence['block_0']['attention']['query']['kernel'] = dataclasses.replace(
      metric, left=a, right=b)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key, 2), p.shape), params)
  new = metamd_jax.mirror_step(divergence, params, grads)
  g = np.asarray(grads['block_0']['attention']['query']['kernel'], np.float64).reshape(16, 16)
  left = np.asarray(a, np.float64) @ np.asarray(a, np.float64).T + metric.eps * np.eye(16)
  right = np.asarray(b, np.float64) @ np.asarray(b, np.float64).T + metric.eps * np.eye(16)
  dense = np.kron(left, right)  # row-major vec(W) = (L kron R) vec for W -> L W R
  step = np.linalg.solve(dense, g.reshape(-1)).reshape(16, 2, 8)
  w = np.asarray(params['block_0']['attention']['query']['kernel'], np.float64)
  np.testing.assert_allclose(new['block_0']['attention']['query']['kernel'], w - step,
                             rtol=1e-3, atol=1e-4)


def test_training_with_metamd_lowers_the_loss(regions):
  family = _family(regions)
  tasks = family.sample_batch(jax.random.key(0), 2)
  divergence = metamd_jax.init_divergence(family.init_params(), 0.3,
                                          dimension_numbers=family.dimension_numbers)
  curves = evaluation.run(metamd_jax.metamd(divergence), family, tasks, 20, track_every=20)
  assert np.all(curves.train_losses[:, -1] < curves.train_losses[:, 0] - 0.5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(slice_size=CONTEXT), 'slice_size must satisfy'),
    (dict(batch_size=0), 'batch_size must be a positive int'),
    (dict(context=32), 'model context'),
])
def test_bad_arguments_name_the_problem(regions, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _family(regions, **kwargs)
