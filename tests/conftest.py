"""Shared fixtures and independent references for the tests."""

import os
import shutil
import sys
import tempfile

# Compiled programs are shared across tests and with the processes tests launch: many
# tests compile the same meta-step or training run again (a resumed launch, another
# optimiser of the same shape), and XLA compilation dominates small CPU tests. The cache
# lives for one session, so every session still compiles each program once.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix='metamd-jax-test-compilation-cache-')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _COMPILATION_CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The test programs are small and run briefly: LLVM's optimisation of the generated CPU
# code costs more than it saves (about half the time of a compile-bound test), and XLA's
# older CPU fusion emitters compile the same fusions in about half the time of the newer
# ones (a meta-step: 10.5 s -> 4.7 s). XLA's own graph optimisations still run, so the
# numerics are those of the real programs.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
for _flag in FAST_COMPILE.split():
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
# JAX writes the Python call stack of every operation (up to 100 frames) into the
# program's source locations; the tests read no XLA location, so each operation records
# only its own line (lowering is about a third of a test's compilation).
os.environ.setdefault('JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS', 'false')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_collection_modifyitems(config, items):
  """Tests marked ``heavy`` first, the rest in their order. The workers split the tests
  in two and then take from each other's queue end: with the long tests first, what is
  left at the end is short tests, and neither worker waits long for the other."""
  del config
  items.sort(key=lambda item: item.get_closest_marker('heavy') is None)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


def pytest_unconfigure(config):
  """A worker process (pytest-xdist) ends at once when its session is over. Its results
  have been sent by then; what is left is the interpreter's teardown, which frees every
  program the worker compiled and took seconds while the run waited for it."""
  if hasattr(config, 'workerinput'):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture
def x64():
  """Run a test with float64 enabled (and restore the previous setting after)."""
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


@pytest.fixture
def structure_checks(monkeypatch):
  """Records the ``name`` of every ``divergence.check_structure`` call and makes any
  ``divergence.apply_metric`` call fail: the code under test validates its trees
  without computing a metric product."""
  import metamd_jax.divergence as divergence_lib

  calls = []
  check = divergence_lib.check_structure
  monkeypatch.setattr(divergence_lib, 'check_structure',
                      lambda d, tree, name='params': calls.append(name) or check(d, tree, name))

  def no_metric_product(*args):
    raise AssertionError('apply_metric called')

  monkeypatch.setattr(divergence_lib, 'apply_metric', no_metric_product)
  return calls


def randomize(divergence, seed, scale=1.0, dtype=None):
  """Replace every meta-parameter by Gaussian noise (a random divergence)."""
  leaves, treedef = jax.tree_util.tree_flatten(divergence)
  rng = np.random.default_rng(seed)
  new = [jnp.asarray(scale * rng.standard_normal(np.shape(x)), dtype or x.dtype) for x in leaves]
  return jax.tree_util.tree_unflatten(treedef, new)


def dense_factor(raw, eps):
  """``A A^T + eps I`` (dense raw) or ``diag(a^2 + eps)`` (diagonal raw), in numpy float64."""
  raw = np.asarray(raw, np.float64)
  if raw.ndim == 2:
    return raw @ raw.T + eps * np.eye(raw.shape[0])
  return np.diag(raw * raw + eps)


def dense_metric(metric):
  """The full ``(size x size)`` metric acting on the row-major flattened leaf.

  Built from the definition alone: for a leaf whose matrix view is ``W`` (rows x cols,
  row-major), ``vec_r(L W R) = (L kron R) vec_r(W)``; axes are permuted explicitly.
  """
  import metamd_jax

  size = int(np.prod(metric.shape))
  if isinstance(metric, metamd_jax.ScalarMetric):
    return float(np.asarray(metric.scale, np.float64) ** 2 + metric.eps) * np.eye(size)
  if isinstance(metric, metamd_jax.DiagonalMetric):
    values = np.asarray(metric.scale, np.float64).ravel() ** 2 + metric.eps
    return np.diag(values)
  left = dense_factor(metric.left, metric.eps)
  right = dense_factor(metric.right, metric.eps)
  m_perm = np.kron(left, right)  # acts on the permuted leaf, row-major
  perm = tuple(metric.rows) + tuple(metric.cols)
  # index map: position in the permuted flattening -> position in the original flattening
  idx = np.arange(size).reshape(metric.shape).transpose(perm).ravel()
  dense = np.zeros((size, size))
  dense[np.ix_(idx, idx)] = m_perm
  return dense


def dense_block_metric(divergence):
  """The block-diagonal metric of a whole divergence on its leaves, flattened in order."""
  import metamd_jax.divergence as divergence_lib

  blocks = [dense_metric(m) for m in jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)]
  size = sum(b.shape[0] for b in blocks)
  full = np.zeros((size, size))
  offset = 0
  for b in blocks:
    full[offset:offset + b.shape[0], offset:offset + b.shape[0]] = b
    offset += b.shape[0]
  return full


def flat(tree):
  """All leaves of ``tree`` raveled and concatenated, in numpy float64."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
