"""Benchmark (not a test): the cost of a MetaMD training step and the FLOP rate of its update.

Part 1 times one full jitted training step (forward, backward, optimiser update,
``optax.apply_updates``; softmax cross-entropy on random inputs and random labels) with
MetaMD (a random, dense, positive-definite Kronecker divergence), adaptive MetaMD and
blended MetaMD on the same divergence (``reference_norm=1.0``; ``blend_rate=0.03``; its
diagonal statistics, and Shampoo's full ones, ``statistics='kronecker'``, refreshed every
10 steps: ``blended_kron_metamd``; the diagonal one followed by Nesterov's momentum 0.9,
:func:`metamd_jax.nesterov_momentum`: ``blended_nesterov_metamd``),
``optax.adam(1e-3)`` and ``optax.sgd(0.1)`` on an MLP 784-256-256-10 and a small CNN, at
batch sizes 128 and 1024.
On the byte-level transformer language model (``--models transformer``; the sizes of
``configs/transformer_lm.py``: context 64, width 64, depth 2, 4 heads, a batch of 8 windows
of ``context`` random bytes, next-byte cross-entropy) the optimisers are MetaMD (the same
kind of divergence, ``dimension_numbers=models.transformer_axes``), adaptive MetaMD
(``adaptive_metamd(divergence, reference_norm=1.0)``), the project's AdamW baseline
``optax.adamw(1e-3, b2=0.95, weight_decay=0.1)`` (``experiments.builders.BASELINES``) and
``optax.contrib.muon(1e-2)`` (whose AdamW path takes the 3-D attention kernels, the
embeddings and the vectors); each is reported with its ratio to AdamW. The optimisers of
one model and batch are timed round-robin in the same loop so machine noise hits all alike;
each figure is the median over the repetitions.

Part 2 times the jitted MetaMD ``optimizer.update(grads, state, params)`` alone (fixed
gradients), counts its FLOPs analytically (per Kronecker leaf ``P @ G @ Q``: ``2 m m n`` +
``2 m n n`` for dense factors, ``m n`` for a diagonal one), cross-checks the count against
XLA's ``cost_analysis()`` and compares the achieved FLOP rate with that of plain float32
``jnp.dot`` calls timed in the same loop: the matmul of the update's largest product, a
1024^3 matmul, and the same set of products written directly in ``jnp``. It covers every
model of ``--models``, the transformer included.

Usage (from the repository root)::

  python -m scripts.benchmark_step                 # default settings, a few minutes on 2 cores
  python -m scripts.benchmark_step --quick         # smoke run
  python -m scripts.benchmark_step --models mlp,cnn                # without the transformer
  python -m scripts.benchmark_step --models transformer            # ~1 min on 2 cores
  python -m scripts.benchmark_step --models transformer --steps-only --optimisers metamd \
      --width 32 --context 16 --windows 4      # part 1 only, MetaMD and AdamW, a smaller model
  python -m scripts.benchmark_step --json out.json # also write the figures
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metamd_jax
from metamd_jax import divergence as divergence_lib
from metamd_jax import models
from scripts import inputs, timing
from scripts.inputs import init_params, perturbed_divergence

BATCH_SIZES = (128, 1024)
OPTIMISERS = ('metamd', 'adaptive_metamd', 'blended_metamd', 'blended_kron_metamd',
              'blended_nesterov_metamd', 'adam', 'sgd')
"""The optimisers on the MLP and the CNN; MetaMD's ratios are to Adam and to SGD, the
adaptive and blended variants' to MetaMD and to Adam."""
TRANSFORMER_OPTIMISERS = ('metamd', 'adaptive_metamd', 'adamw', 'muon')
"""The optimisers on the transformer; every ratio is to AdamW."""
REFERENCE = {'mlp': 'adam', 'cnn': 'adam', 'transformer': 'adamw'}
MODELS = tuple(REFERENCE)
NUM_CLASSES = 10
VOCAB_SIZE = 256
NAMES = {'metamd': 'MetaMD', 'adaptive_metamd': 'adaptive MetaMD',
         'blended_metamd': 'blended MetaMD',
         'blended_kron_metamd': "blended MetaMD, Shampoo's statistics",
         'blended_nesterov_metamd': "blended MetaMD with Nesterov's momentum", 'adam': 'Adam',
         'adamw': 'AdamW', 'sgd': 'SGD', 'muon': 'Muon'}
# Part 2 variants: the jitted ``optimizer.update(grads, state, params)`` returning
# ``(updates, state)`` (the figure for the target), the same with the state donated, the
# same returning only the updates, and the same products written directly in jnp.
UPDATE_VARIANTS = {
    'update': 'optimizer.update -> (updates, state)',
    'donated': 'same, state donated',
    'updates_only': 'same, returns updates only',
    'plain': 'plain jnp P @ G @ Q, same shapes',
}


# ---------------------------------------------------------------------------
# Set-up.
# ---------------------------------------------------------------------------


def is_language_model(name: str) -> bool:
  return name == 'transformer'


def optimisers_of(model_name: str, only: tuple[str, ...] | None = None
                  ) -> tuple[tuple[str, ...], str]:
  """``(optimiser names, the reference of the ratios)`` of a model.

  ``only``: a subset of the transformer's optimisers (the reference is always kept).
  """
  reference = REFERENCE[model_name]
  if not is_language_model(model_name):
    return OPTIMISERS, reference
  names = tuple(n for n in TRANSFORMER_OPTIMISERS if only is None or n in only or n == reference)
  return names, reference


def make_model(name: str, args: argparse.Namespace):
  """``(module, input shape without the batch axis)``; ``args``: the transformer's sizes."""
  if name == 'mlp':
    return models.MLP(hidden_sizes=(256, 256), num_classes=NUM_CLASSES), (784,)
  if name == 'cnn':
    return models.CNN(channels=(16, 32), num_classes=NUM_CLASSES), (28, 28, 1)
  if name == 'transformer':
    return inputs.transformer(args), (args.context,)
  raise ValueError(f'unknown model {name!r}; expected one of {", ".join(MODELS)}')


def model_params(name: str, args: argparse.Namespace):
  """``(module, input shape, initial params, dimension_numbers of the divergence)``."""
  model, input_shape = make_model(name, args)
  if is_language_model(name):
    return model, input_shape, inputs.transformer_params(model), models.transformer_axes
  return model, input_shape, init_params(model, input_shape), None


def make_batch(name: str, input_shape: tuple[int, ...], batch: int):
  """Random inputs and labels: features and classes, or byte windows and next bytes."""
  if is_language_model(name):
    (context,) = input_shape
    tokens = np.random.default_rng(batch).integers(0, VOCAB_SIZE, (batch, context + 1))
    return jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)
  kx, ky = jax.random.split(jax.random.key(batch))
  x = jax.random.normal(kx, (batch, *input_shape), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
  return x, y


def make_optimiser(name: str, params, dimension_numbers=None):
  """The optimiser ``name``; MetaMD's divergence: :func:`scripts.inputs.perturbed_divergence`."""
  if name in ('metamd', 'adaptive_metamd', 'blended_metamd', 'blended_kron_metamd',
              'blended_nesterov_metamd'):
    divergence = perturbed_divergence(params, dimension_numbers=dimension_numbers)
    if name == 'metamd':
      return metamd_jax.metamd(divergence)
    if name == 'blended_metamd':
      return metamd_jax.blended_metamd(divergence, reference_norm=1.0, blend_rate=0.03)
    if name == 'blended_kron_metamd':
      return metamd_jax.blended_metamd(divergence, reference_norm=1.0, blend_rate=0.03,
                                       statistics='kronecker')
    if name == 'blended_nesterov_metamd':
      return optax.chain(metamd_jax.blended_metamd(divergence, reference_norm=1.0,
                                                   blend_rate=0.03),
                         metamd_jax.nesterov_momentum(0.9))
    return metamd_jax.adaptive_metamd(divergence, reference_norm=1.0)
  if name == 'adam':
    return optax.adam(1e-3)
  if name == 'adamw':  # experiments.builders.BASELINES['adamw'] at its default rate here.
    return optax.adamw(1e-3, b2=0.95, weight_decay=0.1)
  if name == 'muon':
    return optax.contrib.muon(1e-2)
  if name == 'sgd':
    return optax.sgd(0.1)
  raise ValueError(name)


def make_step(model, optimiser, donate: bool):
  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimiser.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def xla_flops(jitted, *args) -> float | None:
  """XLA's FLOP count of ``jitted(*args)``, or ``None`` where the backend gives none.

  ``Compiled.cost_analysis()`` returns ``None`` where the backend has no cost model (it
  catches the ``NotImplementedError`` itself), a dict of estimates otherwise, or in older
  JAX versions a list with one dict per computation; a dict need not have a ``'flops'``
  entry. Errors in lowering or compiling are real: the same function is timed next.
  """
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


# ---------------------------------------------------------------------------
# Part 1: the full training step.
# ---------------------------------------------------------------------------


def bench_steps(model_name: str, batch: int, repeats: int, donate: bool,
                args: argparse.Namespace) -> dict:
  """Part 1 for one model and batch size (in windows of ``context`` bytes for a language
  model): every optimiser of :func:`optimisers_of` timed round-robin."""
  model, input_shape, params, dimension_numbers = model_params(model_name, args)
  x, y = make_batch(model_name, input_shape, batch)
  names, reference = optimisers_of(model_name, getattr(args, 'only', None))

  bodies, flops = {}, {}
  for name in names:
    optimiser = make_optimiser(name, params, dimension_numbers)
    step = make_step(model, optimiser, donate)
    p0 = jax.tree.map(jnp.copy, params)
    s0 = jax.jit(optimiser.init)(p0)  # One compilation, not one per operation and shape.
    flops[name] = xla_flops(step, p0, s0, x, y)
    bodies[name] = timing.Timed(step, (p0, s0, x, y),
                                feedback=lambda out, x=x, y=y: (out[0], out[1], x, y))
    bodies[name].calibrate(warm_up=3, repeats=repeats)  # The first call compiles.
  timing.round_robin(bodies)

  result = {'model': model_name, 'batch': batch, 'repeats': repeats,
            'tokens': batch * input_shape[0] if is_language_model(model_name) else None,
            'num_params': sum(p.size for p in jax.tree.leaves(params)),
            'optimisers': list(names), 'reference': reference, 'over_reference': {}}
  for name, body in bodies.items():
    result[name] = {
        **body.summary(),
        'xla_gflop': None if flops[name] is None else flops[name] / 1e9,
        'final_loss': float(body.last[2]),
    }
    result['over_reference'][name] = {
        'median': body.median / bodies[reference].median,
        'paired': timing.paired_ratio(body, bodies[reference]),
    }
  result['over_metamd'] = {name: {'median': body.median / bodies['metamd'].median,
                                   'paired': timing.paired_ratio(body, bodies['metamd'])}
                           for name, body in bodies.items()}
  for other in names:
    if other != 'metamd':
      result[f'metamd_over_{other}'] = bodies['metamd'].median / bodies[other].median
      result[f'metamd_over_{other}_paired'] = timing.paired_ratio(bodies['metamd'],
                                                                  bodies[other])
  return result


# ---------------------------------------------------------------------------
# Part 2: the MetaMD update alone, against plain matmuls.
# ---------------------------------------------------------------------------


def update_products(state) -> tuple[list[dict], float]:
  """The products of one MetaMD update, read off the cached preconditioner.

  Returns ``(products, elementwise_flops)``: one entry per matrix product (``lhs``, ``rhs``
  shapes and ``2 a b c`` FLOPs) and the FLOPs of diagonal-factor, scalar and learning-rate
  scalings (one per entry each).
  """
  precond = state[0].preconditioner
  products, elementwise = [], 0.0
  for leaf in jax.tree.leaves(precond, is_leaf=divergence_lib.is_operator):
    size = math.prod(leaf.shape)
    elementwise += size  # optax.scale_by_learning_rate.
    if isinstance(leaf, divergence_lib.KroneckerOperator):
      m = math.prod(leaf.shape[a] for a in leaf.rows)
      n = math.prod(leaf.shape[a] for a in leaf.cols)
      if leaf.left_inverse.ndim == 2:
        products.append({'lhs': (m, m), 'rhs': (m, n), 'flops': 2.0 * m * m * n})
      else:
        elementwise += m * n
      if leaf.right_inverse.ndim == 2:
        products.append({'lhs': (m, n), 'rhs': (n, n), 'flops': 2.0 * m * n * n})
      else:
        elementwise += m * n
    else:
      elementwise += size
  return products, elementwise


def plain_products(state, seed: int = 3):
  """The same ``P @ G @ Q`` products in plain ``jnp`` on fresh random arrays."""
  precond = state[0].preconditioner
  leaves = jax.tree.leaves(precond, is_leaf=divergence_lib.is_operator)
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(leaves)))
  operands = []
  for leaf in leaves:
    if isinstance(leaf, divergence_lib.KroneckerOperator):
      m = math.prod(leaf.shape[a] for a in leaf.rows)
      n = math.prod(leaf.shape[a] for a in leaf.cols)
      operands.append((jax.random.normal(next(keys), leaf.left_inverse.shape),
                       jax.random.normal(next(keys), (m, n)),
                       jax.random.normal(next(keys), leaf.right_inverse.shape)))

  def fn(ops):
    out = []
    for p, g, q in ops:
      pg = p @ g if p.ndim == 2 else p[:, None] * g
      out.append(pg @ q if q.ndim == 2 else pg * q[None, :])
    return out

  return jax.jit(fn), operands


def bench_updates(model_names, repeats: int, min_sample_s: float,
                  args: argparse.Namespace) -> dict:
  bodies: dict[str, timing.Timed] = {}
  info: dict[str, dict] = {}
  matmul_shapes: dict[tuple, None] = {}
  for model_name in model_names:
    _, _, params, dimension_numbers = model_params(model_name, args)
    optimiser = make_optimiser('metamd', params, dimension_numbers)
    state = optimiser.init(params)
    keys = jax.random.split(jax.random.key(2), len(jax.tree.leaves(params)))
    grads = jax.tree.unflatten(
        jax.tree.structure(params),
        [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, jax.tree.leaves(params))])
    products, elementwise = update_products(state)
    largest = max(products, key=lambda p: p['flops'])
    matmul_shapes[(largest['lhs'], largest['rhs'])] = None

    full = jax.jit(lambda g, s, p, opt=optimiser: opt.update(g, s, p))
    donated = jax.jit(lambda g, s, p, opt=optimiser: opt.update(g, s, p), donate_argnums=(1,))
    only = jax.jit(lambda g, s, p, opt=optimiser: opt.update(g, s, p)[0])
    plain, operands = plain_products(state)
    info[model_name] = {
        'matmul_flops': sum(p['flops'] for p in products),
        'elementwise_flops': elementwise,
        'xla_flops': xla_flops(full, grads, state, params),
        'xla_flops_plain': xla_flops(plain, operands),
        'num_products': len(products),
        'largest': largest,
        'state_mib': sum(x.nbytes for x in jax.tree.leaves(state)) / 2 ** 20,
    }
    bodies[f'{model_name}/update'] = timing.Timed(full, (grads, state, params))
    bodies[f'{model_name}/donated'] = timing.Timed(
        donated, (grads, jax.tree.map(jnp.copy, state), params),
        feedback=lambda out, g=grads, p=params: (g, out[1], p))
    bodies[f'{model_name}/updates_only'] = timing.Timed(only, (grads, state, params))
    bodies[f'{model_name}/plain'] = timing.Timed(plain, (operands,))

  matmul_shapes[((1024, 1024), (1024, 1024))] = None
  matmul = jax.jit(jnp.dot)
  for i, (lhs, rhs) in enumerate(matmul_shapes):
    ka, kb = jax.random.split(jax.random.key(10 + i))
    a = jax.random.normal(ka, lhs, jnp.float32)
    b = jax.random.normal(kb, rhs, jnp.float32)
    bodies[f'matmul {lhs}@{rhs}'] = timing.Timed(matmul, (a, b))

  for body in bodies.values():
    body.calibrate(warm_up=3, repeats=repeats, min_sample_s=min_sample_s)
  timing.round_robin(bodies)

  def matmul_rate(lhs, rhs):
    return 2.0 * lhs[0] * lhs[1] * rhs[1] / bodies[f'matmul {lhs}@{rhs}'].median

  big = ((1024, 1024), (1024, 1024))
  result = {'repeats': repeats, 'matmuls': {}, 'models': {}}
  for lhs, rhs in matmul_shapes:
    body = bodies[f'matmul {lhs}@{rhs}']
    result['matmuls'][f'{lhs}@{rhs}'] = {**body.summary(),
                                         'gflops': matmul_rate(lhs, rhs) / 1e9}
  for model_name, data in info.items():
    flops = data['matmul_flops']
    largest = data['largest']
    ref_largest = matmul_rate(largest['lhs'], largest['rhs'])
    ref_big = matmul_rate(*big)
    variants = {}
    for variant in UPDATE_VARIANTS:
      body = bodies[f'{model_name}/{variant}']
      rate = flops / body.median
      variants[variant] = {
          **body.summary(),
          'gflops': rate / 1e9,
          'fraction_of_largest_matmul': rate / ref_largest,
          'fraction_of_1024_matmul': rate / ref_big,
      }
    result['models'][model_name] = {
        **{k: v for k, v in data.items() if k != 'largest'},
        'largest_product': f"{largest['lhs']}@{largest['rhs']}",
        'variants': variants,
    }
  return result


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _fmt(value, spec='.2f'):
  return 'n/a' if value is None else format(value, spec)


def print_report(env: dict, steps: list[dict], updates: dict | None, args) -> None:
  print('## MetaMD step benchmark\n')
  print(timing.describe_environment(env))
  update_repeats = 'none (--steps-only)' if updates is None else updates['repeats']
  print(f'donated params/opt_state: {args.donate}; step repeats {args.repeats}, '
        f'update repeats {update_repeats}; medians, optimisers interleaved round-robin.\n')

  def cell(t):
    return f"{t['median_ms']:.2f} [{t['q25_ms']:.2f}-{t['q75_ms']:.2f}]"

  classic = [r for r in steps if not is_language_model(r['model'])]
  if classic:
    print('### Full training step (fwd + bwd + update + apply_updates), ms per step\n')
    print('| model | batch | MetaMD ms | Adam ms | SGD ms | MetaMD/Adam | MetaMD/SGD '
          '| XLA GFLOP/step MetaMD / SGD |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for r in classic:
      print(f"| {r['model']} | {r['batch']} "
            f"| {cell(r['metamd'])} | {cell(r['adam'])} | {cell(r['sgd'])} "
            f"| {r['metamd_over_adam']:.2f} (paired {r['metamd_over_adam_paired']:.2f}) "
            f"| {r['metamd_over_sgd']:.2f} (paired {r['metamd_over_sgd_paired']:.2f}) "
            f"| {_fmt(r['metamd']['xla_gflop'], '.3f')} / {_fmt(r['sgd']['xla_gflop'], '.3f')} |")
    print('\n[q25-q75] interquartile range; "paired" = median of per-round ratios.\n')
    print('Adaptive MetaMD (`reference_norm=1.0`) and blended MetaMD (`blend_rate=0.03`; '
          "diagonal statistics, and Shampoo's, refreshed every 10 steps) on the same "
          'divergence, the same step:\n')
    variants = ('adaptive_metamd', 'blended_metamd', 'blended_kron_metamd',
                'blended_nesterov_metamd')
    print('| model | batch | adaptive ms | blended ms | blended (Shampoo) ms '
          '| blended (Nesterov) ms | adaptive/MetaMD '
          '| blended/MetaMD | blended (Shampoo)/MetaMD | blended (Nesterov)/MetaMD '
          '| blended/Adam | blended (Shampoo)/Adam | blended (Nesterov)/Adam |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: '
          '| ---: |')
    for r in classic:
      ratios = [r['over_metamd'][name] for name in variants]
      ratios += [r['over_reference'][name] for name in variants[1:]]
      print(f"| {r['model']} | {r['batch']} | "
            + ' | '.join(cell(r[name]) for name in variants) + ' | '
            + ' | '.join(f"{x['median']:.2f} (paired {x['paired']:.2f})" for x in ratios)
            + ' |')
    print()

  language = [r for r in steps if is_language_model(r['model'])]
  if language:
    print('### Transformer LM training step (fwd + bwd + update + apply_updates), '
          'ms per step and ratio to AdamW\n')
    model, _ = make_model('transformer', args)
    print(f"{inputs.describe_transformer(model, language[0]['num_params'])}; batch: "
          f'windows of {args.context} random bytes, next-byte cross-entropy. MetaMD: '
          'perturbed divergence (init lr 0.1), attention kernels as '
          'width x (heads * head_dim) (models.transformer_axes); adaptive MetaMD: the same, '
          'reference_norm=1.0; AdamW: optax.adamw(1e-3, b2=0.95, weight_decay=0.1); Muon: '
          'optax.contrib.muon(1e-2). The optimisers of a row group interleaved '
          'round-robin in one loop.\n')
    print('| model | windows (tokens) | optimiser | ms [q25-q75] | / AdamW | paired / AdamW '
          '| XLA GFLOP/step | last loss |')
    print('| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |')
    for r in language:
      for name in r['optimisers']:
        ratio = r['over_reference'][name]
        print(f"| {r['model']} | {r['batch']} ({r['tokens']}) | {NAMES[name]} "
              f"| {cell(r[name])} | {ratio['median']:.2f} | {ratio['paired']:.2f} "
              f"| {_fmt(r[name]['xla_gflop'], '.4f')} | {r[name]['final_loss']:.3f} |")
    print('\n[q25-q75] interquartile range; "paired" = median of per-round ratios; last loss: '
          'the cross-entropy (nats) of the last timed step, on the same random batch.\n')

  if updates is None:
    return
  print('### MetaMD update alone: analytic FLOPs vs XLA cost_analysis\n')
  print('| model | products | analytic matmul GFLOP | + elementwise | analytic total '
        '| XLA flops (update) | XLA flops (plain P@G@Q) | preconditioner MiB |')
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for name, m in updates['models'].items():
    total = m['matmul_flops'] + m['elementwise_flops']
    print(f"| {name} | {m['num_products']} | {m['matmul_flops'] / 1e9:.4f} "
          f"| {m['elementwise_flops'] / 1e9:.6f} | {total / 1e9:.4f} "
          f"| {_fmt(None if m['xla_flops'] is None else m['xla_flops'] / 1e9, '.4f')} "
          f"| {_fmt(None if m['xla_flops_plain'] is None else m['xla_flops_plain'] / 1e9, '.4f')} "
          f"| {m['state_mib']:.2f} |")

  big = updates['matmuls'][f'{(1024, 1024)}@{(1024, 1024)}']
  print('\n### MetaMD update FLOP rate vs plain float32 jnp.dot (same run)\n')
  print('Reference matmuls (jitted jnp.dot, float32): ' + ', '.join(
      f"{shape}: {v['median_ms']:.3f} ms = {v['gflops']:.1f} GFLOP/s"
      for shape, v in updates['matmuls'].items()) + '\n')
  print('| model | variant | ms [q25-q75] | GFLOP/s | % of matmul of largest-product shape '
        '| % of 1024^3 matmul |')
  print('| --- | --- | ---: | ---: | ---: | ---: |')
  for name, m in updates['models'].items():
    for variant, label in UPDATE_VARIANTS.items():
      v = m['variants'][variant]
      print(f"| {name} | {label} | {v['median_ms']:.3f} [{v['q25_ms']:.3f}-{v['q75_ms']:.3f}] "
            f"| {v['gflops']:.1f} | {100 * v['fraction_of_largest_matmul']:.0f}% "
            f"(of {m['largest_product']}) | {100 * v['fraction_of_1024_matmul']:.0f}% |")
  print(f'\nGFLOP/s = analytic matmul FLOPs / median time of one call; big = {big["gflops"]:.1f} '
        'GFLOP/s. Target (issue): the update at >= 50% of a plain matmul\'s FLOP rate.')


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed rounds of the full step (default 20, 5 with --quick)')
  parser.add_argument('--update-repeats', type=int, default=None,
                      help='timed rounds of the update and matmul part (default 5 x repeats)')
  parser.add_argument('--quick', action='store_true', help='few repeats: a smoke run')
  parser.add_argument('--models', default='mlp,cnn,transformer',
                      help=f'comma-separated: {",".join(MODELS)}')
  parser.add_argument('--batch-sizes', default=','.join(map(str, BATCH_SIZES)),
                      help='comma-separated batch sizes of the MLP and the CNN')
  parser.add_argument('--windows', default=str(inputs.TRANSFORMER_WINDOWS),
                      help='comma-separated batch sizes of the transformer, in windows of '
                      '--context bytes')
  parser.add_argument('--optimisers', default=','.join(TRANSFORMER_OPTIMISERS),
                      help='comma-separated optimisers timed on the transformer, some of '
                      f'{",".join(TRANSFORMER_OPTIMISERS)}; adamw (the reference) always is')
  parser.add_argument('--steps-only', action='store_true',
                      help='part 1 only: skip the update FLOP-rate part')
  parser.add_argument('--donate', action='store_true',
                      help='donate params and optimiser state to the jitted step')
  parser.add_argument('--min-sample-ms', type=float, default=5.0,
                      help='part 2: repeat short calls so one sample lasts at least this long')
  parser.add_argument('--json', default=None, help='write the figures to this path')
  inputs.add_transformer_flags(parser)
  args = parser.parse_args(argv)
  if args.repeats is None:
    args.repeats = 5 if args.quick else 20
  if args.update_repeats is None:
    args.update_repeats = 5 * args.repeats
  if args.quick:
    args.min_sample_ms = min(args.min_sample_ms, 2.0)
  model_names = [m for m in args.models.split(',') if m]
  for name in model_names:
    if name not in MODELS:
      parser.error(f'unknown model {name!r} in --models; expected some of {", ".join(MODELS)}')
  args.only = tuple(o for o in args.optimisers.split(',') if o)
  for name in args.only:
    if name not in TRANSFORMER_OPTIMISERS:
      parser.error(f'unknown optimiser {name!r} in --optimisers; expected some of '
                   f'{", ".join(TRANSFORMER_OPTIMISERS)}')
  batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b]
  windows = [int(b) for b in args.windows.split(',') if b]

  stopwatch = timing.Stopwatch()
  env = timing.environment()
  steps = []
  for model_name in model_names:
    for batch in windows if is_language_model(model_name) else batch_sizes:
      steps.append(bench_steps(model_name, batch, args.repeats, args.donate, args))
      stopwatch.log(f'step {model_name} B={batch} done')
  updates = None
  if not args.steps_only:
    updates = bench_updates(model_names, args.update_repeats, args.min_sample_ms / 1e3, args)
    stopwatch.log('update/matmul part done')

  print_report(env, steps, updates, args)
  print(f'\ntotal wall time {stopwatch.elapsed:.0f} s')
  for r in steps:
    for name in r['optimisers']:
      if not math.isfinite(r[name]['final_loss']):
        print(f"warning: non-finite loss for {name} on {r['model']} B={r['batch']}")
  if args.json:
    timing.write_json(args.json, {'environment': env, 'args': vars(args), 'steps': steps,
                                  'updates': updates})


if __name__ == '__main__':
  main()
