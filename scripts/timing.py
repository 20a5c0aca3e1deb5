"""How the benchmark scripts measure: interleaved rounds, medians, and the environment.

A :class:`Timed` body is one (jitted) function and its arguments. :func:`round_robin` times
the contenders of a comparison in rounds: each round calls every body once, the first body
rotating from round to round, so that slow drifts of the machine (other processes,
frequency scaling, throttling) hit all contenders alike, and :func:`paired_ratio` compares
two bodies round by round. Every sample ends with ``jax.block_until_ready``, so that
asynchronous dispatch cannot hide the work.

:func:`environment` records what the figures depend on (code and library versions,
devices, CPU, thread settings, XLA flags) and :func:`describe_environment` prints it;
:func:`limit_blas_threads` caps the BLAS threads behind jaxlib's CPU LAPACK kernels.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jaxlib
import numpy as np
import optax

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Environment variables that set the thread count of OpenMP, OpenBLAS and MKL.
THREAD_VARIABLES = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')

# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


class Timed:
  """A benchmark body ``fn(*args)``, timed in samples of ``number`` calls and one sync.

  Args:
    fn: the function to time, usually jitted or compiled.
    args: its arguments.
    feedback: ``outputs -> args`` of the next call, for a body that consumes its own
      outputs (a training step's new parameters and optimiser state, donated buffers);
      ``None`` calls ``fn`` on the same ``args`` every time.
    clock: seconds as a float (``time.perf_counter``; tests pass a fake one).

  Attributes:
    number: calls per sample, set by :meth:`calibrate`.
    repeats: samples :func:`round_robin` takes, set by :meth:`calibrate`.
    samples: seconds per call, one entry per sample.
    last: the outputs of the last call.
  """

  def __init__(self, fn: Callable, args: tuple, feedback: Callable | None = None,
               clock: Callable[[], float] = time.perf_counter):
    self.fn = fn
    self.args = args
    self.feedback = feedback
    self.clock = clock
    self.number = 1
    self.repeats = 1
    self.samples: list[float] = []
    self.last = None

  def run(self) -> float:
    """``number`` calls and a sync; the seconds per call."""
    start = self.clock()
    for _ in range(self.number):
      out = self.fn(*self.args)
      if self.feedback is not None:
        self.args = self.feedback(out)
    jax.block_until_ready(out)
    self.last = out
    return (self.clock() - start) / self.number

  def calibrate(self, warm_up: int, repeats: int, min_sample_s: float = 0.0,
                min_repeats: int = 1, max_total_s: float = math.inf) -> float:
    """Warm up, then choose ``number`` and ``repeats`` from the fastest warm-up call.

    Args:
      warm_up: untimed calls (at least one; the first call of a jitted function compiles).
      repeats: samples to take (at most).
      min_sample_s: repeat short calls so that one sample lasts at least this long, which
        amortises dispatch and the clock's resolution.
      min_repeats: fewest samples of a slow body (see ``max_total_s``), if ``repeats``
        asks for as many.
      max_total_s: cap on the body's timed seconds; a slow body gets fewer samples.

    Returns:
      The fastest warm-up call, in seconds.
    """
    elapsed = min(self.run() for _ in range(max(1, warm_up)))
    self.number = max(1, math.ceil(min_sample_s / max(elapsed, 1e-7)))
    per_sample = max(elapsed, 1e-7) * self.number
    self.repeats = max(min(min_repeats, repeats), int(min(repeats, max_total_s / per_sample)))
    return elapsed

  @property
  def median(self) -> float:
    return statistics.median(self.samples)

  @property
  def quartiles(self) -> tuple[float, float]:
    q25, q75 = np.percentile(self.samples, [25, 75])
    return float(q25), float(q75)

  def summary(self) -> dict[str, float | int]:
    """Median, quartiles and minimum in milliseconds per call; samples and calls per sample."""
    q25, q75 = self.quartiles
    return {'median_ms': 1e3 * self.median, 'q25_ms': 1e3 * q25, 'q75_ms': 1e3 * q75,
            'min_ms': 1e3 * min(self.samples), 'repeats': len(self.samples),
            'calls_per_sample': self.number}


def round_robin(bodies: Mapping[str, Timed]) -> None:
  """Time the bodies in interleaved rounds until each has its ``repeats`` samples.

  Round ``r`` runs the bodies in their order rotated by ``r``, so that no body always runs
  first in a round or always right after the same other body (inheriting its cache state
  and its garbage); a body that has all its samples sits out the later rounds.
  """
  names = list(bodies)
  rounds = max((body.repeats for body in bodies.values()), default=0)
  for r in range(rounds):
    for i in range(len(names)):
      body = bodies[names[(r + i) % len(names)]]
      if len(body.samples) < body.repeats:
        body.samples.append(body.run())


def paired_ratio(numerator: Timed, denominator: Timed) -> float:
  """Median over rounds of the ratio of the two bodies' samples of the same round."""
  return statistics.median(a / b for a, b in zip(numerator.samples, denominator.samples))


class Stopwatch:
  """Wall time since it was made, and progress lines on stderr that show it."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self.start = clock()

  @property
  def elapsed(self) -> float:
    return self.clock() - self.start

  def log(self, message: str) -> None:
    print(f'[{self.elapsed:6.1f}s] {message}', file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Environment.
# ---------------------------------------------------------------------------


_BLAS_LIMITS = []  # Keeps the threadpoolctl limiters alive for the whole run.


def _threadpoolctl():
  """``threadpoolctl`` with scipy's LAPACK loaded (the one jaxlib calls), or ``None``."""
  try:
    import scipy.linalg.cython_lapack  # noqa: F401 - loads the LAPACK that jaxlib uses.
    import threadpoolctl
  except ImportError:
    return None
  return threadpoolctl


def limit_blas_threads(num_threads: int):
  """Cap the threads of the BLAS behind jaxlib's CPU LAPACK kernels (0: leave them as set).

  jaxlib's CPU Cholesky and triangular solves call scipy's LAPACK (OpenBLAS), whose worker
  threads busy-wait after each call. On a 2-core machine they then compete with XLA's own
  threads for the rest of the jitted function: once-per-call factorisations cost tens to
  hundreds of milliseconds instead of well under one. One thread measures the library
  rather than that interaction. The environment report shows the thread counts in effect.

  Returns:
    The ``threadpoolctl`` limiter (``restore_original_limits()`` lifts the cap), or
    ``None`` for 0 or without threadpoolctl (a scikit-learn dependency).
  """
  module = _threadpoolctl()
  if num_threads <= 0 or module is None:
    return None
  limiter = module.threadpool_limits(num_threads, user_api='blas')
  _BLAS_LIMITS.append(limiter)
  return limiter


def blas_threads() -> str:
  """The BLAS thread pools loaded in this process and their threads, e.g. ``openblas: 1``."""
  module = _threadpoolctl()
  if module is None:
    return 'unknown (threadpoolctl or scipy not installed)'
  pools = [f"{pathlib.Path(i['filepath']).name.split('-')[0].rstrip('_')}: {i['num_threads']}"
           for i in module.threadpool_info() if i['user_api'] == 'blas']
  return ', '.join(pools) or 'none found'


def _git_commit() -> str | None:
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=_ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):  # No git, or not a checkout.
    return None


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:  # Not Linux.
    pass
  return platform.processor() or 'unknown'


def environment() -> dict[str, Any]:
  """What the figures depend on: code and library versions, devices, CPU, threads, flags."""
  device = jax.devices()[0]
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:  # Not available on every OS.
    affinity = None
  return {
      'commit': _git_commit(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'numpy': np.__version__,
      'optax': optax.__version__,
      'python': platform.python_version(),
      'device': f'{device.platform}:{device.device_kind}',
      'num_devices': jax.device_count(),
      'num_processes': jax.process_count(),
      'cpu': _cpu_model(),
      'machine': platform.machine(),
      'cpu_count': os.cpu_count(),
      'cpu_affinity': affinity,
      'blas_threads': blas_threads(),
      'thread_variables': {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def describe_environment(env: Mapping[str, Any]) -> str:
  """Two report lines: the software, then the hardware and its thread settings."""
  threads = ''.join(f', {k}={v}' for k, v in env['thread_variables'].items())
  return (f"metamd_jax commit {env['commit']}, jax {env['jax']} (jaxlib {env['jaxlib']}), "
          f"numpy {env['numpy']}, optax {env['optax']}, python {env['python']}\n"
          f"device {env['device']} x{env['num_devices']} (processes: {env['num_processes']}), "
          f"CPU {env['cpu']} ({env['machine']}), os.cpu_count() = {env['cpu_count']} "
          f"(affinity {env['cpu_affinity']}), BLAS threads (jaxlib's LAPACK calls): "
          f"{env['blas_threads']}{threads}, XLA_FLAGS={env['xla_flags']!r}")


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
  """Write the figures (non-JSON values as strings) and say so."""
  pathlib.Path(path).write_text(json.dumps(payload, indent=2, default=str))
  print(f'wrote {path}')
