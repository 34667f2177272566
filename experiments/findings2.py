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

import questions2  # pylint: disable=import-error  (experiments/questions2.py)
import records2  # pylint: disable=import-error  (experiments/records2.py)
import reproduce2  # pylint: disable=import-error  (experiments/reproduce2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

# name: (how a record gives it, how two records compare, how the cell is written).
_MEASURES = {
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
_PRIOR_QUALITY = 'chain3_noisy_weak'


def _points(value):
  return None if value is None else 100 * value


def _usable(value, kind) -> bool:
  """A value a comparison can use: present, finite, and (for a ratio) positive."""
  return value is not None and math.isfinite(value) and (kind != 'ratio' or value > 0)


def paired_measure(records, setting, method, baseline, measure) -> tuple:
  """``method`` against ``baseline`` on one of ``_MEASURES``, over the seeds where both have a
  usable value. A difference: its mean over seeds and the 95% Student-t half-width, and the
  count. A ratio: the geometric mean of the per-seed ratios and its 95% interval (the t interval
  of the log ratios, exponentiated: never below 0), and the count."""
  read, kind, _ = _MEASURES[measure]
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
           '| setting | baseline | ' + ' | '.join(_MEASURES) + ' |',
           '|---|---|' + '---|' * len(_MEASURES)]
  rows = 0
  for setting in grid.SETTINGS:
    method = records2.selected_method(grid, setting, 'target_sft')
    if method is None:
      continue
    for baseline in grid.PRIMARY_FIXED:
      cells = [records2.interval_cell(*paired_measure(records, setting, method, baseline, m),
                                      spec[2])
               for m, spec in _MEASURES.items()]
      if any(c != '-' for c in cells):
        rows += 1
        lines.append(f'| {setting} | {baseline} | ' + ' | '.join(cells) + ' |')
  if not rows:
    lines.append('| (no setting has a selected eta and a paired baseline run yet) |' +
                 ' |' * (len(_MEASURES) + 1))
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


def _kind(name: str, grid) -> str:
  parts = name.split('/')
  if parts[0] in ('teacher', 'base'):
    return 'prior-quality axis' if name == 'teacher/chain3_weak' else 'teachers and Base'
  if parts[0] == _PRIOR_QUALITY:
    return 'prior-quality axis'
  family = grid.family(parts[1])
  return 'primary' if parts[1] in grid.PRIMARY_FIXED or family == 'target_sft' else 'secondary'


def _verdict_counts(grid, records, settings, seeds_allowed=None):
  """Per baseline: the verdicts in ``settings`` with at least two paired seeds, as lists."""
  counts = collections.defaultdict(lambda: collections.defaultdict(list))
  for setting in settings:
    method = records2.selected_method(grid, setting, 'target_sft')
    for family in records2.BASELINES:
      baseline = records2.selected_method(grid, setting, family)
      result = (records2.paired(records, setting, method, baseline, seeds_allowed)
                if method and baseline else None)
      if result and len(result['seeds']) > 1:
        counts[family][result['verdict']].append((setting, result))
  return counts


def _tally(verdicts) -> str:
  return (f'{len(verdicts.get("win", []))} win, {len(verdicts.get("tie", []))} tie, '
          f'{len(verdicts.get("loss", []))} loss')


def _verdict_lines(grid, records, settings, label) -> list[str]:
  counts = _verdict_counts(grid, records, settings)
  added = tuple(s for s in grid.PRIMARY_SEEDS if s not in grid.SELECTION_SEEDS)
  after = ', '.join(map(str, added))
  unbiased = _verdict_counts(grid, records, settings, added)
  lines = []
  for family, verdicts in counts.items():
    total = sum(map(len, verdicts.values()))
    late = unbiased.get(family, {})
    late_total = sum(map(len, late.values()))
    decided = [f'{s} ({v} {100 * r["mean"]:+.1f}' + (
        ', zero spread: degenerate)' if r['zero_spread'] else ')')
               for v in ('win', 'loss') for s, r in verdicts.get(v, [])]
    if late_total:
      later = f'; on seeds {after} alone {_tally(late)} of {late_total}'
    elif family in grid.TUNED:  # its runs are seeds 0-2: one seed after the selection
      later = f'; on seeds {after} alone never (by design it has one seed after the selection)'
    else:
      later = f'; none yet on seeds {after} alone'
    bootstrap_only = [s for s, r in verdicts.get('tie', [])
                      if r['bootstrap'][0] > 0 or r['bootstrap'][1] < 0]
    lines.append(
        f'- {label} {family}: {_tally(verdicts)} over {total} setting(s) with two or '
        'more seeds' + (f' ({", ".join(decided)})' if decided else '') + later +
        (f'. The bootstrap interval over problems and seeds excludes 0 in '
         f'{", ".join(bootstrap_only)}, but with so few seeds it does not capture the '
         'seed-to-seed spread: not a verdict' if bootstrap_only else '') + '.')
  return lines


def _summary(grid, records, planned, reproductions) -> list[str]:
  lines = ['## What held, what did not, what is untested (so far)', '']
  main = [s for s in grid.SETTINGS if s != _PRIOR_QUALITY]
  lines += _verdict_lines(grid, records, main, 'Against') or [
      '- No comparison has two paired seeds yet: nothing is decided.']
  lines += _verdict_lines(grid, records, [_PRIOR_QUALITY],
                          f'With the weaker prior ({_PRIOR_QUALITY}), against')
  # The paper's second claim: the margin over SFT is largest with noisy demonstrations.
  for task in grid.TASKS:
    margins = {}
    for style in ('clean', 'noisy'):
      setting = f'{task}_{style}'
      method = records2.selected_method(grid, setting, 'target_sft')
      result = records2.paired(records, setting, method, 'sft') if method else None
      if result and len(result['seeds']) > 1:
        margins[style] = result
    if len(margins) == 2:
      margin = lambda r: (f'{100 * r["mean"]:+.1f} ± {100 * r["half"]:.1f} '
                          f'({len(r["seeds"])} seeds)')
      noisy, clean = (records2.seed_differences(
          records, f'{task}_{style}', records2.selected_method(grid, f'{task}_{style}',
                                                               'target_sft'), 'sft')
                      for style in ('noisy', 'clean'))
      if records2.zero_spread(noisy) or records2.zero_spread(clean):  # Welch understates
        interval = ('no interval (a setting\'s seeds give the same difference: zero spread, '
                    'degenerate)')
      else:
        welch = scipy.stats.ttest_ind(noisy, clean, equal_var=False).confidence_interval(0.95)
        interval = (f'95% interval [{100 * welch.low:+.1f}, {100 * welch.high:+.1f}] (Welch, '
                    'the two settings\' seeds taken as independent)')
      lines.append(
          f'- {task}: the margin over SFT is {margin(margins["noisy"])} with noisy '
          f'demonstrations and {margin(margins["clean"])} with clean ones, selection seeds '
          'included; the paper expects it larger with noise. Noisy minus clean: '
          f'{100 * (np.mean(noisy) - np.mean(clean)):+.1f} points, {interval}.')
  lines += _question_bullets(grid, records)
  lines += reproduce2.summary_line(reproductions)
  missing = collections.Counter(_kind(n, grid) for n in planned if n not in records)
  unselected = [s for s in grid.SETTINGS
                if records2.selected_method(grid, s, 'target_sft') is None]
  lines.append('- Not run yet: ' + (', '.join(f'{n} {kind} run(s)' for kind, n in sorted(
      missing.items())) if missing else 'nothing planned') + (
          f'; settings with no eta selected yet: {", ".join(unselected)}' if unselected
          else '') + '. Runs that wait for a selection are not counted until it is made.')
  steps = grid.run_config(main[0], grid.PRIMARY_FIXED[0], 0).steps
  teacher_steps = sorted({s for _, s in grid.TEACHERS.values()})
  measure = grid.MEASURE
  lines.append(
      f'- Outside this grid: models other than SmolLM2-135M, training longer than {steps} '
      f'steps (teachers: {" or ".join(map(str, teacher_steps))}), Average@16 over sampled '
      "answers (the paper's metric; here greedy accuracy, with Average@"
      f'{measure["num_samples"]} and pass@{measure["num_samples"]} on '
      f'{measure["sampled_problems"]} problems), the paper\'s datasets, and priors other than '
      'an SFT teacher of the same model.')
  return lines + ['']


def pooled(grid, records, family, settings, seeds_allowed=None) -> dict | None:
  """Target-SFT (selected eta) minus ``family`` over ``settings`` together: the mean over every
  (setting, seed) pair with its t interval, and the mean of the settings' means with the t
  interval over settings (which counts how much the gain varies between settings)."""
  per_setting = {}
  for setting in settings:
    method = records2.selected_method(grid, setting, 'target_sft')
    baseline = records2.selected_method(grid, setting, family)
    if method and baseline:
      differences = records2.seed_differences(records, setting, method, baseline, seeds_allowed)
      if differences:
        per_setting[setting] = differences
  if not per_setting:
    return None
  pairs = [d for ds in per_setting.values() for d in ds]
  setting_means = [float(np.mean(ds)) for ds in per_setting.values()]
  return {'settings': len(per_setting), 'pairs': len(pairs),
          'over_pairs': stats.mean_and_interval(pairs),
          'over_settings': stats.mean_and_interval(setting_means)}


def _pooled_table(grid, records) -> list[str]:
  main = [s for s in grid.SETTINGS if s != _PRIOR_QUALITY]
  added = tuple(s for s in grid.PRIMARY_SEEDS if s not in grid.SELECTION_SEEDS)
  groups = [('all main settings', main)] + [
      (task, [s for s in main if grid.SETTINGS[s][0] == task]) for task in grid.TASKS]
  lines = ['## Pooled over settings (added in PREREGISTRATION change 21; not the verdict)', '',
           'Target-SFT (selected eta) minus each primary baseline in greedy test accuracy, in '
           'points, over several settings together: the mean over every (setting, seed) pair '
           '± its 95% t half-width (as if the pairs were independent), and the mean of the '
           "settings' means ± the 95% t half-width over settings (which also counts how much the "
           'gain differs between settings; the one to read). Settings of a task share their '
           'test problems and teacher. Added after seeds 0-1 of the chain3 settings and seed 0 '
           'of the products2 settings were seen, before any run of seeds 2-4: read it as a '
           'secondary analysis.', '',
           '| settings | seeds | baseline | settings (pairs) | mean over pairs | mean over settings |',
           '|---|---|---|---|---|---|']
  points = lambda m, h: f'{100 * m:+.1f}' + ('' if math.isnan(h) else f' ± {100 * h:.1f}')
  for label, settings in groups:
    for seeds_label, allowed in (('all', None), (', '.join(map(str, added)), added)):
      for family in grid.PRIMARY_FIXED:
        result = pooled(grid, records, family, settings, allowed)
        if result:
          lines.append(f'| {label} | {seeds_label} | {family} | {result["settings"]} '
                       f'({result["pairs"]}) | {points(*result["over_pairs"])} | '
                       f'{points(*result["over_settings"])} |')
  return lines + ['']


_FLOOR = 0.10  # a task whose every trained run scores below this is reported as at the floor


def _question_bullets(grid, records) -> list[str]:
  """One line each on the floor, cost, calibration and eta, from the tables below."""
  lines = []
  for task in grid.TASKS:
    trained = [r['accuracy'] for n, r in records.items() if n.count('/') == 2 and
               n.split('/')[0] in grid.MAIN_SETTINGS and grid.SETTINGS[n.split('/')[0]][0] == task]
    base, teacher = records.get(f'base/{task}'), records.get(f'teacher/{task}')
    if trained and max(trained) < _FLOOR:
      lines.append(
          f'- {task} is at the floor: every one of its {len(trained)} trained runs scores '
          f'{100 * min(trained):.1f}-{100 * max(trained):.1f}%' +
          (f' (Base {100 * base["accuracy"]:.1f}%' if base else ' (') +
          (f', its teacher {100 * teacher["accuracy"]:.1f}%)' if teacher else ')') +
          ': gaps of a few points this near the floor say little about the methods, wins '
          'included.')
  main = [s for s in grid.SETTINGS if s in grid.MAIN_SETTINGS]
  selected = {s: records2.selected_method(grid, s, 'target_sft') for s in main}
  costs = {s: paired_measure(records, s, m, 'sft', 'step CPU s (ratio)')
           for s, m in selected.items() if m}
  costs = {s: c for s, c in costs.items() if c[2]}
  if costs:
    lines.append('- Cost: a Target-SFT step (selected eta, prior in the step) takes '
                 f'{min(c[0] for c in costs.values()):.2f}-{max(c[0] for c in costs.values()):.2f}'
                 " times SFT's CPU seconds (geometric means over paired seeds on one machine, "
                 f'{len(costs)} setting(s)).')
  primaries = [r for s in main for f in tuple(grid.PRIMARY_FIXED) + ('target_sft',)
               for m in [records2.selected_method(grid, s, f)] if m
               for r in records2.runs(records, s, m)]
  answers = [(r, c) for r in primaries for c in [questions2.answer_calibration(r)] if c]
  if answers:
    over = sum(c['mean_confidence'] > c['accuracy'] for _, c in answers)
    token = [r['calibration']['ece'] for r, _ in answers if (r.get('calibration') or {}).get(
        'ece') is not None]
    base = [c for t in grid.TASKS for b in [records.get(f'base/{t}')] if b
            for c in [questions2.answer_calibration(b)] if c]
    lines.append(
        f'- Calibration: the greedy answers of {over} of {len(answers)} runs of the primary '
        'methods are overconfident (mean answer confidence above their accuracy), with '
        f'answer-level ECE {min(c["ece"] for _, c in answers):.2f}-'
        f'{max(c["ece"] for _, c in answers):.2f}' +
        (f' (Base: {", ".join(format(c["ece"], ".2f") for c in base)})' if base else '') +
        (f'; token-level ECE on held-out demonstrations is {min(token):.3f}-{max(token):.3f}'
         if token else '') + '.')
  costs_of_selection = [(s, questions2.selection_cost(grid, records, s)) for s in main]
  costs_of_selection = [(s, c) for s, c in costs_of_selection if c]
  if costs_of_selection:
    lines.append('- Eta: ' + '; '.join(
        f'{s} selected {chosen}, best on test {best} ({100 * lost:.1f} points lost)'
        for s, (chosen, best, lost) in costs_of_selection) + ' (test means over the selection '
        'seeds).')
  return lines


def summary(grid, records, planned, reproductions) -> list[str]:
  """What the runs so far support, what they do not, and what is untested (after the
  verdicts); ``reproductions`` is ``reproduce2.comparisons(records)``."""
  return _summary(grid, records, planned, reproductions) + _pooled_table(grid, records)


def details(grid, records) -> list[str]:
  """The paired answers to the open questions (after the calibration table)."""
  return (['## The open questions: Target-SFT paired against the baselines', ''] +
          _against_baselines(grid, records) + _variants_against_base(grid, records) +
          _fit_and_generalisation(grid, records))
