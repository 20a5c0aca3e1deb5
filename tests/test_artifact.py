"""Saving and loading divergences: exact round trips, metadata and clear errors."""

import datetime
import json
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import randomize

import metamd_jax
from metamd_jax import artifact, models
from metamd_jax import divergence as divergence_lib


def _nested_params(seed=0, dtype=jnp.float32):
  """Nested dicts with a dense, a conv, a 1-D and a scalar leaf, and a list of blocks."""
  rng = np.random.default_rng(seed)

  def leaf(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  return {
      'encoder': {'dense': {'kernel': leaf(5, 3), 'bias': leaf(3)},
                  'conv': {'kernel': leaf(2, 3, 4, 6)}},
      'blocks': [{'w': leaf(3, 3)}, {'w': leaf(3, 2), 'gain': leaf()}],
      'temperature': leaf(),
  }


def _conv_axes(path, leaf):
  """A custom matrix view for the conv kernel only (rows out of order); defaults elsewhere."""
  del path
  if len(leaf.shape) == 4:
    return metamd_jax.KroneckerAxes(rows=(3, 0), cols=(1, 2))
  return divergence_lib.default_axes(leaf.shape)


def _mlp_params():
  model = models.MLP(hidden_sizes=(6,), num_classes=3)
  return model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))['params']


def _divergence(params, structure, seed=1, dtype=jnp.float32):
  if structure == 'kronecker':
    divergence = metamd_jax.init_divergence(params, 0.1, structure=structure, max_factor_size=4,
                                            dimension_numbers=_conv_axes)
  else:
    divergence = metamd_jax.init_divergence(params, 0.1, structure=structure)
  return randomize(divergence, seed, dtype=dtype)


def _metrics(divergence):
  return jax.tree.leaves(divergence, is_leaf=divergence_lib.is_metric)


def _assert_same_divergence(loaded, original):
  assert jax.tree.structure(loaded) == jax.tree.structure(original)
  assert (jax.tree.structure(loaded, is_leaf=divergence_lib.is_metric)
          == jax.tree.structure(original, is_leaf=divergence_lib.is_metric))
  for got, want in zip(_metrics(loaded), _metrics(original), strict=True):
    assert type(got) is type(want)
    for field in ('shape', 'rows', 'cols', 'eps'):
      assert getattr(got, field, None) == getattr(want, field, None), field
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(original), strict=True):
    assert isinstance(got, jax.Array)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _grads(params, seed=2):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


_mirror_step = jax.jit(metamd_jax.mirror_step)


def _assert_same_step(loaded, divergence, params):
  """The loaded divergence gives bitwise the same mirror step (one compilation for both)."""
  grads = _grads(params)
  want = _mirror_step(divergence, params, grads)
  got = _mirror_step(loaded, params, grads)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not all(np.array_equal(a, p) for a, p in zip(jax.tree.leaves(got),
                                                      jax.tree.leaves(params)))


@pytest.mark.parametrize('structure', ['kronecker', 'diagonal', 'scalar'])
@pytest.mark.parametrize('params_fn', [_nested_params, _mlp_params], ids=['nested', 'mlp'])
def test_round_trip_is_exact(tmp_path, structure, params_fn):
  params = params_fn()
  divergence = _divergence(params, structure)
  if structure == 'kronecker' and params_fn is _nested_params:
    metrics = _metrics(divergence)
    kinds = {type(m).__name__ for m in metrics}
    assert kinds == {'KroneckerMetric', 'ScalarMetric'}  # scalar leaves get a ScalarMetric
    assert any(m.left.ndim == 1 for m in metrics if hasattr(m, 'left'))  # diagonal factor
    assert any(m.cols == () for m in metrics if hasattr(m, 'cols'))  # a 1-D leaf
    conv = divergence['encoder']['conv']['kernel']
    assert (conv.rows, conv.cols) == ((3, 0), (1, 2))

  path = artifact.save_divergence(tmp_path / 'div.npz', divergence, params)
  assert path == tmp_path / 'div.npz'
  assert sorted(os.listdir(tmp_path)) == ['div.npz']  # no temporary files left behind
  loaded, metadata = artifact.load_divergence(path)

  _assert_same_divergence(loaded, divergence)
  assert metadata['num_leaves'] == len(_metrics(divergence))
  _assert_same_step(loaded, divergence, params)


def test_round_trip_keeps_tuples_lists_and_int_keys(tmp_path):
  params = {'layers': (jnp.ones((2, 3)), [jnp.ones(3), {7: jnp.ones((3, 1))}])}
  divergence = _divergence(params, 'kronecker')
  artifact.save_divergence(tmp_path / 'div.npz', divergence)
  loaded, metadata = artifact.load_divergence(tmp_path / 'div.npz')
  _assert_same_divergence(loaded, divergence)
  assert isinstance(loaded['layers'], tuple) and isinstance(loaded['layers'][1], list)
  assert metadata['leaves'][2]['path'] == [
      {'type': 'dict', 'key': 'layers', 'container': 'dict'},
      {'type': 'seq', 'key': 1, 'container': 'tuple'},
      {'type': 'seq', 'key': 1, 'container': 'list'},
      {'type': 'dict', 'key': 7, 'container': 'dict'}]


def test_single_leaf_divergence_round_trips(tmp_path):
  params = jnp.ones((4, 2))
  divergence = _divergence(params, 'kronecker')
  artifact.save_divergence(tmp_path / 'div.npz', divergence, params)
  loaded, metadata = artifact.load_divergence(tmp_path / 'div.npz')
  _assert_same_divergence(loaded, divergence)
  assert metadata['leaves'][0]['path'] == []


def test_metadata(tmp_path):
  params = _nested_params()
  divergence = _divergence(params, 'kronecker')
  config = ml_collections.ConfigDict({
      'learning_rate': 0.1, 'hidden_sizes': (8, 8), 'name': 'mlp',
      'optim': {'steps': 3, 'dtype': jnp.float32}, 'nan': float('nan')})
  before = datetime.datetime.now(datetime.UTC)
  artifact.save_divergence(tmp_path / 'div.npz', divergence, params, config=config,
                           extra_metadata={'meta_step': 12, 'seeds': (1, 2)})
  _, metadata = artifact.load_divergence(tmp_path / 'div.npz')

  assert metadata['format'] == 'metamd-divergence'
  assert metadata['format_version'] == 1
  assert metadata['library_version'] == metamd_jax.__version__
  assert metadata['jax_version'] == jax.__version__
  created = datetime.datetime.fromisoformat(metadata['created'])
  assert created.tzinfo is not None and before <= created <= datetime.datetime.now(datetime.UTC)
  assert metadata['config']['learning_rate'] == 0.1
  assert metadata['config']['hidden_sizes'] == [8, 8]
  assert metadata['config']['name'] == 'mlp'
  assert metadata['config']['optim']['steps'] == 3
  assert isinstance(metadata['config']['optim']['dtype'], str)  # repr of a non-JSON value
  assert metadata['config']['nan'] == 'nan'
  assert metadata['extra'] == {'meta_step': 12, 'seeds': [1, 2]}

  by_path = {leaf['path_str']: leaf for leaf in metadata['leaves']}
  conv = by_path["['encoder']['conv']['kernel']"]
  assert conv['kind'] == 'kronecker'
  assert conv['shape'] == [2, 3, 4, 6]
  assert (conv['rows'], conv['cols']) == ([3, 0], [1, 2])
  assert conv['eps'] == 1e-3
  assert conv['param_dtype'] == 'float32'
  assert conv['arrays']['left']['shape'] == [12]  # 6 * 2 > max_factor_size: diagonal
  assert conv['arrays']['right']['shape'] == [12]
  assert conv['arrays']['left']['dtype'] == 'float32'
  assert by_path["['temperature']"]['kind'] == 'scalar'
  assert by_path["['temperature']"]['arrays']['scale']['shape'] == []
  assert by_path["['blocks'][0]['w']"]['path'][1] == {'type': 'seq', 'key': 0,
                                                     'container': 'list'}


def test_dict_config_and_abstract_params(tmp_path):
  params = _nested_params(dtype=jnp.bfloat16)
  divergence = _divergence(params, 'diagonal')
  abstract = jax.eval_shape(lambda: params)
  artifact.save_divergence(tmp_path / 'div.npz', divergence, abstract, config={'a': (1, 'b')})
  _, metadata = artifact.load_divergence(tmp_path / 'div.npz')
  assert metadata['config'] == {'a': [1, 'b']}
  assert {leaf['param_dtype'] for leaf in metadata['leaves']} == {'bfloat16'}


def test_float64_round_trip(tmp_path, x64):
  params = _nested_params(dtype=jnp.float64)
  divergence = _divergence(params, 'kronecker', dtype=jnp.float64)
  assert {x.dtype for x in jax.tree.leaves(divergence)} == {jnp.dtype('float64')}
  artifact.save_divergence(tmp_path / 'div.npz', divergence, params)
  loaded, _ = artifact.load_divergence(tmp_path / 'div.npz')
  _assert_same_divergence(loaded, divergence)
  _assert_same_step(loaded, divergence, params)

  jax.config.update('jax_enable_x64', False)  # the fixture restores the setting
  with pytest.raises(ValueError, match='enable float64'):
    artifact.load_divergence(tmp_path / 'div.npz')


def test_bfloat16_round_trip(tmp_path):
  params = _nested_params()
  divergence = _divergence(params, 'kronecker', dtype=jnp.bfloat16)
  artifact.save_divergence(tmp_path / 'div.npz', divergence)
  loaded, metadata = artifact.load_divergence(tmp_path / 'div.npz')
  _assert_same_divergence(loaded, divergence)
  assert metadata['leaves'][0]['arrays']['left']['dtype'] == 'bfloat16'


def test_loaded_divergence_rejects_params_of_another_shape(tmp_path):
  params = _nested_params()
  divergence = _divergence(params, 'kronecker')
  artifact.save_divergence(tmp_path / 'div.npz', divergence, params)
  loaded, _ = artifact.load_divergence(tmp_path / 'div.npz')
  other = _nested_params()
  other['blocks'][1]['w'] = jnp.ones((4, 2))
  message = re.escape("['blocks'][1]['w'] has shape (4, 2)") + '.*' + re.escape('(3, 2)')
  with pytest.raises(ValueError, match=message):
    artifact.check_compatible(loaded, other)
  with pytest.raises(ValueError, match=message):
    artifact.check_compatible(loaded, jax.eval_shape(lambda: other))
  with pytest.raises(ValueError, match=message):
    metamd_jax.mirror_step(loaded, other, other)
  artifact.check_compatible(loaded, jax.eval_shape(lambda: params))  # matches: no error


def test_save_refuses_mismatched_params(tmp_path):
  params = _nested_params()
  divergence = _divergence(params, 'kronecker')
  other = dict(params, temperature=jnp.ones(2))
  with pytest.raises(ValueError, match=re.escape("['temperature'] has shape (2,)")):
    artifact.save_divergence(tmp_path / 'div.npz', divergence, other)
  assert not os.listdir(tmp_path)


def test_save_refuses_non_finite_meta_parameters(tmp_path):
  params = _nested_params()
  divergence = _divergence(params, 'diagonal')
  bad = divergence['encoder']['dense']['bias']
  divergence['encoder']['dense']['bias'] = divergence_lib.DiagonalMetric(
      bad.scale.at[1].set(jnp.nan), bad.shape, bad.eps)
  with pytest.raises(ValueError, match=re.escape("['encoder']['dense']['bias']") + '.*non-finite'):
    artifact.save_divergence(tmp_path / 'div.npz', divergence)
  assert not os.listdir(tmp_path)


def test_save_refuses_unsupported_containers(tmp_path):
  class Pair(NamedTuple):
    a: jax.Array
    b: jax.Array

  divergence = metamd_jax.init_divergence(Pair(jnp.ones(2), jnp.ones(3)), 0.1)
  with pytest.raises(ValueError, match='Pair.*only dicts, lists and tuples'):
    artifact.save_divergence(tmp_path / 'div.npz', divergence)
  divergence = metamd_jax.init_divergence({'a': jnp.ones(2), 'b': None}, 0.1)
  with pytest.raises(ValueError, match='key paths cannot describe'):
    artifact.save_divergence(tmp_path / 'div.npz', divergence)
  assert not os.listdir(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
  params = _nested_params()
  first = _divergence(params, 'kronecker', seed=1)
  path = artifact.save_divergence(tmp_path / 'div.npz', first)
  original_bytes = path.read_bytes()

  def interrupted_savez(file, **arrays):
    file.write(b'PK\x03\x04 partial')
    raise KeyboardInterrupt

  monkeypatch.setattr(np, 'savez', interrupted_savez)
  with pytest.raises(KeyboardInterrupt):
    artifact.save_divergence(path, _divergence(params, 'kronecker', seed=2))
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['div.npz']
  assert path.read_bytes() == original_bytes
  loaded, _ = artifact.load_divergence(path)
  _assert_same_divergence(loaded, first)

  second = _divergence(params, 'kronecker', seed=2)
  artifact.save_divergence(path, second)  # overwrites in place
  loaded, _ = artifact.load_divergence(path)
  _assert_same_divergence(loaded, second)


# ---------------------------------------------------------------------------
# Loading bad files.
# ---------------------------------------------------------------------------


def _saved(tmp_path):
  params = {'w': jnp.ones((3, 2)), 'b': jnp.ones(2)}
  path = artifact.save_divergence(tmp_path / 'div.npz', _divergence(params, 'kronecker'))
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return arrays, json.loads(str(arrays['__metadata__']))


def _write(path, arrays, metadata=None):
  if metadata is not None:
    arrays = dict(arrays, __metadata__=np.array(json.dumps(metadata)))
  with open(path, 'wb') as f:
    np.savez(f, **arrays)
  return path


def test_load_missing_file(tmp_path):
  path = tmp_path / 'missing.npz'
  with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
    artifact.load_divergence(path)


def test_load_garbage_file(tmp_path):
  path = tmp_path / 'garbage.npz'
  path.write_bytes(b'this is not an npz archive at all')
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*not a readable .npz'):
    artifact.load_divergence(path)
  npy = tmp_path / 'array.npy'
  np.save(npy, np.ones(3))
  with pytest.raises(ValueError, match=re.escape(str(npy)) + '.*not an .npz archive'):
    artifact.load_divergence(npy)


def test_load_npz_without_metadata(tmp_path):
  arrays, _ = _saved(tmp_path)
  del arrays['__metadata__']
  path = _write(tmp_path / 'plain.npz', arrays)
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*no '__metadata__'.*expected"):
    artifact.load_divergence(path)


def test_load_wrong_format(tmp_path):
  arrays, metadata = _saved(tmp_path)
  path = _write(tmp_path / 'other.npz', arrays, dict(metadata, format='something-else'))
  with pytest.raises(ValueError, match=re.escape(str(path))
                     + ".*format 'something-else'.*expected a 'metamd-divergence'"):
    artifact.load_divergence(path)


def test_load_future_format_version(tmp_path):
  arrays, metadata = _saved(tmp_path)
  path = _write(tmp_path / 'future.npz', arrays, dict(metadata, format_version=2))
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*format_version 2, newer than'):
    artifact.load_divergence(path)


def test_load_arrays_inconsistent_with_metadata(tmp_path):
  arrays, metadata = _saved(tmp_path)
  leaf = next(i for i, entry in enumerate(metadata['leaves']) if entry['path_str'] == "['w']")
  arrays[f'leaf_{leaf}/left'] = np.ones((2, 2), np.float32)
  path = _write(tmp_path / 'bad_shape.npz', arrays)
  with pytest.raises(ValueError, match=re.escape("['w']") + '.*shape \\(2, 2\\)'):
    artifact.load_divergence(path)

  arrays, metadata = _saved(tmp_path)
  metadata['leaves'][leaf]['shape'] = [4, 2]  # factors no longer fit the leaf
  metadata['leaves'][leaf]['arrays']['left']['shape'] = [3, 3]
  path = _write(tmp_path / 'bad_meta.npz', arrays, metadata)
  with pytest.raises(ValueError, match=re.escape("['w']") + '.*left factor has shape'):
    artifact.load_divergence(path)


def test_load_rejects_integer_factors(tmp_path):
  """A file whose factors are integers (metadata and arrays agreeing) is named on load:
  the metric would be truncated."""
  arrays, metadata = _saved(tmp_path)
  for leaf in metadata['leaves']:
    for entry in leaf['arrays'].values():
      arrays[entry['name']] = arrays[entry['name']].astype(np.int32)
      entry['dtype'] = 'int32'
  path = _write(tmp_path / 'int.npz', arrays, metadata)
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*must be a float array, got int32'):
    artifact.load_divergence(path)


def _corrupt_same_path(leaves):
  leaves["['layers'][1]"]['path'] = leaves["['layers'][0]"]['path']


def _corrupt_leaf_over_container(leaves):
  leaves["['head']"]['path'] = leaves["['layers'][0]"]['path'][:1]


def _corrupt_index(leaves):
  leaves["['layers'][1]"]['path'][1]['key'] = 5


def _corrupt_container(leaves):
  leaves["['layers'][1]"]['path'][1]['container'] = 'tuple'


@pytest.mark.parametrize('corrupt,message', [
    (_corrupt_same_path, 'duplicate key path'),
    (_corrupt_leaf_over_container, r'duplicate key path .*\(a leaf and a container\)'),
    (_corrupt_index, r'sequence indices \[0, 5\] are not contiguous'),
    (_corrupt_container, 'inconsistent container types'),
])
def test_load_rejects_inconsistent_key_paths(tmp_path, corrupt, message):
  params = {'layers': [jnp.ones((2, 3)), jnp.ones(3)], 'head': jnp.ones((3, 1))}
  path = artifact.save_divergence(tmp_path / 'div.npz', _divergence(params, 'kronecker'))
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  metadata = json.loads(str(arrays.pop('__metadata__')))
  corrupt({leaf['path_str']: leaf for leaf in metadata['leaves']})
  bad = _write(tmp_path / 'bad.npz', arrays, metadata)
  with pytest.raises(ValueError, match=re.escape(str(bad)) + '.*' + message):
    artifact.load_divergence(bad)


def test_reads_a_hand_made_version_1_file(tmp_path):
  """A format-1 file written without this library (numpy and json only, as documented in
  the module docstring) loads with its containers, kinds, dtypes and values."""
  import ml_dtypes

  rng = np.random.default_rng(0)
  left = rng.standard_normal((3, 3)).astype(np.float32)
  right = rng.standard_normal(2).astype(np.float32)  # a diagonal factor
  gain = np.asarray(0.75, ml_dtypes.bfloat16)
  scale = rng.standard_normal(4).astype(np.float32)

  def array(name, value, stored_as=None):
    return {'name': name, 'dtype': str(value.dtype), 'shape': list(value.shape),
            'stored_as': stored_as}

  net = {'type': 'dict', 'key': 'net', 'container': 'dict'}
  leaves = [
      {'path': [net, {'type': 'seq', 'key': 0, 'container': 'tuple'},
                {'type': 'seq', 'key': 0, 'container': 'list'}],
       'path_str': "['net'][0][0]", 'kind': 'kronecker', 'shape': [3, 2], 'eps': 1e-3,
       'rows': [0], 'cols': [1],
       'arrays': {'left': array('leaf_0/left', left), 'right': array('leaf_0/right', right)},
       'param_dtype': 'float32'},
      {'path': [net, {'type': 'seq', 'key': 1, 'container': 'tuple'},
                {'type': 'dict', 'key': 7, 'container': 'dict'}],
       'path_str': "['net'][1][7]", 'kind': 'scalar', 'shape': [], 'eps': 1e-3,
       'arrays': {'scale': array('leaf_1/scale', gain, 'uint16')}},
      {'path': [{'type': 'dict', 'key': 'scale', 'container': 'dict'}],
       'path_str': "['scale']", 'kind': 'diagonal', 'shape': [4], 'eps': 1e-2,
       'arrays': {'scale': array('leaf_2/scale', scale)}},
  ]
  metadata = {'format': 'metamd-divergence', 'format_version': 1, 'library_version': '0.1.0',
              'jax_version': '0.4.35', 'numpy_version': '1.26.4',
              'created': '2025-01-01T00:00:00+00:00', 'num_leaves': 3, 'leaves': leaves,
              'config': {'lr': 0.1}, 'extra': None}
  path = _write(tmp_path / 'v1.npz', {'leaf_0/left': left, 'leaf_0/right': right,
                                      'leaf_1/scale': gain.view(np.uint16),
                                      'leaf_2/scale': scale}, metadata)

  loaded, read = artifact.load_divergence(path)
  assert read == metadata
  assert isinstance(loaded['net'], tuple) and isinstance(loaded['net'][0], list)
  assert list(loaded['net'][1]) == [7]
  kron, scalar, diagonal = loaded['net'][0][0], loaded['net'][1][7], loaded['scale']
  assert type(kron) is divergence_lib.KroneckerMetric
  assert (kron.shape, kron.rows, kron.cols, kron.eps) == ((3, 2), (0,), (1,), 1e-3)
  assert type(scalar) is divergence_lib.ScalarMetric and scalar.scale.dtype == jnp.bfloat16
  assert type(diagonal) is divergence_lib.DiagonalMetric and diagonal.eps == 1e-2
  for got, want in ((kron.left, left), (kron.right, right), (scalar.scale, gain),
                    (diagonal.scale, scale)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)

  # The mirror step it gives, from the definition (numpy float64).
  params = {'net': ([jnp.zeros((3, 2))], {7: jnp.zeros(())}), 'scale': jnp.zeros(4)}
  grads = {'net': ([jnp.ones((3, 2))], {7: jnp.ones(())}), 'scale': jnp.ones(4)}
  new = metamd_jax.mirror_step(loaded, params, grads)
  big_l = left.astype(np.float64) @ left.T + 1e-3 * np.eye(3)
  big_r = np.diag(right.astype(np.float64) ** 2 + 1e-3)
  np.testing.assert_allclose(new['net'][0][0], -np.linalg.solve(big_l, np.ones((3, 2)))
                             @ np.linalg.inv(big_r), rtol=1e-4)
  np.testing.assert_allclose(new['scale'], -1.0 / (scale.astype(np.float64) ** 2 + 1e-2),
                             rtol=1e-5)
  np.testing.assert_allclose(new['net'][1][7], -1.0 / (0.75 ** 2 + 1e-3), rtol=1e-2)


def test_library_version_comes_from_the_installed_distribution(tmp_path, monkeypatch):
  import ast
  import importlib.metadata
  import inspect

  assert artifact.library_version() == importlib.metadata.version('metamd-jax')
  path = artifact.save_divergence(tmp_path / 'div.npz',
                                  _divergence({'w': jnp.ones((2, 2))}, 'scalar'))
  assert artifact.load_divergence(path)[1]['library_version'] == artifact.library_version()
  # Not from the package's __init__: artifact.py does not import the package it is part of.
  tree = ast.parse(inspect.getsource(artifact))
  imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
              for alias in node.names}
  assert 'metamd_jax' not in imported

  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  artifact.library_version.cache_clear()
  monkeypatch.setattr(importlib.metadata, 'version', not_installed)
  try:
    assert artifact.library_version() == 'unknown'
  finally:
    artifact.library_version.cache_clear()
