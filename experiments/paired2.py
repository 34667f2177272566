"""Target-SFT (at the eta selected on validation) paired with each primary baseline seed by
seed, as the verdict table pairs accuracy, on the other measurements issue 18 asks about: step
time, calibration, fit, and the harder and easier variants no run trains on (against Base too).
Nothing here picks or reads a hyperparameter.
"""

import math

import numpy as np
import scipy.stats

import questions2  # pylint: disable=import-error  (experiments/questions2.py)
import records2  # pylint: disable=import-error  (experiments/records2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

# name: (how a record gives it, how two records compare, how the cell is written).
MEASURES = {
    'step CPU s (ratio)': (lambda r: r.get('mean_step_cpu_seconds'), 'ratio', '{:.2f}'),
    'ECE': (lambda r: (r.get('calibration') or {}).get('ece'), 'difference', '{:+.3f}'),
    'held-out NLL': (lambda r: (r.get('calibration') or {}).get('held_out_nll'), 'difference',
                     '{:+.3f}'),
    'train NLL': (lambda r: (r.get('fit') or {}).get('train_nll'), 'difference', '{:+.3f}'),
    'answer ECE': (lambda r: (questions2.answer_calibration(r) or {}).get('ece'), 'difference',
                   '{:+.3f}'),
    'harder (points)': (lambda r: _points(records2.value(r, 'harder')), 'difference',
                        '{:+.1f}'),
    'easier (points)': (lambda r: _points(records2.value(r, 'easier')), 'difference',
                        '{:+.1f}'),
}


def _points(value):
  return None if value is None else 100 * value


def _usable(value, kind) -> bool:
  """A value a comparison can use: present, finite, and (for a ratio) positive."""
  return value is not None and math.isfinite(value) and (kind != 'ratio' or value > 0)


def paired_measure(records, setting, method, baseline, measure) -> tuple:
  """``method`` against ``baseline`` on one of ``MEASURES``, over the seeds where both have a
  usable value. A difference: its mean over seeds and the 95% Student-t half-width, and the
  count. A ratio: the geometric mean of the per-seed ratios and its 95% interval (the t interval
  of the log ratios, exponentiated: never below 0), and the count."""
  read, kind, _ = MEASURES[measure]
  ours = {r['seed']: r for r in records2.runs(records, setting, method)}
  theirs = {r['seed']: r for r in records2.runs(records, setting, baseline)}
  # A time is compared only with one on the same machine (the records' 'machine', when set).
  seeds = [s for s in sorted(ours) if s in theirs and _usable(read(ours[s]), kind) and
           _usable(read(theirs[s]), kind) and (kind != 'ratio' or ours[s].get('machine') ==
                                                theirs[s].get('machine'))]
  ours = {s: read(ours[s]) for s in seeds}
  theirs = {s: read(theirs[s]) for s in seeds}
  if not seeds:
    return math.nan, math.nan, 0
  if kind == 'ratio':
    mean, half = stats.mean_and_interval([math.log(ours[s] / theirs[s]) for s in seeds])
    return math.exp(mean), (math.exp(mean - half), math.exp(mean + half)), len(seeds)
  mean, half = stats.mean_and_interval([ours[s] - theirs[s] for s in seeds])
  return mean, half, len(seeds)


def _against_baselines(grid, records) -> list[str]:
  lines = ['### Target-SFT against each primary baseline on the other measurements', '',
           'Target-SFT at the selected eta against the baseline, paired by seed (n seeds). Step '
           'time: the geometric mean of the per-seed ratios of mean step CPU seconds, [95% '
           'interval] (the Cost table above divides mean step times instead). The rest: '
           'Target-SFT minus the baseline, mean ± 95% Student-t half-width over seeds. A '
           'negative ECE difference means better calibrated tokens; a negative NLL difference, a '
           'higher probability on the held-out (or training) demonstrations. The variants are '
           f'measured for seeds {", ".join(map(str, grid.MEASURED_VARIANT_SEEDS))} only.', '',
           '| setting | baseline | ' + ' | '.join(MEASURES) + ' |',
           '|---|---|' + '---|' * len(MEASURES)]
  rows = 0
  for setting in grid.SETTINGS:
    method = records2.selected_method(grid, setting, 'target_sft')
    if method is None:
      continue
    for baseline in grid.PRIMARY_FIXED:
      cells = [records2.interval_cell(*paired_measure(records, setting, method, baseline, m),
                                      spec[2])
               for m, spec in MEASURES.items()]
      if any(c != '-' for c in cells):
        rows += 1
        lines.append(f'| {setting} | {baseline} | ' + ' | '.join(cells) + ' |')
  if not rows:
    lines.append('| (no setting has a selected eta and a paired baseline run yet) |' +
                 ' |' * (len(MEASURES) + 1))
  return lines + ['']


def _spearman(xs, ys) -> str:
  pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
  if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
    return 'undefined' if len(pairs) >= 3 else '-'
  rho = scipy.stats.spearmanr(*zip(*pairs)).statistic
  return f'{rho:+.2f} ({len(pairs)})'


def _fit_and_generalisation(grid, records) -> list[str]:
  """Across every trained run of a setting (all methods, all seeds): descriptive rank
  correlations of how tightly the runs fit with how well they answer."""
  lines = ['### Fit against generalisation (the measurements are pre-registered; the rank '
           'correlation is a summary added after the pre-registration)', '',
           'Per setting, over all its trained runs (every method, eta and seed, so between-method '
           'differences dominate and runs sharing a seed are not independent): the Spearman '
           'rank correlation, with the number of runs, of greedy test accuracy with the training '
           f'NLL (the first {grid.MEASURE["fit_examples"]} training examples, teacher-forced) '
           f'and with the held-out NLL (clean demonstrations of the first '
           f'{grid.MEASURE["calibration_examples"]} test problems, whose answers are part of what '
           'the accuracy scores, so that column is partly the same measurement twice). '
           'Negative: the runs with the lower NLL answer more problems. Descriptive, with no '
           'interval: with 6 independent runs a two-sided 5% test would need |rho| of about '
           '0.89. With noisy demonstrations the training NLL includes the corrupted steps. The '
           'last column leaves out DFT, whose target differs most from the others.', '',
           '| setting | runs | train NLL vs accuracy | held-out NLL vs accuracy | '
           'train NLL vs accuracy, without DFT |', '|---|---|---|---|---|']
  for setting in grid.SETTINGS:
    runs = [r for n, r in records.items() if n.startswith(f'{setting}/') and n.count('/') == 2
            and r.get('fit') and r.get('calibration')]
    if len(runs) < 3:
      continue
    accuracy = lambda runs: [r['accuracy'] for r in runs]
    train_nll = lambda runs: [r['fit']['train_nll'] for r in runs]
    without_dft = [r for r in runs if r['method'] != 'dft']
    lines.append(
        f'| {setting} | {len(runs)} | {_spearman(train_nll(runs), accuracy(runs))} | '
        f'{_spearman([r["calibration"]["held_out_nll"] for r in runs], accuracy(runs))} | '
        + (_spearman(train_nll(without_dft), accuracy(without_dft))
           if len(without_dft) < len(runs) else '(no DFT run)') + ' |')
  return lines + ['']


def _broken_and_fixed(base, run, variant) -> tuple[float, float] | None:
  """The shares of a variant's problems the untouched model answered and the run does not, and
  the reverse (score 1 counts as answered), from the two prediction files."""
  if 'predictions' not in base['scored'][variant] or 'predictions' not in run['scored'][variant]:
    return None
  (base_questions, base_scores), (questions, scores) = (
      records2.scores(base, variant), records2.scores(run, variant))
  if questions != base_questions:
    raise ValueError(f'{run["name"]} and {base["name"]} were not scored on the same {variant} '
                     'problems in the same order.')
  return (float(np.mean((base_scores == 1) & (scores < 1))),
          float(np.mean((base_scores < 1) & (scores == 1))))


def _variants_against_base(grid, records) -> list[str]:
  """Transfer (harder) and what fine-tuning breaks (easier), against the untouched model on the
  same problems."""
  methods = list(grid.PRIMARY_FIXED) + ['target_sft']
  lines = ['### Harder and easier variants against Base', '',
           'Greedy accuracy on problems of the same task that no run trains on, in points: '
           "Base's (one evaluation, so its own sampling error of a few points is in every "
           "cell), then each primary method's net change from Base (mean ± 95% half-width over "
           'the measured seeds; Target-SFT at the selected eta), and the problems behind it: '
           '*broke* the share Base answered and the run does not, *fixed* the reverse (means '
           'over seeds). On the easier variant, *broke* is what fine-tuning took away that the '
           'untouched model could do. The variants and Base are pre-registered; the broke and '
           'fixed shares were added after the pre-registration and are descriptive.', '',
           '| setting | variant | base | ' + ' | '.join(methods) + ' |',
           '|---|---|---|' + '---|' * len(methods)]
  for setting in grid.SETTINGS:
    base = records.get(f'base/{grid.SETTINGS[setting][0]}')
    for variant in ('harder', 'easier'):
      base_value = records2.value(base, variant) if base else None
      if base_value is None:
        continue
      cells = []
      for family in methods:
        method = records2.selected_method(grid, setting, family)
        runs = [r for r in records2.runs(records, setting, method) if records2.value(
            r, variant) is not None] if method else []
        if not runs:
          cells.append('-')
          continue
        values = [100 * (records2.value(r, variant) - base_value) for r in runs]
        cell = records2.interval_cell(*stats.mean_and_interval(values), len(values), '{:+.1f}')
        shares = [_broken_and_fixed(base, r, variant) for r in runs]
        if all(shares):
          cell += (f'; broke {100 * np.mean([b for b, _ in shares]):.1f}, fixed '
                   f'{100 * np.mean([f for _, f in shares]):.1f}')
        cells.append(cell)
      if any(c != '-' for c in cells):
        lines.append(f'| {setting} | {variant} | {100 * base_value:.1f} | ' +
                     ' | '.join(cells) + ' |')
  return lines + ['']


def details(grid, records) -> list[str]:
  """The paired answers to the open questions (after the calibration table)."""
  return (['## The open questions: Target-SFT paired against the baselines', ''] +
          _against_baselines(grid, records) + _variants_against_base(grid, records) +
          _fit_and_generalisation(grid, records))
