"""Benchmark (not a test): the cost of a MetaMD training step and the FLOP rate of its update.

Part 1 times one full jitted training step (forward, backward, optimiser update,
``optax.apply_updates``; softmax cross-entropy on random inputs and random labels) with
MetaMD (a random, dense, positive-definite Kronecker divergence), ``optax.adam(1e-3)`` and
``optax.sgd(0.1)`` on an MLP 784-256-256-10 and a small CNN, at batch sizes 128 and 1024.
The three optimisers are timed round-robin in the same loop so machine noise hits all alike;
each figure is the median over the repetitions.

Part 2 times the jitted MetaMD ``optimizer.update(grads, state, params)`` alone (fixed
gradients), counts its FLOPs analytically (per Kronecker leaf ``P @ G @ Q``: ``2 m m n`` +
``2 m n n`` for dense factors, ``m n`` for a diagonal one), cross-checks the count against
XLA's ``cost_analysis()`` and compares the achieved FLOP rate with that of plain float32
``jnp.dot`` calls timed in the same loop: the matmul of the update's largest product, a
1024^3 matmul, and the same set of products written directly in ``jnp``.

Usage (from the repository root)::

  python -m scripts.benchmark_step                 # default settings, a few minutes on 2 cores
  python -m scripts.benchmark_step --quick         # smoke run
  python -m scripts.benchmark_step --json out.json # also write the figures
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import optax

import metamd_jax
from metamd_jax import divergence as divergence_lib
from metamd_jax import models
from scripts import timing
from scripts.inputs import init_params, perturbed_divergence

BATCH_SIZES = (128, 1024)
OPTIMISERS = ('metamd', 'adam', 'sgd')
NUM_CLASSES = 10
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


def make_model(name: str):
  """``(module, input shape without the batch axis)``."""
  if name == 'mlp':
    return models.MLP(hidden_sizes=(256, 256), num_classes=NUM_CLASSES), (784,)
  if name == 'cnn':
    return models.CNN(channels=(16, 32), num_classes=NUM_CLASSES), (28, 28, 1)
  raise ValueError(name)


def make_optimiser(name: str, params):
  if name == 'metamd':
    return metamd_jax.metamd(perturbed_divergence(params))
  if name == 'adam':
    return optax.adam(1e-3)
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


def bench_steps(model_name: str, batch: int, repeats: int, donate: bool) -> dict:
  model, input_shape = make_model(model_name)
  params = init_params(model, input_shape)
  kx, ky = jax.random.split(jax.random.key(batch))
  x = jax.random.normal(kx, (batch, *input_shape), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)

  bodies, flops = {}, {}
  for name in OPTIMISERS:
    optimiser = make_optimiser(name, params)
    step = make_step(model, optimiser, donate)
    p0 = jax.tree.map(jnp.copy, params)
    s0 = optimiser.init(p0)
    flops[name] = xla_flops(step, p0, s0, x, y)
    bodies[name] = timing.Timed(step, (p0, s0, x, y),
                                feedback=lambda out, x=x, y=y: (out[0], out[1], x, y))
    bodies[name].calibrate(warm_up=3, repeats=repeats)  # The first call compiles.
  timing.round_robin(bodies)

  result = {'model': model_name, 'batch': batch, 'repeats': repeats}
  for name, body in bodies.items():
    result[name] = {
        **body.summary(),
        'xla_gflop': None if flops[name] is None else flops[name] / 1e9,
        'final_loss': float(body.last[2]),
    }
  for other in ('adam', 'sgd'):
    result[f'metamd_over_{other}'] = bodies['metamd'].median / bodies[other].median
    result[f'metamd_over_{other}_paired'] = timing.paired_ratio(bodies['metamd'], bodies[other])
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


def bench_updates(model_names, repeats: int, min_sample_s: float) -> dict:
  bodies: dict[str, timing.Timed] = {}
  info: dict[str, dict] = {}
  matmul_shapes: dict[tuple, None] = {}
  for model_name in model_names:
    model, input_shape = make_model(model_name)
    params = init_params(model, input_shape)
    optimiser = make_optimiser('metamd', params)
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


def print_report(env: dict, steps: list[dict], updates: dict, args) -> None:
  print('## MetaMD step benchmark\n')
  print(timing.describe_environment(env))
  print(f'donated params/opt_state: {args.donate}; step repeats {args.repeats}, '
        f'update repeats {updates["repeats"]}; medians, optimisers interleaved round-robin.\n')

  print('### Full training step (fwd + bwd + update + apply_updates), ms per step\n')
  print('| model | batch | MetaMD ms | Adam ms | SGD ms | MetaMD/Adam | MetaMD/SGD '
        '| XLA GFLOP/step MetaMD / SGD |')
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  def cell(t):
    return f"{t['median_ms']:.2f} [{t['q25_ms']:.2f}-{t['q75_ms']:.2f}]"

  for r in steps:
    print(f"| {r['model']} | {r['batch']} "
          f"| {cell(r['metamd'])} | {cell(r['adam'])} | {cell(r['sgd'])} "
          f"| {r['metamd_over_adam']:.2f} (paired {r['metamd_over_adam_paired']:.2f}) "
          f"| {r['metamd_over_sgd']:.2f} (paired {r['metamd_over_sgd_paired']:.2f}) "
          f"| {_fmt(r['metamd']['xla_gflop'], '.3f')} / {_fmt(r['sgd']['xla_gflop'], '.3f')} |")
  print('\n[q25-q75] interquartile range; "paired" = median of per-round ratios.\n')

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
  parser.add_argument('--models', default='mlp,cnn', help='comma-separated: mlp,cnn')
  parser.add_argument('--batch-sizes', default=','.join(map(str, BATCH_SIZES)))
  parser.add_argument('--donate', action='store_true',
                      help='donate params and optimiser state to the jitted step')
  parser.add_argument('--min-sample-ms', type=float, default=5.0,
                      help='part 2: repeat short calls so one sample lasts at least this long')
  parser.add_argument('--json', default=None, help='write the figures to this path')
  args = parser.parse_args(argv)
  if args.repeats is None:
    args.repeats = 5 if args.quick else 20
  if args.update_repeats is None:
    args.update_repeats = 5 * args.repeats
  if args.quick:
    args.min_sample_ms = min(args.min_sample_ms, 2.0)
  model_names = [m for m in args.models.split(',') if m]
  batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b]

  stopwatch = timing.Stopwatch()
  env = timing.environment()
  steps = []
  for model_name in model_names:
    for batch in batch_sizes:
      steps.append(bench_steps(model_name, batch, args.repeats, args.donate))
      stopwatch.log(f'step {model_name} B={batch} done')
  updates = bench_updates(model_names, args.update_repeats, args.min_sample_ms / 1e3)
  stopwatch.log('update/matmul part done')

  print_report(env, steps, updates, args)
  print(f'\ntotal wall time {stopwatch.elapsed:.0f} s')
  for r in steps:
    for name in OPTIMISERS:
      if not math.isfinite(r[name]['final_loss']):
        print(f"warning: non-finite loss for {name} on {r['model']} B={r['batch']}")
  if args.json:
    timing.write_json(args.json, {'environment': env, 'args': vars(args), 'steps': steps,
                                  'updates': updates})


if __name__ == '__main__':
  main()
