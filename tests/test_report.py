"""Results as JSON and tables (experiments/report.py)."""

import json

import numpy as np
import pytest

from configs import least_squares, tiny
from experiments import report


def test_json_safe_writes_standard_json(tmp_path):
  value = {1: (np.float32(0.5), np.int64(3), np.bool_(True)),
           'x': [float('nan'), np.inf, -np.inf, 2.0], 'nested': {'s': 'text', 'n': None}}
  safe = report.json_safe(value)
  assert safe == {'1': [0.5, 3, True], 'x': [None, None, None, 2.0],
                  'nested': {'s': 'text', 'n': None}}
  assert type(safe['1'][0]) is float and type(safe['1'][1]) is int
  report.write_json(tmp_path / 'r.json', value)
  text = (tmp_path / 'r.json').read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  assert json.loads(text) == safe


def test_pair_is_mean_and_std_over_finite_entries():
  values = np.array([1.0, 2.0, np.nan, 4.0, np.inf])
  assert report.pair(values) == pytest.approx([np.mean([1, 2, 4]), np.std([1, 2, 4])])
  assert report.pair([np.nan, np.inf]) == [None, None]
  assert all(type(v) is float for v in report.pair(np.float32([1, 2])))


def test_cells():
  assert report.pair_text([0.123456, 0.01]) == '0.1235 ± 0.01'
  assert report.pair_text([0.5, 0.25], '.3f', '.1f') == '0.500 ± 0.2'
  assert report.pair_text([None, None]) == report.pair_text(None) == 'n/a'
  assert report.reach_text([12.25, 3.0], 1.0) == '12.2 ± 3.0'
  assert report.reach_text([12.25, 3.0], 0.6) == '12.2 ± 3.0 (60% reached)'
  assert report.reach_text([None, None], 0.0) == report.reach_text(None, 1.0) == 'not reached'
  assert report.number_text(None) == 'n/a' and report.number_text(1 / 3) == '0.3333'
  assert report.title(tiny.get_config()) == 'MLP on digits'
  assert report.title(least_squares.get_config()) == 'least squares'


def test_format_evaluation():
  entry = {'learning_rate': None, 'final_train_loss': [0.02, 0.002],
           'steps_to_adam_final_loss': [24.0, 8.1], 'reached_fraction': 1.0,
           'test_accuracy': [0.878, 0.006]}
  adam = {'learning_rate': 0.03, 'final_train_loss': [None, None],
          'steps_to_adam_final_loss': [None, None], 'reached_fraction': 0.0}
  table = report.format_evaluation({'reference': 'adam',
                                    'optimizers': {'metamd': entry, 'adam': adam}})
  assert table.splitlines()[2:] == [
      '| metamd | learned | 24.0 ± 8.1 | 0.0200 ± 0.0020 | 0.878 ± 0.006 |',
      '| adam | 0.03 | not reached | n/a | n/a |']
