"""experiments.cli: the start of every experiment's command line."""

import pytest
from absl import app, flags, logging

from experiments import cli


@pytest.fixture
def parsed_flags():
  """absl's flags parsed from a bare command line; the verbosity restored after."""
  previous = logging.get_verbosity()
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['experiment'])
  yield flags.FLAGS
  logging.set_verbosity(previous)


def test_positional_arguments_are_rejected(parsed_flags):
  with pytest.raises(app.UsageError, match=r"unexpected arguments: \['stray'\]"):
    cli.start(['experiment', 'stray'])


def test_logs_at_warning_unless_verbosity_is_given(parsed_flags, monkeypatch):
  logging.set_verbosity(logging.INFO)
  assert cli.start(['experiment']) is flags.FLAGS
  assert logging.get_verbosity() == logging.WARNING
  logging.set_verbosity(logging.INFO)
  monkeypatch.setattr(flags.FLAGS['verbosity'], 'present', 1)
  cli.start(['experiment'])
  assert logging.get_verbosity() == logging.INFO
