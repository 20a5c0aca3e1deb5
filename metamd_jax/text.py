"""Byte-level text for language-model task families, from files every Python ships.

A text is a :class:`Text`: a ``uint8`` array of bytes (vocabulary 256, one token per
byte, no tokenizer to ship or download). Sources:

* ``'python_docs'``: the language-reference topics of ``pydoc_data.topics`` (English
  prose with code examples, about 465 KB in CPython 3.11), topics in sorted order;
* ``'python_stdlib'``: the standard library's own ``.py`` files, in sorted path order
  (``test``, ``idlelib`` and ``site-packages`` left out), the first ``max_bytes`` bytes;
* ``'text_file'``: a user's plain-text file (``task.data_dir``: a ``.txt`` file, or a
  directory holding exactly one).

The bytes depend on the installed Python version (its docs and sources), so figures are
reproducible for one interpreter; :attr:`Text.source` records where they came from.

Regions: :func:`split_text` cuts a text into three contiguous regions, in order,
``'train'`` (meta-training slices, the first 80%), ``'heldout'`` (slices for held-out
tasks, the next 10%) and ``'test'`` (held-out evaluation text, the last 10%), so no
held-out task trains on text that meta-training saw and no task evaluates on text it
trained on. A text whose content changes along the file (the standard library's modules in
path order) then gives regions of different kinds; with ``block_size = b`` the regions are
cut from interleaved blocks of ``b`` bytes instead (of every ten blocks, eight go to
``'train'``, one to ``'heldout'`` and one to ``'test'``), still disjoint, each drawn from
the whole file.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from pathlib import Path

import numpy as np

__all__ = [
  'REGIONS',
  'REGION_FRACTIONS',
  'TEXTS',
  'Text',
  'load_python_docs',
  'load_python_stdlib',
  'load_text',
  'load_text_file',
  'split_text',
]

PathLike = str | os.PathLike[str]

TEXTS: tuple[str, ...] = ('python_docs', 'python_stdlib', 'text_file')
"""Names accepted by :func:`load_text`."""

REGIONS: tuple[str, ...] = ('train', 'heldout', 'test', 'all')
"""Values accepted for ``region`` (see :func:`split_text`)."""

REGION_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
"""Fractions of a text in the ``'train'``, ``'heldout'`` and ``'test'`` regions."""

STDLIB_MAX_BYTES = 4_000_000
"""Default number of bytes :func:`load_python_stdlib` reads."""

_STDLIB_SKIP = ('test', 'tests', 'idlelib', 'site-packages', 'dist-packages', '__pycache__')


@dataclasses.dataclass(frozen=True, eq=False)
class Text:
  """A byte stream.

  Attributes:
    tokens: ``(n,)`` ``uint8`` bytes; token ``i`` is byte ``tokens[i]`` (vocabulary 256).
    name: a short name (``'python_docs'``, ``'python_docs:train'``, ...).
    source: where the bytes came from (a path or a module).
  """

  tokens: np.ndarray
  name: str
  source: str

  def __post_init__(self):
    tokens = np.asarray(self.tokens)
    if tokens.ndim != 1:
      raise ValueError(f'text {self.name!r}: tokens must be 1-D, got shape {tokens.shape}')
    if tokens.dtype != np.uint8:
      raise ValueError(f'text {self.name!r}: tokens must be uint8 bytes, got {tokens.dtype}')
    object.__setattr__(self, 'tokens', tokens)

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  vocab_size = 256


def _from_bytes(data: bytes, name: str, source: str) -> Text:
  return Text(np.frombuffer(data, dtype=np.uint8).copy(), name, source)


def load_python_docs() -> Text:
  """The language-reference topics of ``pydoc_data.topics``, sorted by topic name."""
  try:
    from pydoc_data import topics
  except ImportError as error:  # some minimal interpreters strip it
    raise ValueError('text python_docs needs pydoc_data.topics, which this Python '
                     'install lacks; use python_stdlib or a text_file') from error
  parts = [topics.topics[name] for name in sorted(topics.topics)]
  return _from_bytes('\n\n'.join(parts).encode('utf-8'), 'python_docs', topics.__file__)


def _stdlib_files(root: Path) -> list[Path]:
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP)
    files.extend(Path(directory) / name for name in names if name.endswith('.py'))
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_python_stdlib(max_bytes: int = STDLIB_MAX_BYTES) -> Text:
  """The standard library's ``.py`` sources, concatenated in sorted path order.

  Args:
    max_bytes: how many bytes to keep (the first ``max_bytes`` of the concatenation).

  Returns:
    The :class:`Text`.
  """
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
    raise ValueError(f'max_bytes must be a positive int, got {max_bytes!r}')
  root = Path(sysconfig.get_paths()['stdlib'])
  if not root.is_dir():
    raise ValueError(f'text python_stdlib: the standard library directory {str(root)!r} '
                     'does not exist')
  chunks, total = [], 0
  for path in _stdlib_files(root):
    data = path.read_bytes()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  if not chunks:
    raise ValueError(f'text python_stdlib: no .py files under {str(root)!r}')
  return _from_bytes(b''.join(chunks)[:max_bytes], 'python_stdlib', str(root))


def load_text_file(path: PathLike) -> Text:
  """A user's plain-text file: a ``.txt`` path, or a directory with exactly one.

  The bytes are used as they are (any encoding; one token per byte).

  Raises:
    FileNotFoundError: when the path does not exist or a directory holds no ``.txt``.
    ValueError: when a directory holds several ``.txt`` files or the file is empty.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'text_file: {str(path)!r} does not exist (task.data_dir must '
                            'be a .txt file or a directory with one)')
  if path.is_dir():
    candidates = sorted(path.glob('*.txt'))
    if not candidates:
      raise FileNotFoundError(f'text_file: no .txt file in the directory {str(path)!r}')
    if len(candidates) > 1:
      raise ValueError(f'text_file: the directory {str(path)!r} holds several .txt files '
                       f'({", ".join(p.name for p in candidates)}); name one in task.data_dir')
    path = candidates[0]
  data = path.read_bytes()
  if not data:
    raise ValueError(f'text_file: {str(path)!r} is empty')
  return _from_bytes(data, path.stem, str(path))


def load_text(name: str, data_dir: PathLike | None = None, region: str = 'all',
              block_size: int = 0) -> Text:
  """A text by name, whole or one region of it (:func:`split_text`).

  Args:
    name: one of :data:`TEXTS`.
    data_dir: the file or directory of ``'text_file'`` (ignored by the others).
    region: one of :data:`REGIONS`.
    block_size: 0 (contiguous regions) or the bytes per interleaved block
      (:func:`split_text`).

  Raises:
    ValueError: on an unknown name or region, ``'text_file'`` without ``data_dir``, or a
      bad ``block_size``.
  """
  if name not in TEXTS:
    raise ValueError(f'unknown text {name!r}; valid names are {", ".join(TEXTS)}')
  if region not in REGIONS:
    raise ValueError(f'unknown region {region!r}; valid regions are {", ".join(REGIONS)}')
  if name == 'python_docs':
    text = load_python_docs()
  elif name == 'python_stdlib':
    text = load_python_stdlib()
  else:
    if not data_dir:
      raise ValueError("text 'text_file' is read from a local file: task.data_dir must be "
                       'set to a .txt file or a directory with one (nothing is downloaded)')
    text = load_text_file(data_dir)
  return text if region == 'all' else split_text(text, block_size)[region]


BLOCK_PATTERN: tuple[str, ...] = ('train',) * 8 + ('heldout', 'test')
"""The region of each of every ten consecutive blocks (:data:`REGION_FRACTIONS`)."""


def split_text(text: Text, block_size: int = 0) -> dict[str, Text]:
  """The ``'train'``, ``'heldout'`` and ``'test'`` regions of ``text``.

  ``block_size = 0``: contiguous regions, boundaries at 80% and 90% of the bytes
  (:data:`REGION_FRACTIONS`), rounded down. ``block_size = b > 0``: the text cut into
  blocks of ``b`` bytes (the last one shorter), block ``i`` going to region
  ``BLOCK_PATTERN[i % 10]``; each region is its blocks joined in order.

  Raises:
    ValueError: on a negative or non-integer ``block_size``, or one so large that a
      region gets no byte.
  """
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or (
      block_size < 0):
    raise ValueError(f'block_size must be an integer >= 0 (0: contiguous regions), got '
                     f'{block_size!r}')
  if block_size:
    starts = range(0, len(text), block_size)
    chosen = {region: [] for region in ('train', 'heldout', 'test')}
    for index, start in enumerate(starts):
      chosen[BLOCK_PATTERN[index % len(BLOCK_PATTERN)]].append(
          text.tokens[start:start + block_size])
    empty = [region for region, blocks in chosen.items() if not blocks]
    if empty:
      raise ValueError(f'block_size {block_size} leaves the regions {empty} of '
                       f'{text.name!r} ({len(text)} bytes) empty: at most '
                       f'{len(text) // len(BLOCK_PATTERN)}')
    return {region: Text(np.concatenate(blocks), f'{text.name}:{region}:{block_size}',
                         text.source)
            for region, blocks in chosen.items()}
  n = len(text)
  first = int(n * REGION_FRACTIONS[0])
  second = int(n * (REGION_FRACTIONS[0] + REGION_FRACTIONS[1]))
  bounds = {'train': (0, first), 'heldout': (first, second), 'test': (second, n)}
  return {region: Text(text.tokens[a:b], f'{text.name}:{region}', text.source)
          for region, (a, b) in bounds.items()}
