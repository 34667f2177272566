"""The prior-quality axis of the pre-registered grid: chain3_noisy trained again with a weaker
teacher as the prior, and how much each method that uses the prior loses with it (the section
of RESULTS.md; the verdict table has the setting's own row). Nothing here picks or reads a
hyperparameter: Target-SFT runs at chain3_noisy's selected eta in both settings.
"""

import math

import records2  # pylint: disable=import-error  (experiments/records2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

_WEAK = records2.PRIOR_QUALITY
_STRONG = records2.tuned_from(_WEAK)
_CHANGE = 25  # the PREREGISTRATION change that fixed these analyses before the axis ran


_points = stats.signed_points


def _weaker_minus_stronger(records, method) -> str:
  """``method`` with the weaker prior minus with the stronger, paired by seed (same data order
  and test problems), as the verdict table writes a comparison."""
  result = records2.paired(records, _WEAK, method, method, baseline_setting=_STRONG)
  if result is None:
    return '-'
  low, high = result['bootstrap']
  reading = {'win': 'higher', 'loss': 'lower', 'tie': 'no difference shown',
             'n/a': 'one seed'}[result['verdict']]
  degenerate = (' (zero spread: the interval is degenerate, not evidence)'
                if result['zero_spread'] else '')
  return (f'**{reading}** {_points(result["mean"], result["half"])}{degenerate} '
          f'[{100 * low:+.1f}, {100 * high:+.1f}] ({len(result["seeds"])})')


def _accuracy_cell(records, setting, method) -> str:
  values = list(records2.seed_accuracies(records, setting, method).values())
  if not values:
    return '-'
  return records2.interval_cell(*(100 * x for x in stats.mean_and_interval(values)), len(values))


def section(grid, records) -> list[str]:
  method = records2.selected_method(grid, _WEAK, 'target_sft')
  teachers = {name: records.get(f'teacher/{name}') for name in (grid.SETTINGS[_STRONG][2],
                                                               grid.SETTINGS[_WEAK][2])}
  lines = ['## The prior-quality axis: does the gain depend on the prior?', '']
  if method is None or not any(n.startswith(f'{_WEAK}/') for n in records):
    return lines + [f'Not run yet ({_WEAK} runs after the primaries; see the budget above).', '']
  described = ', '.join(
      f'`teacher/{name}` ({grid.TEACHERS[name][1]} steps, greedy test '
      + (f'{100 * record["accuracy"]:.1f}%)' if record else 'not recorded)')
      for name, record in teachers.items())
  lines += [
      f'{_WEAK} is {_STRONG} with a weaker teacher as the prior; the teachers are {described}. '
      f"Distillation and Target-SFT (at {_STRONG}'s selected eta, "
      f"{method.split('eta')[-1]}) use the prior; SFT and DFT do not, so their {_STRONG} runs "
      'stand for both settings. Greedy test accuracy in percent (mean ± 95% half-width over '
      'seeds, (n)), and the weaker prior minus the stronger paired by seed, in points, '
      '[bootstrap 95% over seeds and problems], read as the verdict table reads a comparison '
      f'(pre-registered in PREREGISTRATION change {_CHANGE}, before any run of the axis).', '',
      f'| method | stronger prior ({_STRONG}) | weaker prior ({_WEAK}) | weaker minus stronger |',
      '|---|---|---|---|']
  for shown in ('distill', method):
    lines.append(f'| {shown} | {_accuracy_cell(records, _STRONG, shown)} | '
                 f'{_accuracy_cell(records, _WEAK, shown)} | '
                 f'{_weaker_minus_stronger(records, shown)} |')
  lines.append('')
  # Target-SFT's margin over each baseline with either prior; against distillation (which also
  # uses the prior) the change in the margin is how much more of its accuracy Target-SFT keeps.
  for baseline in ('sft', 'distill'):
    strong = _margins(records, _STRONG, method, _STRONG, baseline)
    weak = _margins(records, _WEAK, method, records2.baseline_setting(grid, _WEAK, baseline),
                    baseline)
    if not (strong and weak):
      continue
    moved = {s: weak[s] - strong[s] for s in sorted(set(strong) & set(weak))}
    later = {s: d for s, d in moved.items() if s not in grid.SELECTION_SEEDS}
    lines.append(
        f'- Target-SFT minus {baseline}: {_points(*_interval(strong))} ({len(strong)} seeds) '
        f'with the stronger prior, {_points(*_interval(weak))} ({len(weak)}) with the weaker' + (
            f'; the change, paired by seed: {_change(moved)}, on seeds '
            f'{", ".join(map(str, sorted(later)))} alone {_change(later)} (above 0: Target-SFT '
            'loses less than distillation when the prior weakens)'
            if baseline == 'distill' else
            " (SFT uses no prior: the change is Target-SFT's own, in the table)") + '.')
  selection = ', '.join(map(str, grid.SELECTION_SEEDS))
  lines += [
      f"- Seeds {selection} of {_STRONG}'s Target-SFT are the runs its eta was selected on: their "
      'test scores share the luck that won the selection, which makes the weaker-minus-stronger '
      'change of Target-SFT (and the change of its margin) a little more negative than it is; '
      'distillation has no selection. The paired tables of the other measurements and the '
      f'power table pair within a setting, so they have no SFT or DFT rows for {_WEAK}.']
  return lines + ['']


def _change(by_seed: dict) -> str:
  """The mean change over seeds ± its 95% t half-width, (n), read as the verdict table reads
  a comparison: above / below 0 when the interval excludes it."""
  if not by_seed:
    return 'no seed'
  mean, half = _interval(by_seed)
  if math.isnan(half):
    return f'{_points(mean, half)} (1 seed)'
  if records2.zero_spread(list(by_seed.values())):  # the same change in every seed
    return f'{_points(mean, half)} ({len(by_seed)} seeds: zero spread, degenerate, not evidence)'
  reading = ('no difference shown' if abs(mean) <= half else 'above 0' if mean > 0
             else 'below 0')
  return f'{_points(mean, half)} ({len(by_seed)} seeds: {reading})'


def _margins(records, setting, method, baseline_setting, baseline) -> dict[int, float]:
  """``method``'s greedy test accuracy in ``setting`` minus ``baseline``'s in
  ``baseline_setting``, by seed, where both ran."""
  ours = records2.seed_accuracies(records, setting, method)
  theirs = records2.seed_accuracies(records, baseline_setting, baseline)
  return {s: ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))}


def _interval(by_seed: dict) -> tuple[float, float]:
  return stats.mean_and_interval(list(by_seed.values()))
