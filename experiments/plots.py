"""Loss-curve figures of the experiments (matplotlib, written as PNG files).

They plot what :mod:`experiments.report` writes: per optimiser an entry with
``'mean_curve'`` (the whole-training-set loss after ``0, curve_every, ...`` steps, mean
over the held-out tasks), optionally ``'std_curve'`` and ``'curve_every'``, and its
``'learning_rate'`` (``None`` for a learned optimiser).
"""

from __future__ import annotations

import pathlib

import numpy as np

YLABEL = 'training loss, whole training set'


def _pyplot():
  """``matplotlib.pyplot`` on the file-only Agg backend (imported when first plotting)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _label(name: str, learning_rate) -> str:
  return name if learning_rate is None else f'{name} (lr {learning_rate:g})'


def _draw(ax, entries: dict, x_of, learning_rates: dict) -> None:
  """Mean curves (and a ±std band where there is a ``'std_curve'``) on a log axis."""
  for name, entry in entries.items():
    mean = np.asarray(entry['mean_curve'], float)  # None (all tasks diverged) -> nan
    x = x_of(name, mean.size)
    line, = ax.plot(x, mean, label=_label(name, learning_rates.get(name)),
                    lw=2.2 if name.startswith('metamd') else 1.2)
    if 'std_curve' in entry:
      std = np.asarray(entry['std_curve'], float)
      # On a log axis mean - std can reach 0: the band is cut at a third of the mean.
      ax.fill_between(x, np.maximum(mean - std, mean / 3), mean + std,
                      color=line.get_color(), alpha=0.15)
  ax.set_yscale('log')


def plot_evaluation(results: dict, path: str | pathlib.Path, title: str) -> None:
  """Mean training-loss curves of :func:`experiments.evaluate.evaluate`'s optimisers."""
  plt = _pyplot()
  entries = results['optimizers']
  fig, ax = plt.subplots(figsize=(6, 4))
  _draw(ax, {n: {'mean_curve': e['mean_curve']} for n, e in entries.items()},
        lambda name, n: np.arange(n) * entries[name].get('curve_every', 1),
        {n: e['learning_rate'] for n, e in entries.items()})
  ax.set_xlabel('training step')
  ax.set_ylabel(f'{YLABEL} (mean over tasks)')
  ax.set_title(f'{title}: held-out tasks')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_benchmark_family(name: str, result: dict, workdir: str | pathlib.Path,
                          title: str) -> None:
  """The figures of one benchmark family, written to ``workdir``.

  ``<name>_loss_vs_step.png``, ``<name>_loss_vs_time.png`` (x: the compiled run's seconds
  per step) and ``<name>_beyond_horizon.png`` (the learned optimisers for
  ``horizon_multiplier * T`` steps).
  """
  plt = _pyplot()
  workdir = pathlib.Path(workdir)
  learning_rates = {opt: e.get('learning_rate') for opt, e in result['optimizers'].items()}

  def steps(entries):
    return lambda opt, n: np.arange(n) * entries[opt].get('curve_every', 1)

  def seconds(opt, n):
    entry = result['optimizers'][opt]
    return np.arange(n) * entry.get('curve_every', 1) * entry['seconds_per_step'][0]

  for suffix, x_of, xlabel, entries in (
      ('loss_vs_step', steps(result['optimizers']), 'training step', result['optimizers']),
      ('loss_vs_time', seconds, 'wall-clock seconds (compiled run)', result['optimizers']),
      ('beyond_horizon', steps(result['beyond_horizon']), 'training step',
       result['beyond_horizon'])):
    if not entries:
      continue
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _draw(ax, entries, x_of, learning_rates)
    ax.set_ylabel(f'{YLABEL} (mean ± std over tasks)')
    ax.legend(fontsize=7)
    if suffix == 'beyond_horizon':
      ax.axvline(result['horizon'], color='k', ls=':', lw=1)
      ax.set_xscale('symlog', linthresh=1.0)  # linear up to one step: the curves start at 0
      ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_title(f'{title}: held-out tasks')
    fig.tight_layout()
    fig.savefig(workdir / f'{name}_{suffix}.png', dpi=120)
    plt.close(fig)
