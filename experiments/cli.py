"""What every experiment's command line does first (absl ``main``)."""

from __future__ import annotations

from absl import app, flags, logging


def start(argv: list[str]) -> flags.FlagValues:
  """Reject positional arguments and log at WARNING unless ``--verbosity`` is given.

  Orbax checkpointing logs at INFO on every save; ``--verbosity=0`` shows it.

  Returns:
    ``absl.flags.FLAGS``, parsed.
  """
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  return flags.FLAGS
