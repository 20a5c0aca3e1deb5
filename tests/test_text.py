"""metamd_jax.text: byte streams from pydoc_data, the standard library and user files."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from metamd_jax import text


def test_python_docs_are_the_sorted_topics():
  from pydoc_data import topics

  docs = text.load_text('python_docs')
  expected = '\n\n'.join(topics.topics[k] for k in sorted(topics.topics)).encode('utf-8')
  assert docs.tokens.dtype == np.uint8 and docs.tokens.ndim == 1
  assert docs.tokens.tobytes() == expected
  assert len(docs) > 100_000


def test_python_stdlib_starts_with_the_first_sorted_source():
  code = text.load_python_stdlib(max_bytes=50_000)
  assert len(code) == 50_000
  root = Path(sysconfig.get_paths()['stdlib'])
  skip = {'test', 'tests', 'idlelib', 'site-packages', 'dist-packages', '__pycache__'}
  sources = sorted(p.relative_to(root).as_posix() for p in root.rglob('*.py')
                   if not skip & set(p.relative_to(root).parts[:-1]))
  head = (root / sources[0]).read_bytes()[:1000]
  assert code.tokens[:len(head)].tobytes() == head
  with pytest.raises(ValueError, match='max_bytes'):
    text.load_python_stdlib(max_bytes=0)


def test_text_file_round_trip_and_directory(tmp_path):
  content = 'héllo wörld\n'.encode() * 10
  path = tmp_path / 'corpus.txt'
  path.write_bytes(content)
  for source in (path, tmp_path):
    loaded = text.load_text('text_file', data_dir=source)
    assert loaded.tokens.tobytes() == content
    assert loaded.name == 'corpus'


@pytest.mark.parametrize('setup, error, match', [
    (lambda d: d / 'missing.txt', FileNotFoundError, 'does not exist'),
    (lambda d: d, FileNotFoundError, 'no .txt file'),
    (lambda d: (d / 'a.txt').write_text('a') and (d / 'b.txt').write_text('b') and d,
     ValueError, 'several .txt'),
    (lambda d: (d / 'empty.txt').write_bytes(b'') or d / 'empty.txt', ValueError, 'empty'),
])
def test_text_file_errors_name_the_problem(tmp_path, setup, error, match):
  with pytest.raises(error, match=match):
    text.load_text('text_file', data_dir=setup(tmp_path))


def test_load_text_rejects_bad_names():
  with pytest.raises(ValueError, match='unknown text'):
    text.load_text('wikipedia')
  with pytest.raises(ValueError, match='unknown region'):
    text.load_text('python_docs', region='valid')
  with pytest.raises(ValueError, match='data_dir must be set'):
    text.load_text('text_file')
  with pytest.raises(ValueError, match='uint8'):
    text.Text(np.zeros(4, np.int32), 'x', 'y')


def test_regions_partition_the_text_in_order():
  whole = text.Text(np.arange(1000, dtype=np.int64).astype(np.uint8), 'n', 'test')
  regions = text.split_text(whole)
  assert [len(regions[r]) for r in ('train', 'heldout', 'test')] == [800, 100, 100]
  joined = np.concatenate([regions[r].tokens for r in ('train', 'heldout', 'test')])
  np.testing.assert_array_equal(joined, whole.tokens)
  docs = text.load_text('python_docs')
  np.testing.assert_array_equal(text.load_text('python_docs', region='heldout').tokens,
                                text.split_text(docs)['heldout'].tokens)


def test_interleaved_regions_are_disjoint_blocks_from_the_whole_text():
  whole = text.Text((np.arange(1000) % 251).astype(np.uint8), 'n', 'test')
  regions = text.split_text(whole, block_size=30)
  # 34 blocks, the last of 10 bytes: blocks 8, 18, 28 held out; 9, 19, 29 test; the
  # other 28 train (27 x 30 + 10 bytes).
  assert [len(regions[r]) for r in ('train', 'heldout', 'test')] == [820, 90, 90]
  positions = {r: [] for r in ('train', 'heldout', 'test')}
  for index, start in enumerate(range(0, 1000, 30)):
    region = ('train',) * 8 + ('heldout', 'test')
    positions[region[index % 10]].extend(range(start, min(start + 30, 1000)))
  for region, where in positions.items():
    np.testing.assert_array_equal(regions[region].tokens, whole.tokens[where])
  # Disjoint, and together the whole text.
  assert sorted(sum(positions.values(), [])) == list(range(1000))
  # Each region is drawn from along the whole file, not one stretch of it.
  assert min(positions['heldout']) == 240 and max(positions['heldout']) == 869
  # block_size 0 is the contiguous split.
  contiguous = text.split_text(whole, block_size=0)
  np.testing.assert_array_equal(contiguous['heldout'].tokens, whole.tokens[800:900])
  np.testing.assert_array_equal(text.load_text('python_docs', region='test',
                                               block_size=4096).tokens,
                                text.split_text(text.load_text('python_docs'),
                                                4096)['test'].tokens)


@pytest.mark.parametrize('block_size, match', [(-1, 'integer >= 0'), (1.5, 'integer >= 0'),
                                                (True, 'integer >= 0'), (200, 'empty')])
def test_bad_block_sizes_are_named(block_size, match):
  whole = text.Text(np.zeros(1000, np.uint8), 'n', 'test')
  with pytest.raises(ValueError, match=match):
    text.split_text(whole, block_size=block_size)
