"""What a grid's records support so far, what they do not, and what the grid has not tested:
the summary after the verdict table, and the table pooled over settings. Nothing here picks or
reads a hyperparameter."""

import collections

import numpy as np
import scipy.stats

from experiments import paired
from experiments import records as records_lib
from experiments import reproduce
from experiments import stats

FLOOR = 0.10  # a task whose every trained run scores below this is reported as at the floor
# The measurements of the paired table whose differences the summary names.
DIFFERS_ON = ('train NLL', 'held-out NLL', 'ECE', 'answer ECE', 'harder (points)',
              'easier (points)')


def _main(grid) -> list[str]:
  """The settings of the primary comparison, in the grid's order."""
  return [s for s in grid.settings if s in grid.main_settings]


def verdict_counts(grid, records, settings, seeds_allowed=None) -> dict:
  """Per baseline: the verdicts in ``settings`` with at least two paired seeds, as lists of
  (setting, paired result)."""
  counts = collections.defaultdict(lambda: collections.defaultdict(list))
  for setting in settings:
    for family in grid.baselines:
      result = paired.against(grid, records, setting, family, seeds_allowed)
      if result and len(result['seeds']) > 1:
        counts[family][result['verdict']].append((setting, result))
  return counts


def _tally(verdicts) -> str:
  return (f'{len(verdicts.get("win", []))} win, {len(verdicts.get("tie", []))} tie, '
          f'{len(verdicts.get("loss", []))} loss')


def verdict_lines(grid, records, settings, label) -> list[str]:
  """A bullet per baseline: its verdicts, those decided, the added seeds alone, and the ties
  whose bootstrap interval alone excludes 0."""
  counts = verdict_counts(grid, records, settings)
  added = tuple(s for s in grid.seeds if s not in grid.selection_seeds)
  after = ', '.join(map(str, added))
  unbiased = verdict_counts(grid, records, settings, added)
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
    elif family in grid.tuned:  # its runs are seeds 0-2: one seed after the selection
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


def noise_margins(grid, records, task) -> dict | None:
  """The paper's second claim, on one task: Target-SFT's margin over SFT with noisy and with
  clean demonstrations (the paired results), noisy minus clean, and its Welch 95% interval (the
  two settings' seeds taken as independent; None when a setting's seeds give the same
  difference). None until both settings have two paired seeds."""
  margins, differences = {}, {}
  for style in ('clean', 'noisy'):
    setting = f'{task}_{style}'
    method = grid.selected(setting, grid.ours)
    result = paired.paired(records, setting, method, 'sft') if method else None
    if not (result and len(result['seeds']) > 1):
      return None
    margins[style] = result
    differences[style] = paired.seed_differences(records, setting, method, 'sft')
  noisy, clean = differences['noisy'], differences['clean']
  welch = None
  if not (stats.zero_spread(noisy) or stats.zero_spread(clean)):  # Welch understates
    interval = scipy.stats.ttest_ind(noisy, clean, equal_var=False).confidence_interval(0.95)
    welch = (float(interval.low), float(interval.high))
  return {**margins, 'difference': float(np.mean(noisy) - np.mean(clean)), 'welch': welch}


def _noise_margin_line(task, found) -> str:
  if found['welch'] is None:
    interval = 'no interval (a setting\'s seeds give the same difference: zero spread, degenerate)'
    reading = ''
  else:
    low, high = found['welch']
    interval = (f'95% interval [{100 * low:+.1f}, {100 * high:+.1f}] (Welch, '
                'the two settings\' seeds taken as independent)')
    reading = (': larger with noise, as the paper expects' if low > 0 else
               ': smaller with noise, contrary to the paper\'s expectation' if high < 0
               else ': no difference shown')
  margin = lambda r: f'{100 * r["mean"]:+.1f} ± {100 * r["half"]:.1f} ({len(r["seeds"])} seeds)'
  return (f'- {task}: the margin over SFT is {margin(found["noisy"])} with noisy '
          f'demonstrations and {margin(found["clean"])} with clean ones, selection seeds '
          'included; the paper expects it larger with noise. Noisy minus clean: '
          f'{100 * found["difference"]:+.1f} points, {interval}{reading}.')


def at_the_floor(grid, records) -> dict[str, list[float]]:
  """The tasks whose every trained run (main settings) scores below FLOOR: their accuracies."""
  floored = {}
  for task in grid.tasks:
    trained = [r['accuracy'] for n, r in records.items() if n.count('/') == 2 and
               n.split('/')[0] in grid.main_settings and grid.settings[n.split('/')[0]][0] == task]
    if trained and max(trained) < FLOOR:
      floored[task] = trained
  return floored


def _floor_lines(grid, records) -> list[str]:
  lines = []
  for task, trained in at_the_floor(grid, records).items():
    base, teacher = records.get(f'base/{task}'), records.get(f'teacher/{task}')
    lines.append(
        f'- {task} is at the floor: every one of its {len(trained)} trained runs scores '
        f'{100 * min(trained):.1f}-{100 * max(trained):.1f}%' +
        (f' (Base {100 * base["accuracy"]:.1f}%' if base else ' (') +
        (f', its teacher {100 * teacher["accuracy"]:.1f}%)' if teacher else ')') +
        ': gaps of a few points this near the floor say little about the methods, wins '
        'included.')
  return lines


def _cost_line(grid, records) -> list[str]:
  selected = {s: grid.selected(s, grid.ours) for s in _main(grid)}
  costs = {s: paired.paired_measure(records, s, m, 'sft', 'step CPU s (ratio)')
           for s, m in selected.items() if m}
  costs = {s: c for s, c in costs.items() if c[2]}
  if not costs:
    return []
  return ['- Cost: a Target-SFT step (selected eta, prior in the step) takes '
          f'{min(c[0] for c in costs.values()):.2f}-{max(c[0] for c in costs.values()):.2f}'
          " times SFT's CPU seconds (geometric means over paired seeds on one machine, "
          f'{len(costs)} setting(s)).']


def _calibration_line(grid, records) -> list[str]:
  primaries = [r for s in _main(grid) for f in tuple(grid.fixed) + (grid.ours,)
               for m in [grid.selected(s, f)] if m for r in records_lib.runs(records, s, m)]
  answers = [(r, c) for r in primaries for c in [paired.answer_calibration(r)] if c]
  if not answers:
    return []
  over = sum(c['mean_confidence'] > c['accuracy'] for _, c in answers)
  token = [r['calibration']['ece'] for r, _ in answers
           if (r.get('calibration') or {}).get('ece') is not None]
  base = [c for t in grid.tasks for b in [records.get(f'base/{t}')] if b
          for c in [paired.answer_calibration(b)] if c]
  return [
      f'- Calibration: the greedy answers of {over} of {len(answers)} runs of the primary '
      'methods are overconfident (mean answer confidence above their accuracy), with '
      f'answer-level ECE {min(c["ece"] for _, c in answers):.2f}-'
      f'{max(c["ece"] for _, c in answers):.2f}' +
      (f' (Base: {", ".join(format(c["ece"], ".2f") for c in base)})' if base else '') +
      (f'; token-level ECE on held-out demonstrations is {min(token):.3f}-{max(token):.3f}'
       if token else '') + '.']


def _eta_line(grid, records) -> list[str]:
  costs = [(s, paired.selection_cost(grid, records, s)) for s in _main(grid)]
  costs = [(s, c) for s, c in costs if c]
  if not costs:
    return []
  return ['- Eta: ' + '; '.join(
      f'{s} selected {chosen}, best on test {best} ({100 * lost:.1f} points lost)'
      for s, (chosen, best, lost) in costs) + ' (test means over the selection seeds).']


def beyond_accuracy(grid, records) -> dict[str, tuple[int, dict]]:
  """Per primary baseline: how many (setting, measurement) comparisons of the paired table have
  an interval (two or more seeds, some spread), and per measurement of DIFFERS_ON the settings
  where Target-SFT's seed-level 95% interval excludes 0, as (higher, lower) lists of (setting,
  mean difference)."""
  found = {}
  for baseline in grid.fixed:
    compared, by_measure = 0, {}
    for measure in DIFFERS_ON:
      higher, lower = [], []
      for setting in _main(grid):
        method = grid.selected(setting, grid.ours)
        if method is None:
          continue
        mean, half, n = paired.paired_measure(records, setting, method, baseline, measure)
        if n < 2 or not half > 0:  # one seed, or zero spread: no interval to read
          continue
        compared += 1
        if abs(mean) > half:
          (higher if mean > 0 else lower).append((setting, mean))
      if higher or lower:
        by_measure[measure] = (higher, lower)
    if compared:
      found[baseline] = (compared, by_measure)
  return found


def where_it_differs(grid, records) -> list[str]:
  """Per primary baseline, the measurements of the paired table on which Target-SFT's
  seed-level interval excludes 0, setting by setting: fit, calibration or transfer."""
  lines = []
  for baseline, (compared, by_measure) in beyond_accuracy(grid, records).items():
    shown = lambda measure, cells: ', '.join(
        f'{s} ({paired.MEASURES[measure][2].format(mean)})' for s, mean in cells)
    found = [f'{measure}: ' + ' and '.join(
        f'{word} in {shown(measure, cells)}' for word, cells in (('higher', higher),
                                                                ('lower', lower)) if cells)
             for measure, (higher, lower) in by_measure.items()]
    lines.append(f'  - against {baseline} ({compared} setting-by-measure comparisons, about '
                 f'{0.05 * compared:.1f} by chance): ' +
                 ('; '.join(found) if found else 'nowhere') + '.')
  if lines:
    lines.insert(0, '- Where Target-SFT differs beyond accuracy: the measurements of the paired '
                 'table of the open questions whose seed-level 95% interval excludes 0, in the '
                 f'{len(_main(grid))} main settings (the weaker prior\'s row is in the table), '
                 'over all seeds (the selection seeds included); with no correction about 1 in '
                 '20 comparisons would exclude 0 by chance, and a small difference can be real '
                 'but immaterial (a lower NLL is a closer fit, a lower ECE better calibration; '
                 'this summary was added after pre-registration, on 2026-12-03):')
  return lines


def not_run(grid, records, planned) -> tuple[collections.Counter, collections.Counter]:
  """The planned runs not recorded, by kind: those still to go, and those the budget cut."""
  missing = collections.Counter(grid.kind(n) for n in planned
                                if n not in records and not grid.cut(n))
  cut = collections.Counter(grid.kind(n) for n in planned if n not in records and grid.cut(n))
  return missing, cut


def _not_run_lines(grid, records, planned) -> list[str]:
  missing, cut = not_run(grid, records, planned)
  unselected = [s for s in grid.settings if grid.selected(s, grid.ours) is None]
  lines = ['- Not run yet: ' + (', '.join(f'{n} {kind} run(s)' for kind, n in sorted(
      missing.items())) if missing else 'nothing planned') + (
          f'; settings with no eta selected yet: {", ".join(unselected)}' if unselected
          else '') + '. Runs that wait for a selection are not counted until it is made.']
  if cut:
    lines.append('- Cut by the budget (PREREGISTRATION change 26), never run: ' + ', '.join(
        f'{n} {kind} run(s)' for kind, n in sorted(cut.items())) + ' of ' + ', '.join(
            grid.cut_families) + ': nothing here compares Target-SFT with them.')
  return lines


def _outside_line(grid) -> str:
  steps = grid.get_config(f'{grid.main_settings[0]}/{grid.fixed[0]}/0').steps
  teacher_steps = sorted({s for _, s in grid.teachers.values()})
  measure = grid.measure
  return (f'- Outside this grid: models other than SmolLM2-135M, training longer than {steps} '
          f'steps (teachers: {" or ".join(map(str, teacher_steps))}), Average@16 over sampled '
          "answers (the paper's metric; here greedy accuracy, with Average@"
          f'{measure["num_samples"]} and pass@{measure["num_samples"]} on '
          f'{measure["sampled_problems"]} problems), the paper\'s datasets, and priors other than '
          'an SFT teacher of the same model.')


def summary(grid, records, planned, reproductions) -> list[str]:
  """What the runs so far support, what they do not, and what is untested (after the
  verdicts); ``reproductions`` is ``reproduce.comparisons(...)``."""
  unfinished = any(n not in records and not grid.cut(n) for n in planned)
  lines = ['## What held, what did not, what is untested' + (' (so far)' if unfinished else ''),
           '']
  weak = grid.prior_quality[0] if grid.prior_quality else None
  lines += verdict_lines(grid, records, [s for s in grid.settings if s != weak], 'Against') or [
      '- No comparison has two paired seeds yet: nothing is decided.']
  if weak:
    lines += verdict_lines(grid, records, [weak], f'With the weaker prior ({weak}), against')
  lines += [_noise_margin_line(task, found) for task in grid.tasks
            for found in [noise_margins(grid, records, task)] if found]
  lines += _floor_lines(grid, records) + _cost_line(grid, records)
  lines += _calibration_line(grid, records) + _eta_line(grid, records)
  lines += where_it_differs(grid, records)
  lines += reproduce.summary_line(reproductions)
  lines += _not_run_lines(grid, records, planned)
  lines.append(_outside_line(grid))
  return lines + ['']


def pooled_table(grid, records) -> list[str]:
  """Target-SFT minus each primary baseline pooled over settings (a secondary analysis)."""
  weak = grid.prior_quality[0] if grid.prior_quality else None
  main = [s for s in grid.settings if s != weak]
  added = tuple(s for s in grid.seeds if s not in grid.selection_seeds)
  groups = [('all main settings', main)] + [
      (task, [s for s in main if grid.settings[s][0] == task]) for task in grid.tasks]
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
      for family in grid.fixed:
        result = paired.pooled(grid, records, family, settings, allowed)
        if result:
          lines.append(f'| {label} | {seeds_label} | {family} | {result["settings"]} '
                       f'({result["pairs"]}) | {points(*result["over_pairs"])} | '
                       f'{points(*result["over_settings"])} |')
  return lines + ['']
