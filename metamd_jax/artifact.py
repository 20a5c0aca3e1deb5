"""Saving and loading a learned divergence as one versioned, self-describing file.

An artifact is a numpy ``.npz`` archive (numpy's own format, read with
``allow_pickle=False``): every meta-parameter array under a stable name plus one entry
``__metadata__`` holding a JSON string that describes the format, the library versions,
each metric and, optionally, the parameter dtypes and the experiment config. Arrays are
stored with their exact dtype and bits (``bfloat16`` and other ``ml_dtypes`` types as
raw unsigned integers of the same width), and files are written atomically, so an
interrupted save never leaves a half-written artifact behind.

Format version 1 (the current one). ``__metadata__`` is a JSON object with

- ``format``: ``'metamd-divergence'``; ``format_version``: ``1``;
- ``library_version``, ``jax_version``, ``numpy_version``, ``created`` (ISO 8601, UTC);
- ``num_leaves`` and ``leaves``, one entry per metric in flattening order:
  ``path`` (the key path in the params tree, a list of
  ``{'type': 'dict', 'key': str | int, 'container': 'dict'}`` or
  ``{'type': 'seq', 'key': int, 'container': 'list' | 'tuple'}`` entries, ``[]`` for a
  divergence that is a single metric), ``path_str`` (``jax.tree_util.keystr``),
  ``kind`` (``'kronecker'``, ``'diagonal'`` or ``'scalar'``), ``shape`` (of the
  parameter leaf), ``eps``, ``rows`` and ``cols`` (Kronecker only), ``arrays``
  (``{field: {'name', 'dtype', 'shape', 'stored_as'}}`` for the fields ``left``,
  ``right`` or ``scale``; ``stored_as`` is ``None`` or the unsigned-int dtype the bits
  are stored as) and, when params were given, ``param_dtype``;
- ``config`` and ``extra``: JSON or ``None``.

Each array ``name`` (``leaf_0/left``, ``leaf_0/right``, ``leaf_1/scale``, ...) is an
entry of the archive.

Why the key paths are this module's own: ``flax.serialization`` state dicts turn lists
and tuples into dicts with string keys (and int dict keys into strings), so they cannot
give a divergence back with the containers it had; the stored ``container`` of each key
does, and the nesting itself is rebuilt with ``flax.traverse_util.unflatten_dict``.

Examples:
  >>> import tempfile, pathlib, jax.numpy as jnp, metamd_jax
  >>> from metamd_jax import artifact
  >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
  >>> divergence = metamd_jax.init_divergence(params, learning_rate=0.1)
  >>> path = pathlib.Path(tempfile.mkdtemp()) / 'divergence.npz'
  >>> _ = artifact.save_divergence(path, divergence, params, config={'lr': 0.1})
  >>> loaded, metadata = artifact.load_divergence(path)
  >>> metadata['config']['lr'], metadata['format_version']
  (0.1, 1)
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import secrets
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from metamd_jax import divergence as divergence_lib
from metamd_jax.types import PyTree

PathLike = str | os.PathLike

FORMAT = 'metamd-divergence'
FORMAT_VERSION = 1
METADATA_KEY = '__metadata__'

_KIND_OF = {
    divergence_lib.KroneckerMetric: 'kronecker',
    divergence_lib.DiagonalMetric: 'diagonal',
    divergence_lib.ScalarMetric: 'scalar',
}
_CLASS_OF = {kind: cls for cls, kind in _KIND_OF.items()}
_ARRAY_FIELDS = {'kronecker': ('left', 'right'), 'diagonal': ('scale',), 'scalar': ('scale',)}
_CONTAINERS = {dict: 'dict', list: 'list', tuple: 'tuple'}


@functools.cache
def library_version() -> str:
  """The installed ``metamd-jax`` distribution's version (``'unknown'`` if not installed)."""
  try:
    return importlib.metadata.version('metamd-jax')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


# ---------------------------------------------------------------------------
# JSON helpers.
# ---------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
  """``value`` as plain JSON: tuples become lists, anything else unknown its ``repr``."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else repr(value)
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return repr(value)


def _config_to_dict(config: Any) -> dict:
  if hasattr(config, 'to_dict'):  # ml_collections ConfigDict / FrozenConfigDict.
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(
        f'config must be an ml_collections ConfigDict or a dict, got {type(config).__name__}.')
  return _json_safe(config)


# ---------------------------------------------------------------------------
# Key paths.
# ---------------------------------------------------------------------------


def _encode_path(divergence: PyTree, path: tuple) -> list[dict]:
  """JSON entries ``{'type': 'dict' | 'seq', 'key': ..., 'container': ...}`` for ``path``.

  Walks ``divergence`` along ``path`` to record each container's type, so that lists
  and tuples (and dicts) come back as they were.
  """
  entries = []
  node = divergence
  for depth, key in enumerate(path):
    where = jax.tree_util.keystr(tuple(path[:depth])) or '<root>'
    container = _CONTAINERS.get(type(node))
    if isinstance(key, jax.tree_util.DictKey) and container == 'dict':
      if not isinstance(key.key, (str, int)) or isinstance(key.key, bool):
        raise ValueError(
            f'cannot save the divergence: dict key {key.key!r} at {where} is a '
            f'{type(key.key).__name__}; only str and int keys are supported.')
      entries.append({'type': 'dict', 'key': key.key, 'container': 'dict'})
      node = node[key.key]
    elif isinstance(key, jax.tree_util.SequenceKey) and container in ('list', 'tuple'):
      entries.append({'type': 'seq', 'key': int(key.idx), 'container': container})
      node = node[key.idx]
    else:
      hint = (' (convert flax FrozenDicts with flax.core.unfreeze)'
              if isinstance(node, Mapping) else '')
      raise ValueError(
          f'cannot save the divergence: the node at {where} is a {type(node).__name__}; '
          f'only dicts, lists and tuples can be saved{hint}.')
  return entries


def _decode_key(entry: Any, leaf: str) -> tuple[str, str | int, str]:
  if not isinstance(entry, Mapping) or entry.get('type') not in ('dict', 'seq'):
    raise ValueError(f'{leaf}: bad key path entry {entry!r}; expected '
                     "{'type': 'dict' | 'seq', 'key': ...}.")
  kind, key = entry['type'], entry.get('key')
  container = entry.get('container', 'dict' if kind == 'dict' else 'list')
  if kind == 'dict' and (not isinstance(key, (str, int)) or container != 'dict'):
    raise ValueError(f'{leaf}: bad dict key path entry {entry!r}.')
  if kind == 'seq' and (not isinstance(key, int) or key < 0
                        or container not in ('list', 'tuple')):
    raise ValueError(f'{leaf}: bad sequence key path entry {entry!r}.')
  return kind, key, container


def _build_tree(paths: list[list], values: list, source: str) -> PyTree:
  """Rebuild nested dicts / lists / tuples from stored key paths (in flattening order).

  The nesting is ``flax.traverse_util.unflatten_dict``'s; the stored container types
  then turn the nodes recorded as sequences back into lists and tuples.
  """
  if len(paths) == 1 and not paths[0]:
    return values[0]
  flat: dict[tuple, Any] = {}
  containers: dict[tuple, str] = {}  # key-path prefix -> container type of that node
  for index, (path, value) in enumerate(zip(paths, values)):
    leaf = f'{source}: leaf {index}'
    if not path:
      raise ValueError(f'{leaf} has an empty key path but the divergence has several leaves.')
    keys: tuple = ()
    for entry in path:
      _, key, container = _decode_key(entry, leaf)
      if containers.setdefault(keys, container) != container:
        raise ValueError(f'{leaf}: inconsistent container types in the stored key paths.')
      keys += (key,)
    if keys in flat:
      raise ValueError(f'{leaf}: duplicate key path {path!r}.')
    flat[keys] = value
  for index, keys in enumerate(flat):
    if keys in containers:
      raise ValueError(f'{source}: leaf {index}: duplicate key path {paths[index]!r} (a leaf '
                       'and a container).')

  def restore(node: Any, prefix: tuple) -> Any:
    container = containers.get(prefix)
    if container is None:
      return node
    children = {key: restore(child, prefix + (key,)) for key, child in node.items()}
    if container == 'dict':
      return children
    if sorted(children) != list(range(len(children))):
      raise ValueError(f'{source}: sequence indices {sorted(children)} are not contiguous.')
    items = [children[i] for i in range(len(children))]
    return tuple(items) if container == 'tuple' else items

  return restore(traverse_util.unflatten_dict(flat), ())


# ---------------------------------------------------------------------------
# Arrays: exact dtypes and bits.
# ---------------------------------------------------------------------------


def _to_storable(value: np.ndarray) -> tuple[np.ndarray, str | None]:
  """Non-native dtypes (e.g. bfloat16) are stored as unsigned ints of the same width."""
  if value.dtype.isbuiltin == 1 and value.dtype.kind in 'biufc':
    return value, None
  if value.dtype.itemsize not in (1, 2, 4, 8):
    raise TypeError(f'cannot store meta-parameters of dtype {value.dtype}.')
  stored = value.view(np.dtype(f'<u{value.dtype.itemsize}'))
  return stored, str(stored.dtype)


def _resolve_dtype(name: str, leaf: str) -> np.dtype:
  try:
    return np.dtype(jnp.dtype(name))
  except TypeError as error:
    raise ValueError(f'{leaf}: unknown dtype {name!r} in the metadata.') from error


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def check_compatible(divergence: PyTree, params: PyTree) -> None:
  """Raise ``ValueError`` unless ``divergence`` was built for params of this structure.

  ``params`` may hold arrays or abstract ``jax.ShapeDtypeStruct`` leaves; nothing is
  computed (:func:`metamd_jax.divergence.check_structure`).

  Args:
    divergence: a divergence from :func:`metamd_jax.init_divergence` (or a loaded one).
    params: the parameters (or their shapes) to use it with.

  Raises:
    ValueError: naming the leaf path and both shapes where ``params`` do not match.
  """
  divergence_lib.check_structure(divergence, params)


def save_divergence(
    path: PathLike,
    divergence: PyTree,
    params: PyTree | None = None,
    *,
    config: Any = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Write ``divergence`` to one versioned ``.npz`` artifact at ``path``, atomically.

  The file is written to a temporary file in the same directory and moved into place
  with ``os.replace``, so ``path`` is either the previous file or the complete new one.

  Args:
    path: destination file (written exactly there; no suffix is added).
    divergence: a divergence (a pytree of dicts / lists / tuples of metrics).
    params: optional parameters (arrays or ``jax.ShapeDtypeStruct``); if given, the
      divergence must have been built for them, and their dtypes are recorded.
    config: optional ml_collections ``ConfigDict`` or dict, stored as JSON (tuples as
      lists, values JSON cannot hold as their ``repr``).
    extra_metadata: optional dict of further JSON-able information (stored under
      ``'extra'``, made JSON-safe the same way).

  Returns:
    The path written.

  Raises:
    ValueError: if the meta-parameters are not finite, ``params`` do not match, or the
      divergence's container types cannot be saved.
    TypeError: if ``divergence`` is not a divergence of metrics, or holds traced values.
    FileNotFoundError: if the destination directory does not exist.
  """
  path = pathlib.Path(path)
  divergence_lib.check_divergence(divergence)
  metric_paths, treedef = jax.tree_util.tree_flatten_with_path(
      divergence, is_leaf=divergence_lib.is_metric)
  for leaf_path, metric in metric_paths:
    if not divergence_lib.is_metric(metric):
      raise TypeError(
          f'cannot save divergence leaf {jax.tree_util.keystr(leaf_path)} of type '
          f'{type(metric).__name__}; save the divergence from init_divergence, not its '
          'operators or preconditioner.')
  param_dtypes = None
  if params is not None:
    check_compatible(divergence, params)
    param_dtypes = [
        None if isinstance(leaf, optax.MaskedNode)
        else str(np.dtype(leaf.dtype if hasattr(leaf, 'dtype') else jnp.result_type(leaf)))
        for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))]

  arrays: dict[str, np.ndarray] = {}
  leaves = []
  for index, (leaf_path, metric) in enumerate(metric_paths):
    kind = _KIND_OF[type(metric)]
    entry: dict[str, Any] = {
        'path': _encode_path(divergence, leaf_path),
        'path_str': jax.tree_util.keystr(leaf_path),
        'kind': kind,
        'shape': [int(d) for d in metric.shape],
        'eps': float(metric.eps),
        'arrays': {},
    }
    if kind == 'kronecker':
      entry['rows'] = [int(a) for a in metric.rows]
      entry['cols'] = [int(a) for a in metric.cols]
    for field in _ARRAY_FIELDS[kind]:
      value = getattr(metric, field)
      if isinstance(value, jax.core.Tracer):
        raise TypeError(f'cannot save divergence leaf {entry["path_str"]}: its {field} is a '
                        'traced value; save outside jit / grad.')
      value = np.asarray(value)
      stored, stored_as = _to_storable(value)
      name = f'leaf_{index}/{field}'
      arrays[name] = stored
      entry['arrays'][field] = {'name': name, 'dtype': str(value.dtype),
                                'shape': list(value.shape), 'stored_as': stored_as}
    if param_dtypes is not None:
      entry['param_dtype'] = param_dtypes[index]
    leaves.append(entry)

  rebuilt = _build_tree([leaf['path'] for leaf in leaves], [m for _, m in metric_paths],
                        str(path))
  if jax.tree.structure(rebuilt, is_leaf=divergence_lib.is_metric) != treedef:
    raise ValueError(
        'cannot save the divergence: its tree has nodes that key paths cannot describe '
        f'(e.g. None or empty containers): {treedef}.')

  metadata = {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'library_version': library_version(),
      'jax_version': jax.__version__,
      'numpy_version': np.__version__,
      'created': datetime.datetime.now(datetime.UTC).isoformat(),
      'num_leaves': len(leaves),
      'leaves': leaves,
      'config': None if config is None else _config_to_dict(config),
      'extra': None if extra_metadata is None else _json_safe(dict(extra_metadata)),
  }
  arrays[METADATA_KEY] = np.array(json.dumps(metadata, allow_nan=False))

  directory = path.parent
  if not directory.is_dir():
    raise FileNotFoundError(f'cannot save the divergence to {path}: directory {directory} '
                            'does not exist.')
  tmp = directory / f'.{path.name}.{secrets.token_hex(8)}.tmp'
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies.
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  try:  # Make the rename durable; best effort (not every platform allows this).
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
  except OSError:
    pass
  return path


def _read_metadata(npz: Any, path: pathlib.Path) -> dict:
  expected = (f'expected a {FORMAT!r} artifact written by '
              'metamd_jax.artifact.save_divergence')
  if METADATA_KEY not in npz.files:
    raise ValueError(f'{path} has no {METADATA_KEY!r} entry; {expected}.')
  raw = npz[METADATA_KEY]
  try:
    metadata = json.loads(str(raw[()]))
  except (ValueError, TypeError, IndexError) as error:
    raise ValueError(f'{path}: {METADATA_KEY!r} is not valid JSON; {expected}.') from error
  if not isinstance(metadata, dict):
    raise ValueError(f'{path}: {METADATA_KEY!r} is not a JSON object; {expected}.')
  if metadata.get('format') != FORMAT:
    raise ValueError(f'{path} has format {metadata.get("format")!r}; {expected}.')
  version = metadata.get('format_version')
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise ValueError(f'{path} has an invalid format_version {version!r}; expected an '
                     f'integer between 1 and {FORMAT_VERSION}.')
  if version > FORMAT_VERSION:
    raise ValueError(
        f'{path} has format_version {version}, newer than the version {FORMAT_VERSION} '
        f'supported by metamd_jax {library_version()}; upgrade metamd_jax (the file '
        f'was written by metamd_jax {metadata.get("library_version")}).')
  if not isinstance(metadata.get('leaves'), list) or not metadata['leaves']:
    raise ValueError(f'{path}: the metadata lists no divergence leaves.')
  return metadata


def _load_array(npz: Any, spec: Any, field: str, leaf: str) -> np.ndarray:
  if not isinstance(spec, Mapping) or not isinstance(spec.get('name'), str):
    raise ValueError(f'{leaf}: no array entry recorded for {field!r}.')
  name = spec['name']
  if name not in npz.files:
    raise ValueError(f'{leaf}: array {name!r} is missing from the file.')
  stored = npz[name]
  dtype = _resolve_dtype(str(spec.get('dtype')), leaf)
  stored_as = spec.get('stored_as')
  if stored_as is not None:
    if stored.dtype != np.dtype(stored_as) or stored.dtype.itemsize != dtype.itemsize:
      raise ValueError(f'{leaf}: array {name!r} is stored as {stored.dtype}, expected '
                       f'{stored_as} holding {dtype}.')
    value = stored.view(dtype)
  else:
    value = stored
  if value.dtype != dtype:
    raise ValueError(f'{leaf}: array {name!r} has dtype {value.dtype} but the metadata '
                     f'says {dtype}.')
  if list(value.shape) != list(spec.get('shape', [])):
    raise ValueError(f'{leaf}: array {name!r} has shape {tuple(value.shape)} but the '
                     f'metadata says {tuple(spec.get("shape", []))}.')
  if dtype.itemsize == 8 and dtype.kind in 'fc' and not jax.config.jax_enable_x64:
    raise ValueError(f'{leaf}: meta-parameters are {dtype}; enable float64 '
                     "(jax.config.update('jax_enable_x64', True)) to load them exactly.")
  return value


def _as_int_tuple(value: Any, leaf: str, name: str) -> tuple[int, ...]:
  if not isinstance(value, list) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise ValueError(f'{leaf}: {name} must be a list of integers, got {value!r}.')
  return tuple(value)


def _load_metric(npz: Any, entry: Any, leaf: str) -> Any:
  if not isinstance(entry, Mapping):
    raise ValueError(f'{leaf}: metadata entry is not an object.')
  kind = entry.get('kind')
  if kind not in _CLASS_OF:
    raise ValueError(f'{leaf}: unknown metric kind {kind!r}; expected one of '
                     f'{tuple(_CLASS_OF)}.')
  shape = _as_int_tuple(entry.get('shape'), leaf, 'shape')
  eps = entry.get('eps')
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f'{leaf}: eps must be a positive number, got {eps!r}.')
  specs = entry.get('arrays')
  if not isinstance(specs, Mapping):
    raise ValueError(f'{leaf}: no array entries recorded.')
  values = {field: _load_array(npz, specs.get(field), field, leaf)
            for field in _ARRAY_FIELDS[kind]}

  if kind == 'kronecker':
    rows = _as_int_tuple(entry.get('rows'), leaf, 'rows')
    cols = _as_int_tuple(entry.get('cols'), leaf, 'cols')
    if sorted(rows + cols) != list(range(len(shape))):
      raise ValueError(f'{leaf}: rows {rows} and cols {cols} do not list every axis of a '
                       f'leaf of shape {shape} exactly once.')
    for field, axes in (('left', rows), ('right', cols)):
      d = math.prod(shape[a] for a in axes)
      if values[field].shape not in ((d, d), (d,)):
        raise ValueError(f'{leaf}: {field} factor has shape {values[field].shape} but a leaf '
                         f'of shape {shape} with axes {axes} needs ({d}, {d}) or ({d},).')
    return divergence_lib.KroneckerMetric(jnp.asarray(values['left']),
                                          jnp.asarray(values['right']), shape, rows, cols, eps)
  expected = shape if kind == 'diagonal' else ()
  if values['scale'].shape != expected:
    raise ValueError(f'{leaf}: {kind} scale has shape {values["scale"].shape} but a leaf of '
                     f'shape {shape} needs {expected}.')
  return _CLASS_OF[kind](jnp.asarray(values['scale']), shape, eps)


def load_divergence(path: PathLike) -> tuple[PyTree, dict]:
  """Read an artifact written by :func:`save_divergence`.

  Args:
    path: the artifact file.

  Returns:
    ``(divergence, metadata)``: the divergence with the exact stored dtypes and values,
    its tree rebuilt from the stored key paths (dicts, lists, tuples), and the metadata
    dict (format, versions, per-leaf descriptions, config, extra metadata).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: naming ``path`` if it is not an ``.npz`` artifact of this format, has a
      newer ``format_version`` than this library supports, or holds arrays inconsistent
      with its metadata (naming the leaf); also for float64 meta-parameters when
      ``jax_enable_x64`` is off (they could not be restored exactly).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'no divergence artifact at {path}.')
  expected = (f'expected a {FORMAT!r} .npz artifact written by '
              'metamd_jax.artifact.save_divergence')
  try:
    npz = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
    raise ValueError(f'{path} is not a readable .npz archive ({error}); {expected}.') from error
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} is a single .npy array, not an .npz archive; {expected}.')
  with npz:
    try:
      metadata = _read_metadata(npz, path)
      metrics, paths = [], []
      for index, entry in enumerate(metadata['leaves']):
        leaf = f'{path}: leaf {index}'
        if isinstance(entry, Mapping) and isinstance(entry.get('path_str'), str):
          leaf += f' {entry["path_str"]}'
        metrics.append(_load_metric(npz, entry, leaf))
        if not isinstance(entry.get('path'), list):
          raise ValueError(f'{leaf}: no key path recorded.')
        paths.append(entry['path'])
    except (zipfile.BadZipFile, OSError, EOFError) as error:
      raise ValueError(f'{path}: corrupt .npz archive ({error}); {expected}.') from error
  divergence = _build_tree(paths, metrics, str(path))
  try:
    divergence_lib.check_divergence(divergence)
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from error
  return divergence, metadata
