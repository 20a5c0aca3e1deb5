"""Re-apply the current rule of experiments.choose_variant to stored comparisons (no runs).

Reads results files of :mod:`experiments.choose_variant` (``choose_variant.json``) and of
:mod:`experiments.sweep` with ``--rule=robustness`` (``sweep.json``), scores every candidate
or value again from the checks stored in them (:func:`experiments.choose_variant.score`,
with the file's own check in seconds and accuracy setting), and prints per file the choice
stored in it, the choice of the current rule, each candidate's runs that diverged or ended
above their start, and whether the stored scores' figures (diverged runs, checks won,
geometric mean) are reproduced. A rule change can so be checked against every choice made
before it without running anything again::

  python -m scripts.rescore_choices experiments/results/choose_variant_*.json \\
      experiments/results/sweep_*_robustness_*.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

from experiments import choose_variant


def _baseline(checks: dict) -> str:
  """The baseline the checks re-tune (their reference is ``'<baseline>_retuned'``). Not a
  sweep's own ``'reference'``: sweeps written before it followed ``eval.reference`` store
  Adam there, also for a family whose rule judged against AdamW."""
  reference = next(iter(checks.values()))['reference']
  return reference.removesuffix('_retuned')


def rejudge_seconds(seconds: dict | None, fraction: float | None) -> dict | None:
  """A stored check in seconds with each optimiser's ``'faster'`` judged again against
  ``fraction`` of the reference's ``T``-step time (``None``: as stored)."""
  if seconds is None or fraction is None:
    return seconds
  optimizers = {name: {**entry, 'faster': choose_variant.won_in_time(entry, fraction)}
                for name, entry in seconds['optimizers'].items()}
  return {**seconds, 'fraction': fraction, 'optimizers': optimizers}


def rescore(result: dict, seconds_fraction: float | None = None) -> dict:
  """``{'stored', 'chosen', 'scores', 'reproduced'}`` of one stored comparison under the
  current rule (``seconds_fraction``: its check in seconds judged against that share of
  the reference's ``T``-step time instead of the stored one's).

  Raises:
    ValueError: on a file that is neither a choose_variant result nor a robustness sweep.
  """
  if 'scores' in result and 'checks' in result:  # choose_variant: candidates on one divergence
    seconds = rejudge_seconds(result.get(choose_variant.SECONDS), seconds_fraction)
    accuracy = result.get('accuracy_check', False)
    scores = {name: choose_variant.score(result['checks'], name, result['reference'],
                                         seconds, accuracy)
              for name in result['scores']}
  elif result.get('criterion') == 'robustness':  # a sweep: the config's own candidate per value
    scores = {}
    for value, row in result['rows'].items():
      accuracy = (row['robustness']['num_checks'] > len(row['checks'])
                  + (choose_variant.SECONDS in row))
      scores[value] = choose_variant.score(row['checks'], choose_variant.OWN,
                                           _baseline(row['checks']),
                                           rejudge_seconds(row.get(choose_variant.SECONDS),
                                                           seconds_fraction), accuracy)
  else:
    raise ValueError('not a choose_variant result or a robustness sweep: no scores and '
                     "checks, and no criterion 'robustness'.")
  stored = (result['scores'] if 'scores' in result
            else {value: row['robustness'] for value, row in result['rows'].items()})
  return {'stored': result['chosen'], 'chosen': choose_variant.choose(scores), 'scores': scores,
          'reproduced': all(_same(stored[name], scores[name]) for name in scores)}


def _same(stored: dict, scored: dict) -> bool:
  """Whether a stored score's diverged runs, checks won and geometric mean are the rescored
  ones (the figures the rule read when the choice was made)."""
  keys = ('diverged_runs', 'num_faster', 'num_checks')
  if any(stored.get(key) != scored[key] for key in keys):
    return False
  a, b = stored.get('loss_ratio_geometric_mean'), scored['loss_ratio_geometric_mean']
  return a == b or (a is not None and abs(a - b) <= 1e-12 * abs(a))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('files', nargs='+', type=pathlib.Path)
  parser.add_argument('--seconds-fraction', type=float, default=None,
                      help='judge each stored check in seconds against this share of the '
                           "reference's T-step time (default: as stored)")
  args = parser.parse_args(argv)
  if args.seconds_fraction is not None and not 0 < args.seconds_fraction <= 1:
    raise SystemExit(f'--seconds-fraction must be in (0, 1], got {args.seconds_fraction}.')
  changed = 0
  print('| file | stored choice | current rule | runs diverged or above their start | '
        'stored scores reproduced |')
  print('| --- | --- | --- | --- | --- |')
  for path in args.files:
    if not path.is_file():
      raise SystemExit(f'{path}: no such file.')
    try:
      result = rescore(json.loads(path.read_text()), args.seconds_fraction)
    except ValueError as error:
      raise SystemExit(f'{path}: {error}') from None
    failed = {name: choose_variant.failed_runs(row) for name, row in result['scores'].items()
              if choose_variant.failed_runs(row)}
    changed += result['chosen'] != result['stored']
    print(f"| {path.name} | {result['stored']} | {result['chosen']} | "
          f"{', '.join(f'{n}: {k}' for n, k in failed.items()) or 'none'} | "
          f"{'yes' if result['reproduced'] else 'no'} |")
  print(f'\n{changed} of {len(args.files)} choices differ under the current rule.')


if __name__ == '__main__':
  main()
