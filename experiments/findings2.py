"""What the pre-registered grid's records support so far, what they do not, and what the grid
has not tested: the summary after the verdict table, and the pooled table (the paired tables on
the other measurements are experiments/paired2.py). Nothing here picks or reads a hyperparameter.
"""

import collections

import numpy as np
import scipy.stats

import paired2  # pylint: disable=import-error  (experiments/paired2.py)
import questions2  # pylint: disable=import-error  (experiments/questions2.py)
import records2  # pylint: disable=import-error  (experiments/records2.py)
import reproduce2  # pylint: disable=import-error  (experiments/reproduce2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

_PRIOR_QUALITY = records2.PRIOR_QUALITY


def _verdict_counts(grid, records, settings, seeds_allowed=None):
  """Per baseline: the verdicts in ``settings`` with at least two paired seeds, as lists."""
  counts = collections.defaultdict(lambda: collections.defaultdict(list))
  for setting in settings:
    method = records2.selected_method(grid, setting, 'target_sft')
    for family in records2.BASELINES:
      baseline = records2.selected_method(grid, setting, family)
      result = (records2.paired(records, setting, method, baseline, seeds_allowed,
                                records2.baseline_setting(grid, setting, baseline))
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
  unfinished = any(n not in records and not getattr(grid, 'is_cut', lambda name: False)(n)
                   for n in planned)
  lines = ['## What held, what did not, what is untested' + (' (so far)' if unfinished else ''),
           '']
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
        reading = ''
      else:
        welch = scipy.stats.ttest_ind(noisy, clean, equal_var=False).confidence_interval(0.95)
        interval = (f'95% interval [{100 * welch.low:+.1f}, {100 * welch.high:+.1f}] (Welch, '
                    'the two settings\' seeds taken as independent)')
        reading = (': larger with noise, as the paper expects' if welch.low > 0 else
                   ': smaller with noise, contrary to the paper\'s expectation' if welch.high < 0
                   else ': no difference shown')
      lines.append(
          f'- {task}: the margin over SFT is {margin(margins["noisy"])} with noisy '
          f'demonstrations and {margin(margins["clean"])} with clean ones, selection seeds '
          'included; the paper expects it larger with noise. Noisy minus clean: '
          f'{100 * (np.mean(noisy) - np.mean(clean)):+.1f} points, {interval}{reading}.')
  lines += _question_bullets(grid, records)
  lines += _where_it_differs(grid, records)
  lines += reproduce2.summary_line(reproductions)
  is_cut = getattr(grid, 'is_cut', lambda name: False)
  cut = collections.Counter(records2.run_kind(grid, n) for n in planned
                            if n not in records and is_cut(n))
  missing = collections.Counter(records2.run_kind(grid, n) for n in planned
                                if n not in records and not is_cut(n))
  unselected = [s for s in grid.SETTINGS
                if records2.selected_method(grid, s, 'target_sft') is None]
  lines.append('- Not run yet: ' + (', '.join(f'{n} {kind} run(s)' for kind, n in sorted(
      missing.items())) if missing else 'nothing planned') + (
          f'; settings with no eta selected yet: {", ".join(unselected)}' if unselected
          else '') + '. Runs that wait for a selection are not counted until it is made.')
  if cut:
    lines.append('- Cut by the budget (PREREGISTRATION change 26), never run: ' + ', '.join(
        f'{n} {kind} run(s)' for kind, n in sorted(cut.items())) + ' of ' + ', '.join(
            getattr(grid, 'CUT_FAMILIES', ())) + ': nothing here compares Target-SFT with them.')
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
  points = stats.signed_points
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
  costs = {s: paired2.paired_measure(records, s, m, 'sft', 'step CPU s (ratio)')
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


_DIFFERS_ON = ('train NLL', 'held-out NLL', 'ECE', 'answer ECE', 'harder (points)',
               'easier (points)')


def _where_it_differs(grid, records) -> list[str]:
  """Per primary baseline, the measurements of the paired table below on which Target-SFT's
  seed-level interval excludes 0, setting by setting: fit, calibration or transfer."""
  main = [s for s in grid.SETTINGS if s in grid.MAIN_SETTINGS]
  lines = []
  for baseline in grid.PRIMARY_FIXED:
    found, compared = [], 0
    for measure in _DIFFERS_ON:
      higher, lower = [], []
      for setting in main:
        method = records2.selected_method(grid, setting, 'target_sft')
        if method is None:
          continue
        mean, half, n = paired2.paired_measure(records, setting, method, baseline, measure)
        if n < 2 or not half > 0:  # one seed, or zero spread: no interval to read
          continue
        compared += 1
        if abs(mean) > half:
          shown = paired2.MEASURES[measure][2].format(mean)
          (higher if mean > 0 else lower).append(f'{setting} ({shown})')
      if higher or lower:
        found.append(f'{measure}: ' + ' and '.join(
            f'{word} in {", ".join(cells)}' for word, cells in (('higher', higher),
                                                                 ('lower', lower)) if cells))
    if compared:
      lines.append(f'  - against {baseline} ({compared} setting-by-measure comparisons, about '
                   f'{0.05 * compared:.1f} by chance): ' +
                   ('; '.join(found) if found else 'nowhere') + '.')
  if lines:
    lines.insert(0, '- Where Target-SFT differs beyond accuracy: the measurements of the paired '
                 'table of the open questions whose seed-level 95% interval excludes 0, in the '
                 f'{len(main)} main settings (the weaker prior\'s row is in the table), over all '
                 'seeds (the selection seeds included); with no correction about 1 in 20 '
                 'comparisons would exclude 0 by chance, and a small difference can be real '
                 'but immaterial (a lower NLL is a closer fit, a lower ECE better calibration; '
                 'this summary was added after pre-registration, on 2026-12-03):')
  return lines


def summary(grid, records, planned, reproductions) -> list[str]:
  """What the runs so far support, what they do not, and what is untested (after the
  verdicts); ``reproductions`` is ``reproduce2.comparisons(records)``."""
  return _summary(grid, records, planned, reproductions) + _pooled_table(grid, records)
