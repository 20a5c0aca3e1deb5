"""Loss-curve figures of the experiments (matplotlib, written as PNG files).

They plot what :mod:`experiments.report` writes: per optimiser an entry with
``'mean_curve'`` (the whole-training-set loss after ``0, curve_every, ...`` steps, mean
over the held-out tasks), optionally ``'std_curve'`` and ``'curve_every'``, and its
``'learning_rate'`` (``None`` for a learned optimiser). The benchmark's robustness figure
(:func:`plot_robustness`) is a bar chart of its checks instead: per check, each
optimiser's steps to the re-tuned reference's final loss, as a fraction of the check's
run, with diverged and not-reached runs marked.
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
  per step), ``<name>_beyond_horizon.png`` (the learned optimisers for
  ``horizon_multiplier * T`` steps) and, where the family has robustness checks,
  ``<name>_robustness.png`` (:func:`plot_robustness`).
  """
  plt = _pyplot()
  workdir = pathlib.Path(workdir)
  learning_rates = {opt: e.get('learning_rate')
                    for entries in (result['beyond_horizon'], result['optimizers'])
                    for opt, e in entries.items()}

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
  if result.get('robustness'):
    plot_robustness(result['robustness'], workdir / f'{name}_robustness.png', title)


def plot_robustness(robustness: dict, path: str | pathlib.Path, title: str) -> None:
  """Grouped bars of the benchmark's robustness checks (``result['robustness']``).

  Per check (x) and optimiser (a colour): the mean steps to the check's reference's
  final loss (the re-tuned Adam, ``'adam_retuned'``), divided by the check's run length
  ``'num_steps'`` (``T``, or ``10 T`` for the long-horizon check), so that every check
  reads on one axis from 0 to 1. A hatched bar: some tasks did not reach the loss (the
  mean is over those that did); a cross at the top: no task reached it; a red count
  above a bar: runs that diverged.
  """
  plt = _pyplot()
  checks = list(robustness)
  names = list(dict.fromkeys(n for r in robustness.values() for n in r['optimizers']))
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(checks) + 2), 4.2))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for j, opt in enumerate(names):
    color = colors[j % len(colors)]
    for i, check in enumerate(checks):
      result = robustness[check]
      entry = result['optimizers'].get(opt)
      if entry is None:
        continue
      x = i - 0.4 + (j + 0.5) * width
      steps = entry.get(f"steps_to_{result['reference']}_final_loss", [None])[0]
      reached = entry.get('reached_fraction', 0.0)
      if steps is None or not reached:
        ax.plot(x, 1.03, marker='x', color=color, ms=6, ls='none')
      else:
        ax.bar(x, steps / result['num_steps'], width, color=color,
               hatch='//' if reached < 1 else None, edgecolor='k' if reached < 1 else color,
               lw=0.5)
      if entry['diverged']:
        ax.text(x, 1.07, str(entry['diverged']), color='red', ha='center', va='bottom',
                fontsize=7)
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch

  handles = [Patch(color=colors[j % len(colors)], label=opt) for j, opt in enumerate(names)]
  handles += [Line2D([], [], marker='x', color='gray', ls='none', label='no task reached it'),
              Patch(facecolor='white', edgecolor='k', hatch='//',
                    label='some tasks did not reach it'),
              Line2D([], [], marker='$n$', color='red', ls='none', label='n runs diverged')]
  reference = next(iter(robustness.values()))['reference'] if robustness else ''
  ax.set_xticks(range(len(checks)), checks, rotation=30, ha='right', fontsize=8)
  ax.set_ylim(0, 1.15)
  ax.set_ylabel(f'steps to {reference} final loss\n(fraction of the run, mean over tasks)')
  ax.set_title(f'{title}: robustness')
  ax.legend(handles=handles, fontsize=6, loc='upper left', bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
