"""Benchmark (not a test): the symmetric eigendecompositions behind the Kronecker statistics.

Blended MetaMD with ``statistics='kronecker'`` (the MNIST MLP's adaptive default) refreshes
inverse fourth roots of its Kronecker statistics with one symmetric eigendecomposition per
factor (``metamd_jax.statistics``). This script times, on whatever backend JAX runs on,

1. ``jax.lax.linalg.eigh`` of one ``n x n`` positive-definite matrix for each of its
   implementations the backend lowers (``default``, ``qr``, ``jacobi``), interleaved
   rounds, the median kept; and the largest deviation of each from the default's
   eigenvalues (relative to the largest);
2. with ``--wall-clock``, the MNIST MLP benchmark's held-out runs of adaptive MetaMD
   (``scripts.benchmark_wall_clock``) with the refresh's eigendecomposition swapped for
   each implementation: seconds for ``T`` steps and steps to Adam's final loss.

Usage (from the repository root)::

  python -m scripts.benchmark_roots --sizes 10,256,784 --json roots.json
  python -m scripts.benchmark_roots --wall-clock --out-dir runs/roots
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from metamd_jax import statistics
from scripts import benchmark_wall_clock, timing

IMPLEMENTATIONS = {'default': None, 'qr': jax.lax.linalg.EighImplementation.QR,
                   'jacobi': jax.lax.linalg.EighImplementation.JACOBI}


def eigh_with(implementation):
  """``(values, vectors)`` of a symmetric matrix, as ``jnp.linalg.eigh`` returns them."""
  def eigh(matrix):
    vectors, values = jax.lax.linalg.eigh(matrix, implementation=implementation)
    return values, vectors
  return eigh


@contextlib.contextmanager
def refresh_eigh(implementation):
  """Swap the eigendecomposition of :mod:`metamd_jax.statistics`'s root refresh."""
  original = statistics._eigh  # noqa: SLF001 - a benchmark of that private step
  if implementation is not None:
    statistics._eigh = eigh_with(implementation)  # noqa: SLF001
  try:
    yield
  finally:
    statistics._eigh = original  # noqa: SLF001


def spd(n: int, seed: int = 0) -> jax.Array:
  """A positive-definite ``n x n`` statistic like the optimiser's: ``G G^T / n + 1e-4 I``."""
  g = jax.random.normal(jax.random.key(seed), (n, 2 * n))
  return g @ g.T / n + 1e-4 * jnp.eye(n)


def time_eigh(sizes, repeats: int) -> dict:
  results = {}
  for n in sizes:
    matrix = spd(n)
    bodies, values = {}, {}
    for name, implementation in IMPLEMENTATIONS.items():
      fn = jax.jit(eigh_with(implementation))
      try:
        values[name] = np.asarray(fn(matrix)[0])
      except Exception as error:  # noqa: BLE001 - not every backend lowers every one
        results[f'{n}/{name}'] = {'error': f'{type(error).__name__}: {error}'[:300]}
        continue
      bodies[name] = timing.Timed(fn, (matrix,))
      bodies[name].calibrate(warm_up=1, repeats=repeats, min_sample_s=0.01)
    timing.round_robin(bodies)
    for name, body in bodies.items():
      deviation = np.max(np.abs(values[name] - values['default'])) / np.max(values['default'])
      results[f'{n}/{name}'] = {**body.summary(), 'max_relative_value_deviation':
                                float(deviation)}
      print(f'n={n} {name}: {body.median * 1e3:.3f} ms (eigenvalues within '
            f'{deviation:.1e} of the default)', flush=True)
  return results


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='10,256,784')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--wall-clock', action='store_true',
                      help='also re-time adaptive MetaMD on the MNIST MLP per implementation')
  parser.add_argument('--wall-clock-tasks', type=int, default=None,
                      help="held-out tasks of the wall-clock part (default: the benchmark's)")
  parser.add_argument('--out-dir', default=None,
                      help='write roots.json (and wall_clock_<implementation>.json) here')
  args = parser.parse_args(argv)
  try:
    sizes = [int(s) for s in args.sizes.split(',') if s]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    parser.error(f'--sizes takes matrix sizes >= 1 like 10,256,784, got {args.sizes!r}.')
  if args.repeats < 1:
    parser.error(f'--repeats must be >= 1, got {args.repeats}.')
  if args.wall_clock_tasks is not None and args.wall_clock_tasks < 1:
    parser.error(f'--wall-clock-tasks must be >= 1, got {args.wall_clock_tasks}.')
  out = pathlib.Path(args.out_dir) if args.out_dir else None
  if out:
    out.mkdir(parents=True, exist_ok=True)
  env = timing.environment()
  print(timing.describe_environment(env))
  payload = {'environment': env,
             'eigh': time_eigh(sizes, args.repeats)}
  if out:
    timing.write_json(out / 'roots.json', payload)
  if args.wall_clock:
    for name, implementation in IMPLEMENTATIONS.items():
      if payload['eigh'].get(f'784/{name}', {}).get('error'):
        continue
      print(f'== adaptive MetaMD with the {name} eigendecomposition', flush=True)
      with refresh_eigh(implementation):
        benchmark_wall_clock.main([
            '--optimizers', 'metamd_adaptive',
            *(['--num-tasks', str(args.wall_clock_tasks)] if args.wall_clock_tasks else []),
            *(['--json', str(out / f'wall_clock_{name}.json')] if out else [])])
  return payload


if __name__ == '__main__':
  main()
