"""Benchmark (not a test): how alike a text's regions are, contiguous or interleaved.

The language-model families train held-out tasks on a text's ``'heldout'`` region and
validation tasks (the shift ``'heldout_text'`` of :mod:`experiments.choose_variant`) on its
``'train'`` region (:func:`metamd_jax.text.split_text`). Where the content changes along
the file the two are of different kinds, and a check on one does not stand for the other.
This prints, per text and block size (0: contiguous regions), each region's bytes and
its zlib bits per byte (level 9, each chunk of ``--chunk`` bytes compressed alone, so that
a region's own blocks do not lend each other context): a measure of the data alone,
no optimiser run on any region::

  python -m scripts.text_regions --texts python_stdlib,python_docs --block-sizes 0,4096,32768
"""

from __future__ import annotations

import argparse
import zlib

from metamd_jax import text

REGIONS = ('train', 'heldout', 'test')


def bits_per_byte(data: bytes, chunk: int) -> float:
  """zlib (level 9) bits per byte of ``data``, each ``chunk`` bytes compressed alone."""
  pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
  return 8 * sum(len(zlib.compress(piece, 9)) for piece in pieces) / len(data)


def region_rows(name: str, block_sizes, chunk: int) -> list[dict]:
  """One row per block size: ``{'text', 'block_size', <region>: (bytes, bits per byte)}``."""
  whole = text.load_text(name)
  rows = []
  for block_size in block_sizes:
    regions = text.split_text(whole, block_size)
    row = {'text': name, 'block_size': block_size}
    for region in REGIONS:
      data = bytes(regions[region].tokens)
      row[region] = (len(data), bits_per_byte(data, chunk))
    rows.append(row)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--texts', default='python_stdlib,python_docs')
  parser.add_argument('--block-sizes', default='0,4096,32768')
  parser.add_argument('--chunk', type=int, default=4096)
  args = parser.parse_args(argv)
  try:
    block_sizes = [int(b) for b in args.block_sizes.split(',')]
  except ValueError:
    raise SystemExit(f'--block-sizes must be integers, got {args.block_sizes!r}.') from None
  if args.chunk < 1:
    raise SystemExit(f'--chunk must be a positive integer, got {args.chunk}.')
  print('| text | block size | ' + ' | '.join(f'{r}: bytes, zlib bits/byte' for r in REGIONS)
        + ' |')
  print('| --- | ---: |' + ' --- |' * len(REGIONS))
  for name in args.texts.split(','):
    try:
      rows = region_rows(name, block_sizes, args.chunk)
    except ValueError as error:
      raise SystemExit(str(error)) from None
    for row in rows:
      print(f"| {row['text']} | {row['block_size']} | "
            + ' | '.join(f'{row[r][0]}, {row[r][1]:.3f}' for r in REGIONS) + ' |')


if __name__ == '__main__':
  main()
