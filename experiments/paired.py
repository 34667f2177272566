"""Target-SFT paired with a baseline seed by seed (same data order, corruptions and test
problems): on accuracy, with the verdict, and on the other measurements (step time,
calibration, fit, the variants); pooled over settings; and the eta values against each other.
Nothing here picks or reads a hyperparameter."""

import math

import numpy as np

from experiments import records as records_lib
from experiments import stats


def paired(records: dict, setting: str, method: str, baseline: str,
           seeds_allowed=None, baseline_setting: str | None = None) -> dict | None:
  """``method``'s greedy test accuracy minus ``baseline``'s, seed by seed (the Student-t
  interval over seeds) and by a bootstrap over seeds and problems together; only
  ``seeds_allowed`` when given. The baseline's runs are those of ``baseline_setting`` (default
  ``setting``), which must share the test problems. The verdict: win / loss when the seed-level
  interval excludes 0, else tie; n/a with one seed."""
  other = baseline_setting or setting
  ours = lambda seed: f'{setting}/{method}/{seed}'
  theirs = lambda seed: f'{other}/{baseline}/{seed}'
  seeds = sorted(int(n.split('/')[2]) for n in records
                 if n.startswith(f'{setting}/{method}/') and n.count('/') == 2 and
                 theirs(n.split('/')[2]) in records and
                 (seeds_allowed is None or int(n.split('/')[2]) in seeds_allowed))
  if not seeds:
    return None
  runs = [records_lib.scores(records[name(s)]) for s in seeds for name in (ours, theirs)]
  questions = runs[0][0]
  if any(q != questions for q, _ in runs):
    raise ValueError(f'{setting}: {method} and {other}\'s {baseline} were not scored on the '
                     'same problems in the same order.')
  diff = np.array([runs[2 * i][1] - runs[2 * i + 1][1] for i in range(len(seeds))])
  per_seed = diff.mean(axis=1)
  mean, half = stats.mean_and_interval(list(per_seed))
  verdict = ('tie' if math.isnan(half) or abs(mean) <= half else 'win' if mean > 0 else 'loss')
  return {'seeds': seeds, 'mean': mean, 'half': half, 'bootstrap': stats.bootstrap_interval(diff),
          'zero_spread': stats.zero_spread(per_seed),
          'verdict': verdict if len(seeds) > 1 else 'n/a', 'problems': len(questions),
          'ahead': int(np.sum(per_seed > 0))}


def against(grid, records, setting, family, seeds_allowed=None) -> dict | None:
  """The grid's method under test (at its selected value) paired with ``family`` (at its own)
  in ``setting``, its runs those that stand for it there; None while either is unselected or
  no seed pairs."""
  method = grid.selected(setting, grid.ours)
  baseline = grid.selected(setting, family)
  if not (method and baseline):
    return None
  return paired(records, setting, method, baseline, seeds_allowed,
                grid.stands_in(setting, baseline))


def seed_differences(records, setting, method, baseline, seeds_allowed=None,
                     baseline_setting: str | None = None) -> list[float]:
  """``method``'s greedy test accuracy minus ``baseline``'s in ``setting`` (the baseline's runs
  those of ``baseline_setting`` when given), one per seed both have (only ``seeds_allowed`` when
  given), in seed order."""
  ours = records_lib.seed_accuracies(records, setting, method)
  theirs = records_lib.seed_accuracies(records, baseline_setting or setting, baseline)
  return [ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))
          if seeds_allowed is None or s in seeds_allowed]


def margins(records, setting, method, baseline_setting, baseline) -> dict[int, float]:
  """``method``'s greedy test accuracy in ``setting`` minus ``baseline``'s in
  ``baseline_setting``, by seed, where both ran."""
  ours = records_lib.seed_accuracies(records, setting, method)
  theirs = records_lib.seed_accuracies(records, baseline_setting, baseline)
  return {s: ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))}


def pooled(grid, records, family, settings, seeds_allowed=None) -> dict | None:
  """The method under test (selected value) minus ``family`` over ``settings`` together: the
  mean over every (setting, seed) pair with its t interval, and the mean of the settings' means
  with the t interval over settings (which counts how much the gain varies between settings)."""
  per_setting = {}
  for setting in settings:
    method = grid.selected(setting, grid.ours)
    baseline = grid.selected(setting, family)
    if method and baseline:
      differences = seed_differences(records, setting, method, baseline, seeds_allowed)
      if differences:
        per_setting[setting] = differences
  if not per_setting:
    return None
  pairs = [d for ds in per_setting.values() for d in ds]
  setting_means = [float(np.mean(ds)) for ds in per_setting.values()]
  return {'settings': len(per_setting), 'pairs': len(pairs),
          'over_pairs': stats.mean_and_interval(pairs),
          'over_settings': stats.mean_and_interval(setting_means)}


ANSWER_BINS = 10


def answer_calibration(record) -> dict | None:
  """Answer-level calibration of a run's greedy test answers: confidence (the mean probability
  of the answer's own tokens) against full-credit correctness. ECE over ANSWER_BINS equal-width
  bins (the count-weighted mean |accuracy - confidence|), the Brier score, and the count; None
  without confidences."""
  answers = records_lib.answer_confidences(record)
  if answers is None or not len(answers[0]):
    return None
  confidence, right = answers
  bins = np.minimum((confidence * ANSWER_BINS).astype(int), ANSWER_BINS - 1)
  ece = sum(abs(right[bins == b].mean() - confidence[bins == b].mean()) * np.sum(bins == b)
            for b in np.unique(bins)) / len(confidence)
  return {'ece': float(ece), 'brier': float(np.mean((confidence - right) ** 2)),
          'mean_confidence': float(confidence.mean()), 'accuracy': float(right.mean()),
          'count': len(confidence)}


def _points(value):
  return None if value is None else 100 * value


# name: (how a record gives it, how two records compare, how the cell is written).
MEASURES = {
    'step CPU s (ratio)': (lambda r: r.get('mean_step_cpu_seconds'), 'ratio', '{:.2f}'),
    'ECE': (lambda r: (r.get('calibration') or {}).get('ece'), 'difference', '{:+.3f}'),
    'held-out NLL': (lambda r: (r.get('calibration') or {}).get('held_out_nll'), 'difference',
                     '{:+.3f}'),
    'train NLL': (lambda r: (r.get('fit') or {}).get('train_nll'), 'difference', '{:+.3f}'),
    'answer ECE': (lambda r: (answer_calibration(r) or {}).get('ece'), 'difference', '{:+.3f}'),
    'harder (points)': (lambda r: _points(records_lib.value(r, 'harder')), 'difference',
                        '{:+.1f}'),
    'easier (points)': (lambda r: _points(records_lib.value(r, 'easier')), 'difference',
                        '{:+.1f}'),
}


def _usable(value, kind) -> bool:
  """A value a comparison can use: present, finite, and (for a ratio) positive."""
  return value is not None and math.isfinite(value) and (kind != 'ratio' or value > 0)


def paired_measure(records, setting, method, baseline, measure) -> tuple:
  """``method`` against ``baseline`` on one of ``MEASURES``, over the seeds where both have a
  usable value. A difference: its mean over seeds and the 95% Student-t half-width, and the
  count. A ratio: the geometric mean of the per-seed ratios and its 95% interval (the t interval
  of the log ratios, exponentiated: never below 0), and the count."""
  read, kind, _ = MEASURES[measure]
  ours = {r['seed']: r for r in records_lib.runs(records, setting, method)}
  theirs = {r['seed']: r for r in records_lib.runs(records, setting, baseline)}
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


def broken_and_fixed(base, run, variant) -> tuple[float, float] | None:
  """The shares of a variant's problems the untouched model answered and the run does not, and
  the reverse (score 1 counts as answered), from the two prediction files."""
  if 'predictions' not in base['scored'][variant] or 'predictions' not in run['scored'][variant]:
    return None
  (base_questions, base_scores), (questions, scores) = (
      records_lib.scores(base, variant), records_lib.scores(run, variant))
  if questions != base_questions:
    raise ValueError(f'{run["name"]} and {base["name"]} were not scored on the same {variant} '
                     'problems in the same order.')
  return (float(np.mean((base_scores == 1) & (scores < 1))),
          float(np.mean((base_scores < 1) & (scores == 1))))


def eta_values(grid, records, setting, label) -> dict[str, dict[int, float]]:
  """Per value of the tuned family under test (and DFT, eta 0): its selection seeds'
  accuracies on ``label``."""
  values = {}
  for method in ('dft',) + tuple(grid.tuned[grid.ours]):
    values[method] = {r['seed']: records_lib.value(r, label) for r in records_lib.runs(
        records, setting, method) if r['seed'] in grid.selection_seeds and
                      records_lib.value(r, label) is not None}
  return values


def selection_cost(grid, records, setting) -> tuple[str, str, float] | None:
  """The selected eta, the eta with the best test mean over the selection seeds (a tie with
  the selected one goes to it, other ties to the first listed), and the test accuracy the
  selected one is below it; None before the selection or while a selection seed's test run is
  missing."""
  etas = grid.tuned[grid.ours]
  chosen = grid.selected(setting, grid.ours)
  test = eta_values(grid, records, setting, 'test_greedy')
  if not chosen or any(len(test[m]) != len(grid.selection_seeds) for m in etas):
    return None
  means = {m: float(np.mean(list(test[m].values()))) for m in etas}
  best = max(etas, key=lambda m: (means[m], -etas.index(m)))
  if means[chosen] >= means[best] - 1e-12:  # the selected one ties the best: nothing lost
    best = chosen
  label = lambda m: m.split('eta')[-1]
  return label(chosen), label(best), means[best] - means[chosen]


def _against_baselines(grid, records) -> list[str]:
  lines = ['### Target-SFT against each primary baseline on the other measurements', '',
           'Target-SFT at the selected eta against the baseline, paired by seed (n seeds). Step '
           'time: the geometric mean of the per-seed ratios of mean step CPU seconds, [95% '
           'interval] (the Cost table above divides mean step times instead). The rest: '
           'Target-SFT minus the baseline, mean ± 95% Student-t half-width over seeds. A '
           'negative ECE difference means better calibrated tokens; a negative NLL difference, a '
           'higher probability on the held-out (or training) demonstrations. The variants are '
           f'measured for seeds {", ".join(map(str, grid.variant_seeds))} only.', '',
           '| setting | baseline | ' + ' | '.join(MEASURES) + ' |',
           '|---|---|' + '---|' * len(MEASURES)]
  rows = 0
  for setting in grid.settings:
    method = grid.selected(setting, grid.ours)
    if method is None:
      continue
    for baseline in grid.fixed:
      cells = [stats.interval_cell(*paired_measure(records, setting, method, baseline, m),
                                   spec[2])
               for m, spec in MEASURES.items()]
      if any(c != '-' for c in cells):
        rows += 1
        lines.append(f'| {setting} | {baseline} | ' + ' | '.join(cells) + ' |')
  if not rows:
    lines.append('| (no setting has a selected eta and a paired baseline run yet) |' +
                 ' |' * (len(MEASURES) + 1))
  return lines + ['']


def _fit_and_generalisation(grid, records) -> list[str]:
  """Across every trained run of a setting (all methods, all seeds): descriptive rank
  correlations of how tightly the runs fit with how well they answer."""
  lines = ['### Fit against generalisation (the measurements are pre-registered; the rank '
           'correlation is a summary added after the pre-registration)', '',
           'Per setting, over all its trained runs (every method, eta and seed, so between-method '
           'differences dominate and runs sharing a seed are not independent): the Spearman '
           'rank correlation, with the number of runs, of greedy test accuracy with the training '
           f'NLL (the first {grid.measure["fit_examples"]} training examples, teacher-forced) '
           f'and with the held-out NLL (clean demonstrations of the first '
           f'{grid.measure["calibration_examples"]} test problems, whose answers are part of what '
           'the accuracy scores, so that column is partly the same measurement twice). '
           'Negative: the runs with the lower NLL answer more problems. Descriptive, with no '
           'interval: with 6 independent runs a two-sided 5% test would need |rho| of about '
           '0.89. With noisy demonstrations the training NLL includes the corrupted steps. The '
           'last column leaves out DFT, whose target differs most from the others.', '',
           '| setting | runs | train NLL vs accuracy | held-out NLL vs accuracy | '
           'train NLL vs accuracy, without DFT |', '|---|---|---|---|---|']
  accuracy = lambda runs: [r['accuracy'] for r in runs]
  train_nll = lambda runs: [r['fit']['train_nll'] for r in runs]
  for setting in grid.settings:
    runs = [r for n, r in records.items() if n.startswith(f'{setting}/') and n.count('/') == 2
            and r.get('fit') and r.get('calibration')]
    if len(runs) < 3:
      continue
    without_dft = [r for r in runs if r['method'] != 'dft']
    lines.append(
        f'| {setting} | {len(runs)} | {stats.spearman(train_nll(runs), accuracy(runs))} | '
        f'{stats.spearman([r["calibration"]["held_out_nll"] for r in runs], accuracy(runs))} | '
        + (stats.spearman(train_nll(without_dft), accuracy(without_dft))
           if len(without_dft) < len(runs) else '(no DFT run)') + ' |')
  return lines + ['']


def _variant_cell(grid, records, base, setting, family, variant) -> str:
  """A primary method's net change from Base on a variant, with the problems it broke and
  fixed."""
  base_value = records_lib.value(base, variant)
  method = grid.selected(setting, family)
  runs = [r for r in records_lib.runs(records, setting, method)
          if records_lib.value(r, variant) is not None] if method else []
  if not runs:
    return '-'
  values = [100 * (records_lib.value(r, variant) - base_value) for r in runs]
  cell = stats.interval_cell(*stats.mean_and_interval(values), len(values), '{:+.1f}')
  shares = [broken_and_fixed(base, r, variant) for r in runs]
  if all(shares):
    cell += (f'; broke {100 * np.mean([b for b, _ in shares]):.1f}, fixed '
             f'{100 * np.mean([f for _, f in shares]):.1f}')
  return cell


def _variants_against_base(grid, records) -> list[str]:
  """Transfer (harder) and what fine-tuning breaks (easier), against the untouched model on the
  same problems."""
  methods = list(grid.fixed) + [grid.ours]
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
  for setting in grid.settings:
    base = records.get(f'base/{grid.settings[setting][0]}')
    for variant in ('harder', 'easier'):
      base_value = records_lib.value(base, variant) if base else None
      if base_value is None:
        continue
      cells = [_variant_cell(grid, records, base, setting, family, variant)
               for family in methods]
      if any(c != '-' for c in cells):
        lines.append(f'| {setting} | {variant} | {100 * base_value:.1f} | ' +
                     ' | '.join(cells) + ' |')
  return lines + ['']


def open_questions(grid, records) -> list[str]:
  """The paired answers to the open questions (after the calibration table)."""
  return (['## The open questions: Target-SFT paired against the baselines', ''] +
          _against_baselines(grid, records) + _variants_against_base(grid, records) +
          _fit_and_generalisation(grid, records))
