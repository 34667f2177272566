"""The questions issue 18 asks, answered from the pre-registered grid's records.

Each answer pairs Target-SFT (at the eta selected on validation) with a baseline seed by seed,
as the verdict table does, but on the other measurements: step time, calibration, fit, and the
harder and easier variants no run trains on. Then what the numbers support so far, what they do
not, and what the grid has not tested. Nothing here picks or reads a hyperparameter.
"""

import collections
import math

import numpy as np
import scipy.stats

import report2  # pylint: disable=import-error  (experiments/report2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

# name: (how a record gives it, how two records compare, how the cell is written).
_MEASURES = {
    'step CPU s (ratio)': (lambda r: r.get('mean_step_cpu_seconds'), 'ratio', '{:.2f}'),
    'ECE': (lambda r: (r.get('calibration') or {}).get('ece'), 'difference', '{:+.3f}'),
    'held-out NLL': (lambda r: (r.get('calibration') or {}).get('held_out_nll'), 'difference',
                     '{:+.3f}'),
    'train NLL': (lambda r: (r.get('fit') or {}).get('train_nll'), 'difference', '{:+.3f}'),
    'harder (points)': (lambda r: _points(report2._value(r, 'harder')), 'difference',
                        '{:+.1f}'),
    'easier (points)': (lambda r: _points(report2._value(r, 'easier')), 'difference',
                        '{:+.1f}'),
}
_PRIOR_QUALITY = 'chain3_noisy_weak'


def _points(value):
  return None if value is None else 100 * value


def paired_measure(records, setting, method, baseline, measure) -> tuple[float, float, int]:
  """``method`` against ``baseline`` on one of ``_MEASURES``, over the seeds where both have
  it: mean and 95% Student-t half-width of the per-seed difference (or ratio), and the count."""
  read, kind, _ = _MEASURES[measure]
  ours = {r['seed']: read(r) for r in report2._runs(records, setting, method)}
  theirs = {r['seed']: read(r) for r in report2._runs(records, setting, baseline)}
  seeds = sorted(s for s in ours if ours[s] is not None and theirs.get(s) is not None)
  if not seeds:
    return math.nan, math.nan, 0
  values = [ours[s] / theirs[s] if kind == 'ratio' else ours[s] - theirs[s] for s in seeds]
  mean, half = stats.mean_and_interval(values)
  return mean, half, len(seeds)


def _paired_cell(result, template) -> str:
  mean, half, n = result
  if not n:
    return '-'
  spread = '' if math.isnan(half) else f' ± {template.format(half).lstrip("+")}'
  return f'{template.format(mean)}{spread} ({n})'


def _against_baselines(grid, records) -> list[str]:
  lines = ['### Target-SFT against each primary baseline on the other measurements', '',
           'Target-SFT at the selected eta minus the baseline (step time: divided by it), paired '
           'by seed: mean ± 95% Student-t half-width over seeds (n seeds). Negative ECE and NLL '
           'differences mean Target-SFT is better calibrated or fits more tightly; the variants '
           f'are measured for seeds {", ".join(map(str, grid.MEASURED_VARIANT_SEEDS))} only.', '',
           '| setting | baseline | ' + ' | '.join(_MEASURES) + ' |',
           '|---|---|' + '---|' * len(_MEASURES)]
  rows = 0
  for setting in grid.SETTINGS:
    method = report2.selected_method(grid, setting, 'target_sft')
    if method is None:
      continue
    for baseline in grid.PRIMARY_FIXED:
      cells = [_paired_cell(paired_measure(records, setting, method, baseline, m), spec[2])
               for m, spec in _MEASURES.items()]
      if any(c != '-' for c in cells):
        rows += 1
        lines.append(f'| {setting} | {baseline} | ' + ' | '.join(cells) + ' |')
  if not rows:
    lines.append('| (no setting has a selected eta and a paired baseline run yet) |' +
                 ' |' * (len(_MEASURES) + 1))
  return lines + ['']


def _fit_and_generalisation(grid, records) -> list[str]:
  """Across every trained run of a setting (all methods, all seeds): does fitting the training
  demonstrations more tightly go with higher held-out accuracy?"""
  lines = ['### Fit against generalisation', '',
           'Per setting, over all its trained runs (every method and seed): the Spearman rank '
           'correlation of training NLL (first training examples, teacher-forced) and of '
           'held-out NLL with greedy test accuracy. A negative value: runs that fit tighter '
           'score higher. With noisy demonstrations the training NLL includes the corrupted '
           'steps, so a tight fit there is partly a fit to the noise. DFT\'s runs, with the '
           'highest NLL and the lowest accuracy, weigh on every correlation: the last column '
           'leaves them out.', '',
           '| setting | runs | train NLL vs accuracy | held-out NLL vs accuracy | '
           'train NLL vs accuracy, without DFT |', '|---|---|---|---|---|']
  for setting in grid.SETTINGS:
    runs = [r for n, r in records.items() if n.startswith(f'{setting}/') and n.count('/') == 2
            and r.get('fit') and r.get('calibration')]
    if len(runs) < 3:
      continue
    rho = lambda runs, read: scipy.stats.spearmanr(
        [read(r) for r in runs], [r['accuracy'] for r in runs]).statistic
    train_nll = lambda r: r['fit']['train_nll']
    without_dft = [r for r in runs if r['method'] != 'dft']
    lines.append(f'| {setting} | {len(runs)} | {rho(runs, train_nll):+.2f} | '
                 f'{rho(runs, lambda r: r["calibration"]["held_out_nll"]):+.2f} | ' +
                 (f'{rho(without_dft, train_nll):+.2f} ({len(without_dft)})'
                  if len(without_dft) >= 3 else '-') + ' |')
  return lines + ['']


def _variants_against_base(grid, records) -> list[str]:
  """Transfer (harder) and what fine-tuning breaks (easier), against the untouched model on the
  same problems."""
  methods = list(grid.PRIMARY_FIXED) + ['target_sft']
  lines = ['### Harder and easier variants against Base', '',
           'Greedy accuracy on problems of the same task that no run trains on, in points: '
           "Base's, then each primary method's minus Base's (mean ± 95% half-width over the "
           'measured seeds; Target-SFT at the selected eta). Below zero on the easier variant is '
           'what fine-tuning broke that the untouched model could do.', '',
           '| setting | variant | base | ' + ' | '.join(methods) + ' |',
           '|---|---|---|' + '---|' * len(methods)]
  for setting in grid.SETTINGS:
    base = records.get(f'base/{grid.SETTINGS[setting][0]}')
    for variant in ('harder', 'easier'):
      base_value = report2._value(base, variant) if base else None
      if base_value is None:
        continue
      cells = []
      for family in methods:
        method = report2.selected_method(grid, setting, family)
        values = [100 * (v - base_value) for r in report2._runs(records, setting, method or '')
                  for v in [report2._value(r, variant)] if method and v is not None]
        cells.append(_paired_cell((*stats.mean_and_interval(values), len(values)), '{:+.1f}')
                     if values else '-')
      if any(c != '-' for c in cells):
        lines.append(f'| {setting} | {variant} | {100 * base_value:.1f} | ' + ' | '.join(cells)
                     + ' |')
  return lines + ['']


def _kind(name: str, grid) -> str:
  parts = name.split('/')
  if parts[0] in ('teacher', 'base'):
    return 'prior-quality axis' if name == 'teacher/chain3_weak' else 'teachers and Base'
  if parts[0] == _PRIOR_QUALITY:
    return 'prior-quality axis'
  family = grid.family(parts[1])
  return 'primary' if parts[1] in grid.PRIMARY_FIXED or family == 'target_sft' else 'secondary'


def _verdict_counts(grid, records, seeds_allowed=None):
  """Per baseline: the settings' verdicts with at least two paired seeds, as lists."""
  counts = collections.defaultdict(lambda: collections.defaultdict(list))
  for setting in grid.SETTINGS:
    method = report2.selected_method(grid, setting, 'target_sft')
    for family in report2.BASELINES:
      baseline = report2.selected_method(grid, setting, family)
      result = (report2.paired(records, setting, method, baseline, seeds_allowed)
                if method and baseline else None)
      if result and len(result['seeds']) > 1:
        counts[family][result['verdict']].append((setting, result))
  return counts


def _summary(grid, records, planned) -> list[str]:
  lines = ['## What held, what did not, what is untested (so far)', '']
  counts = _verdict_counts(grid, records)
  added = tuple(s for s in grid.PRIMARY_SEEDS if s not in grid.SELECTION_SEEDS)
  unbiased = _verdict_counts(grid, records, added)
  if not counts:
    lines.append('- No comparison has two paired seeds yet: nothing is decided.')
  for family, verdicts in counts.items():
    total = sum(map(len, verdicts.values()))
    late = unbiased.get(family, {})
    late_total = sum(map(len, late.values()))
    decided = [f'{s} ({v} {100 * r["mean"]:+.1f})' for v in ('win', 'loss')
               for s, r in verdicts.get(v, [])]
    bootstrap_only = [s for s, r in verdicts.get('tie', [])
                      if r['bootstrap'][0] > 0 or r['bootstrap'][1] < 0]
    lines.append(
        f'- Against {family}: {len(verdicts.get("win", []))} win, '
        f'{len(verdicts.get("tie", []))} tie, {len(verdicts.get("loss", []))} loss over '
        f'{total} setting(s) with two or more seeds'
        + (f' ({", ".join(decided)})' if decided else '')
        + (f'; on seeds {", ".join(map(str, added))} alone {len(late.get("win", []))} win, '
           f'{len(late.get("tie", []))} tie, {len(late.get("loss", []))} loss of {late_total}'
           if late_total else f'; none yet on seeds {", ".join(map(str, added))} alone')
        + (f'. The bootstrap over problems and seeds excludes 0 where the seed-level interval '
           f'does not in {", ".join(bootstrap_only)}: a signal the planned seeds have not '
           'confirmed' if bootstrap_only else '') + '.')
  # The paper's second claim: the margin over SFT is largest with noisy demonstrations.
  for task in grid.TASKS:
    margins = {}
    for style in ('clean', 'noisy'):
      setting = f'{task}_{style}'
      method = report2.selected_method(grid, setting, 'target_sft')
      result = report2.paired(records, setting, method, 'sft') if method else None
      if result and len(result['seeds']) > 1:
        margins[style] = result
    if len(margins) == 2:
      clean, noisy = margins['clean'], margins['noisy']
      lines.append(
          f'- {task}: the margin over SFT is {100 * noisy["mean"]:+.1f} points with noisy '
          f'demonstrations ({len(noisy["seeds"])} seeds) against {100 * clean["mean"]:+.1f} '
          f'with clean ones ({len(clean["seeds"])}); the paper expects it larger with noise. '
          'The two means are compared here by eye, not by a test.')
  missing = collections.Counter(_kind(n, grid) for n in planned if n not in records)
  unselected = [s for s in grid.SETTINGS
                if report2.selected_method(grid, s, 'target_sft') is None]
  lines.append('- Not run yet: ' + (', '.join(f'{n} {kind} run(s)' for kind, n in sorted(
      missing.items())) if missing else 'nothing planned') + (
          f'; settings with no eta selected yet: {", ".join(unselected)}' if unselected
          else '') + '. Runs that wait for a selection are not counted until it is made.')
  lines.append(
      '- Outside this grid: models other than SmolLM2-135M, training longer than 20 steps '
      '(teachers: 100), Average@16 over sampled answers (the paper\'s metric; here greedy '
      'accuracy, with Average@4 and pass@4 on 64 problems), the paper\'s datasets, and priors '
      'other than an SFT teacher of the same model.')
  return lines + ['']


def summary(grid, records, planned) -> list[str]:
  """What the runs so far support, what they do not, and what is untested (after the
  verdicts)."""
  return _summary(grid, records, planned)


def details(grid, records) -> list[str]:
  """The paired answers to the open questions (after the calibration table)."""
  return (['## The open questions: Target-SFT paired against the baselines', ''] +
          _against_baselines(grid, records) + _variants_against_base(grid, records) +
          _fit_and_generalisation(grid, records))
