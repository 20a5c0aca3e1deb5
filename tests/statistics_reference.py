"""Float64 numpy references of the online statistics (:mod:`metamd_jax.statistics`),
from their definitions, and the parameter tree and divergence their tests run on: shared
by the tests of the statistics, of blended MetaMD and of the overshoot check."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import well_conditioned

import metamd_jax

SHAPES = {'w': (4, 3), 'b': (3,), 'conv': (2, 2, 2, 3), 'scalar': ()}


def tree(seed, scale=1.0, dtype=None):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


def random_divergence(seed=0, dtype=None, structure='kronecker'):
  """A random well-conditioned divergence for the parameters of :func:`tree`."""
  initial = metamd_jax.init_divergence(tree(0), 0.1, dtype=dtype, structure=structure)
  return well_conditioned(initial, seed=seed, noise=0.3)


def factored_statistics(grads_list):
  """Per leaf (jax.tree.leaves order), numpy float64: r_t and c_t from the definition.

  A leaf is a matrix with rows indexed by every axis but the last; ``r_i`` sums the
  squares of row ``i`` over its columns and over the steps so far, ``c_j`` column ``j``'s.
  """
  rows, columns = None, None
  for grads in grads_list:
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    new_rows, new_columns = [], []
    for g in leaves:
      if g.ndim == 0:
        new_rows.append(g ** 2)
        new_columns.append(g ** 2)
        continue
      matrix = g.reshape(-1, g.shape[-1])
      new_rows.append(np.array([row @ row for row in matrix]).reshape(g.shape[:-1]))
      new_columns.append(np.array([col @ col for col in matrix.T]))
    rows = new_rows if rows is None else [a + b for a, b in zip(rows, new_rows)]
    columns = new_columns if columns is None else [a + b for a, b in zip(columns, new_columns)]
  return rows, columns


def peak_statistics(grads_list, decay):
  """``'peak_average'`` from the definition: per leaf, the running maximum over the steps
  of the bias-corrected moving averages of the row and of the column sums of ``g^2``."""
  averages, peaks = None, None
  for t, grads in enumerate(grads_list, start=1):
    rows, columns = factored_statistics([grads])
    new = rows + columns
    averages = ([(1 - decay) * x for x in new] if averages is None
                else [decay * a + (1 - decay) * x for a, x in zip(averages, new)])
    corrected = [a / (1 - decay ** t) for a in averages]
    peaks = corrected if peaks is None else [np.maximum(p, c) for p, c in zip(peaks, corrected)]
  half = len(peaks) // 2
  return peaks[:half], peaks[half:]


def sizes(rows, columns):
  """Per leaf: ``(m, n)``, its numbers of rows and columns."""
  return [(max(np.size(r), 1), np.shape(c)[-1] if np.ndim(c) else 1)
          for r, c in zip(rows, columns)]


def factored_denominator(rows, columns, epsilon):
  """``K_t``'s diagonal, ``((r_i / n) (c_j / m))^{1/4} + delta``, flattened like
  :func:`conftest.flat`."""
  parts = []
  for r, c, (m, n) in zip(rows, columns, sizes(rows, columns)):
    product = r * c if np.ndim(r) == 0 else np.asarray(r)[..., None] * np.asarray(c)
    parts.append(np.ravel((product / (m * n)) ** 0.25 + epsilon))
  return np.concatenate(parts)


def inverse_fourth_root(statistic, other_size, epsilon, rho):
  """Numpy float64: ``(S / k + (epsilon + rho lambda_max) I)^{-1/4}``, full or diagonal."""
  mean = np.asarray(statistic, np.float64) / other_size
  if mean.ndim == 1:
    return (mean + epsilon + rho * mean.max()) ** -0.25
  values, vectors = np.linalg.eigh(mean)
  values = np.maximum(values, 0)
  return (vectors * (values + epsilon + rho * values.max()) ** -0.25) @ vectors.T


def block_root(statistic, other_size, epsilon, rho, block_size):
  """The root of a side: one root of the whole statistic, or, for a side longer than
  ``block_size``, the dense block-diagonal matrix of the roots of its diagonal blocks
  (``k = ceil(m / block_size)`` blocks of ``ceil(m / k)`` consecutive indices, the last
  shorter), each damped by its own largest eigenvalue."""
  size = statistic.shape[0]
  if statistic.ndim == 1 or block_size is None or size <= block_size:
    return inverse_fourth_root(statistic, other_size, epsilon, rho)
  count = -(-size // block_size)
  width = -(-size // count)
  root = np.zeros((size, size))
  for start in range(0, size, width):
    block = slice(start, min(start + width, size))
    root[block, block] = inverse_fourth_root(statistic[block, block], other_size, epsilon,
                                              rho)
  return root


def kronecker_roots(grads_list, refresh_every, epsilon, rho, max_dimension=1024,
                     block_size=None, refresh_growth=None, prior=None):
  """Per step, per leaf (``jax.tree.leaves`` order): the roots ``(A_t, B_t)`` in use,
  from the definition: ``L = sum G G^T``, ``R = sum G^T G`` (a leaf as an ``m x n``
  matrix, rows every axis but the last; a side over ``max_dimension`` keeps the diagonal,
  one over ``block_size`` its diagonal blocks), recomputed at steps ``1..k`` and
  ``1 + j k``, kept in between; with ``refresh_growth`` a leaf's are also recomputed at
  a step where ``sum ||G||^2`` exceeds ``1 + refresh_growth`` times its value at the
  leaf's last refresh. ``prior``: per leaf a mass ``mu``, the statistics started at
  ``mu / m I`` and ``mu / n I`` (their diagonals on a diagonal side) and the masses at
  ``mu``."""
  roots, current, lefts, rights, masses, refreshed = [], None, None, None, None, None
  if prior is not None:
    sizes = [(g.size // g.shape[-1], g.shape[-1]) if g.ndim else (1, 1)
             for g in jax.tree.leaves(grads_list[0])]
    start = lambda size, mu: (mu / size) * (  # noqa: E731
        np.ones(size) if size > max_dimension else np.eye(size))
    lefts = [start(m, mu) for (m, _), mu in zip(sizes, prior)]
    rights = [start(n, mu) for (_, n), mu in zip(sizes, prior)]
    masses = list(prior)
  for t, grads in enumerate(grads_list, start=1):
    matrices = [np.asarray(g, np.float64).reshape(-1, g.shape[-1] if g.ndim else 1)
                for g in jax.tree.leaves(grads)]
    new_lefts = [np.diag(m @ m.T) if m.shape[0] > max_dimension else m @ m.T
                 for m in matrices]
    new_rights = [np.diag(m.T @ m) if m.shape[1] > max_dimension else m.T @ m
                  for m in matrices]
    lefts = new_lefts if lefts is None else [a + b for a, b in zip(lefts, new_lefts)]
    rights = new_rights if rights is None else [a + b for a, b in zip(rights, new_rights)]
    step_masses = [float(np.sum(m ** 2)) for m in matrices]
    masses = step_masses if masses is None else [a + b for a, b in zip(masses, step_masses)]
    refreshed = [0.0] * len(matrices) if refreshed is None else refreshed
    scheduled = t <= refresh_every or (t - 1) % refresh_every == 0
    due = [scheduled or (refresh_growth is not None
                         and mass > (1 + refresh_growth) * before)
           for mass, before in zip(masses, refreshed)]
    fresh = [(block_root(left, m.shape[1], epsilon, rho, block_size),
              block_root(right, m.shape[0], epsilon, rho, block_size))
             for left, right, m in zip(lefts, rights, matrices)]
    current = [new if leaf_due else old for new, old, leaf_due
               in zip(fresh, current or fresh, due)]
    refreshed = [mass if leaf_due else before
                 for mass, before, leaf_due in zip(masses, refreshed, due)]
    roots.append(current)
  return roots


def dense(root):
  return root if root.ndim == 2 else np.diag(root)


def kronecker_inverse(roots):
  """``K_t^{-1} = A_t ⊗ B_t`` per leaf, block diagonal over the leaves, in the order of
  :func:`conftest.flat` (a leaf's row-major ``vec``: ``vec(A G B) = (A ⊗ B) vec(G)``
  for symmetric ``B``)."""
  blocks = [np.kron(dense(a), dense(b)) for a, b in roots]
  size = sum(b.shape[0] for b in blocks)
  full, offset = np.zeros((size, size)), 0
  for b in blocks:
    full[offset:offset + len(b), offset:offset + len(b)] = b
    offset += len(b)
  return full
