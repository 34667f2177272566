"""A grid's figures for its RESULTS.md (matplotlib, written beside it): accuracy against eta,
and reliability (tokens and answers)."""

import collections
import math

import numpy as np

from experiments import records as records_lib
from experiments import stats

ETA = 'eta.png'
CALIBRATION = 'calibration.png'
_MIN_PER_BIN = 20


def write(grid, records, out_dir) -> list[str]:
  """ETA (validation and test accuracy against eta, seeds 0-1) and CALIBRATION (reliability:
  token accuracy against confidence, bins pooled over each method's runs in all settings); the
  names of those written (none without runs to draw)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return [name for name, draw in ((ETA, _eta), (CALIBRATION, _calibration))
          if draw(plt, grid, records, out_dir / name)]


def _eta(plt, grid, records, path) -> bool:
  etas = {'dft': 0.0, **{m: grid.methods[m][1]['eta'] for m in grid.tuned[grid.ours]}}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  drawn = False
  for ax, label in zip(axes, ('validation', 'test_greedy')):
    for setting in grid.settings:
      points = []
      for method, eta in etas.items():
        values = records_lib.present([r for r in records_lib.runs(records, setting, method)
                                      if r['seed'] in grid.selection_seeds], label)
        if values:
          points.append((eta, *stats.mean_and_interval(values)))
      if points:
        drawn = True
        ax.errorbar([p[0] for p in points], [100 * p[1] for p in points],
                    yerr=[0 if math.isnan(p[2]) else 100 * p[2] for p in points], marker='o',
                    capsize=3, label=setting)
    ax.set_xlabel('eta (0 = DFT; prior = the teacher)')
    ax.set_title(f'{"validation (selects)" if label == "validation" else "test"}, seeds 0-1')
  axes[0].set_ylabel('greedy accuracy (%)')
  if drawn:
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def _calibration(plt, grid, records, path) -> bool:
  fig, (ax, answers) = plt.subplots(1, 2, figsize=(10, 5))
  drawn = False
  for family in ('base',) + tuple(grid.fixed) + (grid.ours,):
    runs = [r for r in records.values() if r['method'] == family or (
        family == grid.ours and r['method'].startswith(family))]
    pooled = collections.defaultdict(lambda: [0, 0.0, 0.0])  # lower edge -> count, conf, acc
    for r in runs:
      for b in (r.get('calibration') or {}).get('bins', []):
        if b['count']:
          cell = pooled[b['lower']]
          cell[0] += b['count']
          cell[1] += b['count'] * b['mean_confidence']
          cell[2] += b['count'] * b['accuracy']
    if pooled:
      drawn = True
      edges = sorted(pooled)
      ax.plot([pooled[e][1] / pooled[e][0] for e in edges],
              [pooled[e][2] / pooled[e][0] for e in edges], marker='o', label=family)
    points = _answer_reliability(runs)
    if points:
      answers.plot([c for c, _, _ in points], [a for _, a, _ in points], marker='o',
                   label=family)
  if drawn:
    for panel in (ax, answers):
      panel.plot([0, 1], [0, 1], color='grey', linewidth=0.8)
      panel.legend(fontsize=8)
    ax.set_xlabel('confidence (top-token probability)')
    ax.set_ylabel('token accuracy')
    ax.set_title('Tokens: held-out demonstrations')
    answers.set_xlabel("answer confidence (mean probability of the answer's tokens)")
    answers.set_ylabel('fraction of answers right')
    answers.set_title(f'Answers: greedy test answers (bins of >= {_MIN_PER_BIN})')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def _answer_reliability(runs) -> list[tuple[float, float, int]]:
  """Greedy test answers of ``runs`` pooled and cut into ten confidence bins of width 0.1: per
  bin with at least _MIN_PER_BIN answers, (mean confidence, fraction right, count)."""
  bins = collections.defaultdict(list)
  for r in runs:
    answers = records_lib.answer_confidences(r)
    for confidence, right in zip(*answers) if answers else ():
      bins[min(int(confidence * 10), 9)].append((float(confidence), bool(right)))
  return [(float(np.mean([c for c, _ in rows])), float(np.mean([ok for _, ok in rows])),
           len(rows)) for _, rows in sorted(bins.items()) if len(rows) >= _MIN_PER_BIN]
