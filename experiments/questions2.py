"""Two of issue 18's open questions, measured from the grid's prediction files: how calibrated
the trained models' answers are, and how much the choice of eta matters (paired within seeds).
Added after pre-registration, on 2026-12-02: secondary analyses, labelled so in RESULTS.md.
"""


import numpy as np

import records2  # pylint: disable=import-error  (experiments/records2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

ANSWER_BINS = 10


def answer_calibration(record) -> dict | None:
  """Answer-level calibration of a run's greedy test answers: confidence (the mean probability
  of the answer's own tokens) against full-credit correctness. ECE over ANSWER_BINS equal-width
  bins (the count-weighted mean |accuracy - confidence|), the Brier score, and the count; None
  without confidences."""
  answers = records2.answer_confidences(record)
  if answers is None or not len(answers[0]):
    return None
  confidence, right = answers
  bins = np.minimum((confidence * ANSWER_BINS).astype(int), ANSWER_BINS - 1)
  ece = sum(abs(right[bins == b].mean() - confidence[bins == b].mean()) * np.sum(bins == b)
            for b in np.unique(bins)) / len(confidence)
  return {'ece': float(ece), 'brier': float(np.mean((confidence - right) ** 2)),
          'mean_confidence': float(confidence.mean()), 'accuracy': float(right.mean()),
          'count': len(confidence)}


def _eta_values(grid, records, setting, label) -> dict[str, dict[int, float]]:
  """Per Target-SFT value (and DFT, eta 0): its selection seeds' accuracies on ``label``."""
  values = {}
  for method in ('dft',) + tuple(grid.TUNED['target_sft']):
    values[method] = {r['seed']: records2.value(r, label) for r in records2.runs(
        records, setting, method) if r['seed'] in grid.SELECTION_SEEDS and
                      records2.value(r, label) is not None}
  return values


def selection_cost(grid, records, setting) -> tuple[str, str, float] | None:
  """The selected eta, the eta with the best test mean over the selection seeds (a tie with
  the selected one goes to it, other ties to the first listed), and the test accuracy the
  selected one is below it; None before the selection or while a selection seed's test run is
  missing."""
  etas = grid.TUNED['target_sft']
  chosen = records2.selected_method(grid, setting, 'target_sft')
  test = _eta_values(grid, records, setting, 'test_greedy')
  if not chosen or any(len(test[m]) != len(grid.SELECTION_SEEDS) for m in etas):
    return None
  means = {m: float(np.mean(list(test[m].values()))) for m in etas}
  best = max(etas, key=lambda m: (means[m], -etas.index(m)))
  if means[chosen] >= means[best] - 1e-12:  # the selected one ties the best: nothing lost
    best = chosen
  label = lambda m: m.split('eta')[-1]
  return label(chosen), label(best), means[best] - means[chosen]


def eta_table(grid, records) -> list[str]:
  """Accuracy of each eta minus eta 1's, paired within seed, per setting and pooled over a
  task's settings; and what the validation selection cost on test."""
  etas = grid.TUNED['target_sft']
  reference = etas[-1]
  others = ('dft',) + tuple(etas[:-1])
  label = lambda m: 'DFT (0)' if m == 'dft' else m.split('eta')[-1]
  lines = ['### Sensitivity to eta, paired within seed (added after pre-registration, on '
           '2026-12-02; secondary)', '',
           f'Greedy accuracy of each eta minus eta {label(reference)}\'s in the same seed, in '
           'points, mean ± 95% t half-width over the (setting, seed) pairs (n pairs), on '
           'validation (what selects) / test; DFT is eta 0 and has no validation runs. Then the '
           "selection's cost on test: the eta with the best test mean over the selection seeds, "
           'and how many points the selected one is below it (0 when validation picked the '
           "test's best; the selected one when it ties the best).", '',
           '| settings | ' + ' | '.join(f'{label(m)} - {label(reference)}' for m in others) +
           ' | selected | best on test | test points lost |',
           '|---|' + '---|' * (len(others) + 3)]
  groups = [(s, [s]) for s in grid.SETTINGS if s in grid.MAIN_SETTINGS] + [
      (f'{task} (pooled)', [s for s in grid.MAIN_SETTINGS if grid.SETTINGS[s][0] == task])
      for task in grid.TASKS]
  points = lambda xs: ('-' if not xs else f'{100 * stats.mean_and_interval(xs)[0]:+.1f}' + (
      '' if len(xs) < 2 else f' ± {100 * stats.mean_and_interval(xs)[1]:.1f}') + f' ({len(xs)})')
  for name, settings in groups:
    cells, selections = [], []
    for method in others:
      split = {}
      for split_label in ('validation', 'test_greedy'):
        differences = []
        for setting in settings:
          values = _eta_values(grid, records, setting, split_label)
          differences += [values[method][s] - values[reference][s]
                          for s in sorted(set(values[method]) & set(values[reference]))]
        split[split_label] = differences
      cells.append(f"{points(split['validation'])} / {points(split['test_greedy'])}"
                   if split['test_greedy'] else '-')
    cost = selection_cost(grid, records, settings[0]) if len(settings) == 1 else None
    if cost:
      selections = [cost[0], cost[1], f'{100 * cost[2]:.1f}']
    if any(c != '-' for c in cells):
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' | ' +
                   ' | '.join(selections or ['-', '-', '-']) + ' |')
  return lines + ['']


def answer_calibration_table(grid, records) -> list[str]:
  """Per setting and primary method: answer-level ECE and Brier score, mean over seeds."""
  methods = tuple(grid.PRIMARY_FIXED) + ('target_sft',)
  lines = ['### Answer-level calibration (added after pre-registration, on 2026-12-02; '
           'secondary)', '',
           'Greedy test answers: confidence (the mean probability of the answer\'s own tokens) '
           f'against full-credit correctness; ECE over {ANSWER_BINS} equal-width bins and the '
           'Brier score, mean over seeds ± 95% t half-width (n seeds); Target-SFT at the '
           'selected eta; each cell is ECE / Brier. A model whose confidence matched its accuracy '
           'would have ECE 0.', '',
           '| setting | base | ' + ' | '.join(methods) + ' |', '|---|---|' + '---|' * len(methods)]
  for setting in grid.SETTINGS:
    base = records.get(f'base/{grid.SETTINGS[setting][0]}')
    base_cell = answer_calibration(base) if base else None
    cells = []
    for family in methods:
      method = records2.selected_method(grid, setting, family)
      measured = [c for r in records2.runs(records, setting, method or '') if method
                  for c in [answer_calibration(r)] if c]
      cells.append(_mean_cell([c['ece'] for c in measured], [c['brier'] for c in measured]))
    if any(c != '-' for c in cells):
      lines.append(f'| {setting} | ' + (f"{base_cell['ece']:.3f} / {base_cell['brier']:.3f}"
                                        if base_cell else '-') + ' | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def _mean_cell(eces, briers) -> str:
  if not eces:
    return '-'
  spread = lambda xs: '' if len(xs) < 2 else f' ± {stats.mean_and_interval(xs)[1]:.3f}'
  return (f'{np.mean(eces):.3f}{spread(eces)} / {np.mean(briers):.3f}{spread(briers)} '
          f'({len(eces)})')

