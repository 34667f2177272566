"""experiments/RESULTS.md for the pre-registered grid (configs/compare2_smollm2.py).

Everything is computed from ``results2/runs.jsonl`` and the prediction files it names; the rules
(primary metric, selection, intervals, verdict) are those of experiments/PREREGISTRATION.md.
"""

import collections
import json
import math
import pathlib

import numpy as np

import findings2  # pylint: disable=import-error  (experiments/findings2.py; it imports this one)
import machines  # pylint: disable=import-error  (experiments/machines.py)
import plots2  # pylint: disable=import-error  (experiments/plots2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

CORES = 2  # the grid machine's; CPU seconds / CORES is a run's wall time alone

BASELINES = ('sft', 'dft', 'distill', 'label_smoothing', 'sft_kl', 'asft')
BOOTSTRAP_RESAMPLES = 10_000


def _scores(record, label='test_greedy') -> tuple[list[str], np.ndarray]:
  """The questions and scores of a run's greedy predictions, row by row (the test split's
  order; a question that occurs twice in the split counts twice, as in the accuracy)."""
  path = stats.ROOT / record['scored'][label]['predictions']
  rows = [json.loads(line) for line in path.read_text().splitlines() if line]
  return [r['question'] for r in rows], np.array([r['score'] for r in rows], np.float64)


def selected_method(grid, setting: str, family: str) -> str | None:
  """The grid method standing for ``family`` in ``setting``: fixed methods are themselves; a
  tuned family's frozen selection (None before it exists)."""
  if family not in grid.TUNED:
    return family
  frozen = json.loads(grid.selection_file.read_text()) if grid.selection_file.exists() else {}
  key = 'chain3_noisy' if setting == 'chain3_noisy_weak' else setting
  entry = frozen.get(f'{key}/{family}')
  return entry['selected'] if entry else None


def paired(records: dict, setting: str, method: str, baseline: str,
           seeds_allowed=None) -> dict | None:
  """Target-SFT's (``method``) greedy test accuracy minus ``baseline``'s, seed by seed (the
  Student-t interval over seeds) and by a bootstrap over seeds and problems together; only
  ``seeds_allowed`` when given."""
  seeds = sorted(int(n.split('/')[2]) for n in records
                 if n.startswith(f'{setting}/{method}/') and
                 f'{setting}/{baseline}/{n.split("/")[2]}' in records and
                 (seeds_allowed is None or int(n.split('/')[2]) in seeds_allowed))
  if not seeds:
    return None
  runs = [_scores(records[f'{setting}/{m}/{s}']) for s in seeds for m in (method, baseline)]
  questions = runs[0][0]
  if any(q != questions for q, _ in runs):
    raise ValueError(f'{setting}: {method} and {baseline} were not scored on the same problems '
                     'in the same order.')
  diff = np.array([runs[2 * i][1] - runs[2 * i + 1][1] for i in range(len(seeds))])
  per_seed = diff.mean(axis=1)
  mean, half = stats.mean_and_interval(list(per_seed))
  rng = np.random.default_rng(0)
  seed_draw = rng.integers(0, len(seeds), (BOOTSTRAP_RESAMPLES, len(seeds)))
  problem_draw = rng.integers(0, len(questions), (BOOTSTRAP_RESAMPLES, len(questions)))
  means = np.array([diff[s][:, p].mean() for s, p in zip(seed_draw, problem_draw)])
  low, high = np.quantile(means, [0.025, 0.975])
  verdict = ('tie' if math.isnan(half) or abs(mean) <= half else 'win' if mean > 0 else 'loss')
  return {'seeds': seeds, 'mean': mean, 'half': half, 'bootstrap': (low, high),
          'verdict': verdict if len(seeds) > 1 else 'n/a', 'problems': len(questions),
          'ahead': int(np.sum(per_seed > 0))}


def _cell(values, scale=100.0, digits=1) -> str:
  if not values:
    return '-'
  mean, half = stats.mean_and_interval(values)
  interval = '' if math.isnan(half) else f' ± {scale * half:.{digits}f}'
  return f'{scale * mean:.{digits}f}{interval} ({len(values)})'


def _runs(records, setting, method):
  return [r for n, r in sorted(records.items())
          if n.startswith(f'{setting}/{method}/') and n.count('/') == 2]


def _value(record, label, field='accuracy'):
  entry = (record.get('scored') or {}).get(label)
  return None if entry is None else entry.get(field)


def _answer_confidence(record) -> tuple[float, float] | None:
  """Mean answer confidence of correct and of wrong greedy test answers."""
  path = stats.ROOT / record['scored']['test_greedy']['predictions']
  rows = [json.loads(line) for line in path.read_text().splitlines() if line]
  right = [r['confidence'] for r in rows if r.get('confidence') is not None and r['score'] == 1]
  wrong = [r['confidence'] for r in rows if r.get('confidence') is not None and r['score'] < 1]
  if not right or not wrong:
    return None
  return float(np.mean(right)), float(np.mean(wrong))


def write(grid, registry, output, args, planned: list[str]) -> None:
  records = registry.records()
  listed = machines.load(pathlib.Path(registry.dir) / 'machines.jsonl') if hasattr(
      registry, 'dir') else []
  for record in records.values():  # step times compare only within one machine
    record['machine'] = machines.machine_of(record, listed)
  lines = ['# Method comparison: the pre-registered grid', '',
           f'Generated by `python experiments/compare.py report --config {args.config}` from '
           f'`{args.results_dir}/runs.jsonl` ({len(records)} recorded runs); the plan, the '
           'selection rule and every metric are fixed in `experiments/PREREGISTRATION.md` '
           '(written before the first run; its last section lists the changes). The first, '
           'exploratory grid, whose eta was read off the test results, is '
           '`RESULTS_exploratory.md`. `python experiments/compare.py rescore --config '
           f'{args.config}` re-scores every saved prediction file against these numbers.', '',
           'A **setting** is one training distribution: a task at fixed difficulty, the style '
           'of its demonstrations (clean, 30% noisy, several valid orders) and the teacher that '
           'distillation and Target-SFT use as the prior. The primary metric is greedy accuracy '
           f'on the same {grid.MEASURE["test_problems"]} test problems for every run of a task, '
           "scored by reasoning-gym's own scorer.", '']
  lines += _status(grid, records, planned)
  lines += _verdicts(grid, records)
  lines += findings2.summary(grid, records, planned)
  lines += _power(grid, records)
  lines += _accuracy(grid, records)
  lines += _eta(grid, records)
  lines += _sweep(grid, records)
  lines += _cost(grid, records)
  lines += _calibration_and_fit(grid, records)
  lines += findings2.details(grid, records)
  figures = plots2.write(grid, records, output.parent)
  lines += ['## Plots', '', '`grid2_eta.png`: greedy accuracy against eta on validation and '
            'test (seeds 0-1, mean ± 95% half-width). `grid2_calibration.png`: reliability, '
            "pooled over each method's runs in every setting (Target-SFT at every eta): left, "
            'token accuracy against top-token probability on held-out demonstrations; right, the '
            'fraction of greedy test answers right against their confidence, which mixes '
            "chain3's and products2's accuracies.", ''] + [
                f'![{f}]({f})' for f in figures] + ([''] if figures else [
      '(none yet: no run of the sweep or with calibration bins is recorded)', ''])
  lines += _run_table(records)
  output.write_text('\n'.join(lines) + '\n')
  print(f'wrote {output}')


def _status(grid, records, planned):
  missing = [n for n in planned if n not in records]
  trained = [r for r in records.values() if r['method'] not in ('base', 'teacher')]
  lines = ['## Status and budget', '',
           f'{len(planned) - len(missing)} of the {len(planned)} runs planned so far are '
           'recorded (runs waiting for a selection are added when it is made; '
           '`python experiments/compare.py run --config configs/compare2_smollm2.py` resumes).']
  if trained:
    # Medians, by what a run measures (validation or not): a run that shared the machine or was
    # paused inflates a mean. Only chain3 has run so far where products2 has no trained run: its
    # runs generate twice the tokens, so the estimate is low until they are measured.
    validated = lambda name: grid.measurements(name)['validation']
    walls = {True: [], False: []}
    cpus = {True: [], False: []}
    # The rates of the machine the grid runs on now, once it has a few runs (machines differ).
    current = max(trained, key=lambda r: r.get('finished') or '').get('machine')
    on_current = [r for r in trained if r.get('machine') == current]
    timed = on_current if current and len(on_current) >= 3 else trained
    for r in timed:
      walls[validated(r['name'])].append(r['wall_seconds'])
      if r.get('cpu_seconds'):
        cpus[validated(r['name'])].append(r['cpu_seconds'])
    median = lambda xs: float(np.median(xs)) if xs else None
    rate = lambda v: median(walls[v]) or median(walls[not v])
    shown = lambda xs: f'{median(xs):.0f} s ({len(xs)} runs)' if xs else 'none yet'
    left = sum(rate(validated(n)) for n in missing if n.count('/') == 2)
    families = sorted({grid.task_family_of(r['name']) for r in trained})
    unmeasured = sorted(set(grid.TASKS) - set(families))
    lines += ['', 'Measured wall time per run (training, export and measurement), median' + (
        f' on {current}, the machine the latest runs ran on' if timed is on_current else '') +
              ': '
              f'{shown(walls[True])} for runs measured on validation too (pre-registered '
              f'estimate 330 s), {shown(walls[False])} for the others (estimate 260 s); CPU '
              f'seconds, recorded from PREREGISTRATION change 14 on: {shown(cpus[True])} and '
              f'{shown(cpus[False])}. At these rates the {len(missing)} planned runs still to go '
              f'need about {left / 3600:.1f} h' + (
                  f' (no run of {", ".join(unmeasured)} is trained yet; products2 generates up '
                  'to twice the tokens of chain3, so this is low)' if unmeasured else '') + '.']
    if cpus[True] or cpus[False]:
      # Pauses and other work inflate wall time; a run alone keeps both cores busy, so its CPU
      # seconds over 2 approximate its wall time alone.
      cpu_rate = lambda v: (median(cpus[v]) or median(cpus[not v])) / CORES
      cpu_left = sum(cpu_rate(validated(n)) for n in missing if n.count('/') == 2)
      lines += ['', f'At the CPU-second rates instead (CPU seconds / {CORES}, this machine\'s '
                f'cores: a run alone keeps both busy), the runs still to go need about '
                f'{cpu_left / 3600:.1f} h; measurement became about 2x faster with '
                'PREREGISTRATION change 15 (the runs from chain3_multi/sft/0 on).']
  lines += ['', 'Pre-registered estimate (`PREREGISTRATION.md`, before any run): about 249 runs, '
            '20.5 h of this machine in all, 11.9 h for the teachers, Base and the primaries of '
            'the six settings, which run first; over the issue\'s 12 h the secondaries and the '
            'prior-quality axis are cut first. Whatever has not run is reported as not run.']
  teachers = [r for n, r in sorted(records.items()) if n.startswith('teacher/')]
  if teachers:
    lines += ['', 'Teachers (the priors), greedy test accuracy: ' + ', '.join(
        f"`{r['name']}` {100 * r['accuracy']:.1f}%" for r in teachers) + '.']
  codes = collections.Counter((r.get('code') or {}).get('commit') for r in records.values())
  lines += ['', 'Code versions: ' + ', '.join(
      f'`{(c or "unknown")[:10]}` ({n} runs)' for c, n in codes.most_common()) + '.']
  hosts = collections.Counter(r.get('machine') for r in records.values())
  if any(hosts):
    lines += ['', 'Machines (`results2/machines.jsonl`; step times are compared only between '
              'runs on the same one): ' + ', '.join(
                  f'{m or "unlisted"} ({n} runs)' for m, n in hosts.most_common()) + '.']
  return lines + ['']


def _verdict_table(grid, records, seeds_allowed=None):
  """The verdict rows and the number of comparisons with at least two paired seeds."""
  lines = ['| setting | eta | ' + ' | '.join(BASELINES) + ' |',
           '|---|---|' + '---|' * len(BASELINES)]
  compared = 0
  for setting in grid.SETTINGS:
    method = selected_method(grid, setting, 'target_sft')
    if method is None:
      lines.append(f'| {setting} | (not selected yet) |' + ' - |' * len(BASELINES))
      continue
    cells = []
    for family in BASELINES:
      baseline = selected_method(grid, setting, family)
      result = (paired(records, setting, method, baseline, seeds_allowed) if baseline
                else None)
      if result is None:
        cells.append('-')
        continue
      compared += len(result['seeds']) > 1
      half = '' if math.isnan(result['half']) else f' ± {100 * result["half"]:.1f}'
      low, high = result['bootstrap']
      cells.append(f'**{result["verdict"]}** {100 * result["mean"]:+.1f}{half} '
                   f'[{100 * low:+.1f}, {100 * high:+.1f}] ({len(result["seeds"])})')
    lines.append(f'| {setting} | {method.split("eta")[-1]} | ' + ' | '.join(cells) + ' |')
  return lines, compared


def _verdicts(grid, records):
  table, compared = _verdict_table(grid, records)
  lines = ['## Verdict: Target-SFT (eta selected on validation) against each baseline', '',
           'Per setting, greedy test accuracy of Target-SFT minus the baseline, paired by seed '
           '(same data order and corruptions), in points: mean ± 95% Student-t half-width over '
           'seeds, [bootstrap 95% interval over seeds and problems together], (n) seeds, and the '
           'verdict (win / loss when the seed-level interval excludes 0, else tie; n/a with one '
           "seed). Tuned baselines are at their own selected value; '-' means not run yet.", '',
           *table, '',
           f'{compared} comparisons have two or more seeds. Each is at 95% without correction '
           f'for multiplicity: were every method equal, about {0.05 * compared:.1f} of them '
           'would still read win or loss by chance.', '']
  added = tuple(s for s in grid.PRIMARY_SEEDS if s not in grid.SELECTION_SEEDS)
  table, compared = _verdict_table(grid, records, added)
  lines += [f'### The same on seeds {", ".join(map(str, added))} only', '',
            f'Seeds {", ".join(map(str, grid.SELECTION_SEEDS))} of a tuned value are the runs '
            'its selection was made on: their test scores share the luck that won the '
            'selection, which favours the tuned method (pre-registered, so kept above). The '
            'added seeds were trained after the selection and carry no such bias.', '',
            *table, '']
  return lines


def _seed_accuracies(records, setting, method) -> dict[int, float]:
  return {int(r['name'].split('/')[2]): r['accuracy'] for r in _runs(records, setting, method)}


def _power(grid, records):
  """What the planned seeds can resolve, from the seed-to-seed spread seen so far (planning,
  not a result): per task and primary baseline, the pooled SD over seeds of a Target-SFT value
  minus the baseline."""
  pooled = collections.defaultdict(lambda: [0.0, 0])  # (task, baseline) -> [squares, df]
  for setting in grid.SETTINGS:
    for method in grid.TUNED['target_sft']:
      ours = _seed_accuracies(records, setting, method)
      for baseline in grid.PRIMARY_FIXED:
        theirs = _seed_accuracies(records, setting, baseline)
        diffs = np.array([ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))])
        if len(diffs) > 1:
          entry = pooled[grid.task_family_of(f'{setting}/{method}/0'), baseline]
          entry[0] += float(np.sum((diffs - diffs.mean()) ** 2))
          entry[1] += len(diffs) - 1
  lines = ['## Power: what the planned seeds can resolve (planning, not a result)', '']
  if not pooled:
    return lines + ['Not estimable yet: no Target-SFT value and primary baseline share two '
                    'seeds in any setting.', '']
  everyone = len(grid.PRIMARY_SEEDS)
  added = len([s for s in grid.PRIMARY_SEEDS if s not in grid.SELECTION_SEEDS])
  lines += [
      'The SD over seeds of a paired difference (Target-SFT at each eta minus the baseline, '
      'pooled over the settings of a task), and what it implies for the verdict tables, in '
      'points: *called from* is the smallest observed gap they call a win or a loss (the 95% '
      'half-width, t_0.975 x SD / sqrt(n); a true gap of that size is called only about half '
      'the time), *80% power at* the true gap they call four times in five ((t_0.975 + t_0.80) '
      f'x SD / sqrt(n)); for all {everyone} primary seeds and for the {added} seeds added after '
      'the selection. The three etas share the baseline\'s runs, so the degrees of freedom '
      'overstate what the SD rests on, and an SD from so few seeds is itself uncertain.', '',
      f'| task | baseline | SD (points) | degrees of freedom | called from, {everyone} seeds '
      f'| 80% power at, {everyone} seeds | called from, {added} seeds '
      f'| 80% power at, {added} seeds |', '|---|---|---|---|---|---|---|---|']
  for (task, baseline), (squares, df) in sorted(pooled.items()):
    sd = math.sqrt(squares / df)
    cells = []
    for n in (everyone, added):
      scale = 100 * sd / math.sqrt(n)
      called = stats.t_975(n - 1) * scale
      cells += [f'{called:.1f}', f'{called + stats.t_quantile(0.8, n - 1) * scale:.1f}']
    lines.append(f'| {task} | {baseline} | {100 * sd:.1f} | {df} | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def _accuracy(grid, records):
  lines = ['## Accuracy', '', 'Greedy test accuracy in percent (mean ± 95% Student-t half-width '
           'over seeds, (n) seeds), each tuned method at its selected value (the values it was '
           'not selected at are in the sweep table further down); then Average@4 and pass@4 on '
           f'the first {grid.MEASURE["sampled_problems"]} test problems.', '',
           '| method | ' + ' | '.join(grid.SETTINGS) + ' |', '|---|' + '---|' * len(grid.SETTINGS)]
  base = {t: r for n, r in records.items() if n.startswith('base/') for t in [n.split('/')[1]]}
  lines.append('| base (no training) | ' + ' | '.join(
      _cell([base[grid.SETTINGS[s][0]]['accuracy']]) if grid.SETTINGS[s][0] in base else '-'
      for s in grid.SETTINGS) + ' |')
  families = list(grid.PRIMARY_FIXED) + list(grid.TUNED)
  chosen = lambda s, f: selected_method(grid, s, f)
  for family in families:
    row = [_cell([r['accuracy'] for r in _runs(records, s, chosen(s, f))]) if chosen(s, f)
           else '-' for s in grid.SETTINGS for f in [family]]
    if any(c != '-' for c in row):
      lines.append(f'| {family} (selected) | ' + ' | '.join(row) + ' |' if family in grid.TUNED
                   else f'| {family} | ' + ' | '.join(row) + ' |')
  lines += ['', '| method (Average@4 / pass@4) | ' + ' | '.join(grid.SETTINGS) + ' |',
            '|---|' + '---|' * len(grid.SETTINGS)]
  for family in families:
    row = []
    for s in grid.SETTINGS:
      method = chosen(s, family)
      runs = [r for r in _runs(records, s, method) if _value(r, 'test_sampled') is not None
              ] if method else []
      row.append('-' if not runs else
                 f"{_cell([_value(r, 'test_sampled') for r in runs])} / "
                 f"{_cell([_value(r, 'test_sampled', 'pass_at_4') for r in runs])}")
    if any(c != '-' for c in row):
      lines.append(f'| {family} | ' + ' | '.join(row) + ' |')
  return lines + ['']


def _sweep(grid, records):
  lines = ['## The full sweep of every tuned family (seeds 0-1; labelled, not results)', '',
           'Greedy accuracy in percent on validation (what selects) / test, mean over the '
           'selection seeds; the selected value in bold.', '',
           '| setting | ' + ' | '.join(m for values in grid.TUNED.values() if values != grid.TUNED[
               'target_sft'] for m in values) + ' |',
           '|---|' + '---|' * sum(len(v) for f, v in grid.TUNED.items() if f != 'target_sft')]
  for setting in grid.SETTINGS:
    cells = []
    for family, values in grid.TUNED.items():
      if family == 'target_sft':
        continue
      for method in values:
        runs = [r for r in _runs(records, setting, method) if r['seed'] in grid.SELECTION_SEEDS]
        valid = [_value(r, 'validation') for r in runs if _value(r, 'validation') is not None]
        text = (f'{100 * np.mean(valid):.1f} / {100 * np.mean([r["accuracy"] for r in runs]):.1f}'
                if valid else '-')
        cells.append(f'**{text}**' if method == selected_method(grid, setting, family) else text)
    if any(c != '-' for c in cells):
      lines.append(f'| {setting} | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def _eta(grid, records):
  lines = ['## Sensitivity to eta (the full sweep, seeds 0-1)', '',
           'Greedy accuracy in percent on validation (what selects) and on test (reported only), '
           'mean ± 95% half-width over seeds; DFT is eta = 0.', '',
           '| setting | ' + ' | '.join(['dft (0)'] + [m.split('eta')[-1]
                                                       for m in grid.TUNED['target_sft']]) +
           ' | selected |', '|---|' + '---|' * (len(grid.TUNED['target_sft']) + 2)]
  for setting in grid.SETTINGS:
    cells = []
    for method in ('dft',) + grid.TUNED['target_sft']:
      runs = [r for r in _runs(records, setting, method) if r['seed'] in grid.SELECTION_SEEDS]
      valid = [_value(r, 'validation') for r in runs if _value(r, 'validation') is not None]
      cells.append(f"val {_cell(valid)}; test {_cell([r['accuracy'] for r in runs])}"
                   if runs else '-')
    chosen = selected_method(grid, setting, 'target_sft')
    lines.append(f'| {setting} | ' + ' | '.join(cells) + f' | {chosen or "-"} |')
  return lines + ['']


def _cost(grid, records):
  lines = ['## Cost: step time relative to SFT', '',
           "Each run's mean step time divided by the mean of SFT's runs in the same setting on "
           'the same machine, then the geometric mean over the method\'s runs, in wall seconds / '
           'process CPU seconds (all threads, background checkpoint writes included), (n) runs. '
           'Wall time counts whatever else ran on the machine; CPU time counts it much less, but '
           "XLA's thread pool and cache contention still move it.", '',
           '| method | ' + ' | '.join(grid.SETTINGS) + ' |', '|---|' + '---|' * len(grid.SETTINGS)]
  for method in grid.METHODS:
    row = []
    for s in grid.SETTINGS:
      ratios = {'mean_step_seconds': [], 'mean_step_cpu_seconds': []}
      sft = _runs(records, s, 'sft')
      for run in _runs(records, s, method):
        for field, kept in ratios.items():
          same = [r[field] for r in sft if r.get(field) and r.get('machine') == run.get('machine')]
          if run.get(field) and same:
            kept.append(run[field] / np.mean(same))
      wall, cpu = ratios['mean_step_seconds'], ratios['mean_step_cpu_seconds']
      geometric = lambda xs: float(np.exp(np.mean(np.log(xs))))
      row.append(f'{geometric(wall):.2f} / {geometric(cpu):.2f} ({len(cpu)})' if wall and cpu
                 else '-')
    if any(c != '-' for c in row):
      lines.append(f'| {method} | ' + ' | '.join(row) + ' |')
  return lines + ['']


def _calibration_and_fit(grid, records):
  lines = ['## Calibration, fit and generalisation', '',
           'Per method and setting, mean over seeds: token-level ECE (15 bins) and NLL on '
           f'{grid.MEASURE["calibration_examples"]} held-out clean demonstrations '
           '(teacher-forced); training NLL of the first '
           f'{grid.MEASURE["fit_examples"]} training examples; mean answer confidence of right '
           '/ wrong greedy answers; greedy accuracy on the harder and easier variants (seeds 0-1; '
           'Base in the first row of each setting).', '',
           '| setting | method | ECE | held-out NLL | train NLL | confidence right / wrong | '
           'harder | easier |', '|---|---|---|---|---|---|---|---|']
  for setting in grid.SETTINGS:
    base = records.get(f'base/{grid.SETTINGS[setting][0]}')
    for method, runs in [('base', [base] if base else [])] + [
        (m, _runs(records, setting, m)) for m in grid.METHODS]:
      if not runs:
        continue
      confidence = [c for c in map(_answer_confidence, runs) if c]
      mean = lambda xs, digits=3: f'{np.mean(xs):.{digits}f}' if xs else '-'
      lines.append(
          f"| {setting} | {method} | {mean([r['calibration']['ece'] for r in runs])} | "
          f"{mean([r['calibration']['held_out_nll'] for r in runs])} | "
          f"{mean([r['fit']['train_nll'] for r in runs])} | "
          f"{mean([c[0] for c in confidence], 2)} / {mean([c[1] for c in confidence], 2)} | "
          f"{_cell([_value(r, 'harder') for r in runs if _value(r, 'harder') is not None])} | "
          f"{_cell([_value(r, 'easier') for r in runs if _value(r, 'easier') is not None])} |")
  return lines + ['']


def _run_table(records):
  lines = ['## Runs', '', '| run | greedy test | wall s | step s (CPU s) | commit | command |',
           '|---|---|---|---|---|---|']
  for name, r in sorted(records.items()):
    code = r.get('code') or {}
    commit = (code.get('commit') or '?')[:10] + (' (dirty)' if code.get('dirty') else '')
    step = (f"{r['mean_step_seconds']:.2f} ({r.get('mean_step_cpu_seconds') or math.nan:.2f})"
            if r.get('mean_step_seconds') else '-')
    lines.append(f"| {name} | {100 * r['accuracy']:.1f} | {r['wall_seconds']:.0f} | {step} | "
                 f"{commit} | `{r['command']}` |")
  return lines
