"""What every experiment's command line does first (absl ``main``)."""

from __future__ import annotations

from absl import app, flags, logging


def start(argv: list[str]) -> flags.FlagValues:
  """Reject positional arguments and an empty ``--workdir``; log at WARNING unless
  ``--verbosity`` is given.

  Orbax checkpointing logs at INFO on every save; ``--verbosity=0`` shows it.

  Returns:
    ``absl.flags.FLAGS``, parsed.
  """
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # An empty --workdir (e.g. an unset shell variable) would be the current directory: a
  # run would write, and resume from, whatever is there.
  if 'workdir' in flags.FLAGS and flags.FLAGS['workdir'].present and not str(
      flags.FLAGS.workdir).strip():
    raise app.UsageError('--workdir is empty: name the run\'s directory.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  return flags.FLAGS
