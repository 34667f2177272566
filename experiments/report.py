"""The report of a grid without a pre-registered run plan (the exploratory grid's
RESULTS_exploratory.md, the paper grid's RESULTS_qwen.md) and its plots, from the grid's
runs.jsonl (compare.py ``report``; the pre-registered grid's is report2.py).

Everything in the file is computed from the recorded runs; the exploratory grid's discussion is
kept by hand in ``experiments/discussion.md`` and included verbatim.
"""

import collections
import json
import math
import pathlib
import re

from qtarget import evaluate

import stats  # pylint: disable=import-error  (experiments/stats.py)

ETA_METHODS = (('dft', 0.0),)  # DFT is Target-SFT at eta = 0


def _cell(values: list[float]) -> str:
  if not values:
    return '-'
  mean, half = stats.mean_and_interval(values)
  interval = '' if math.isnan(half) else f' ± {100 * half:.1f}'
  return f'{100 * mean:.1f}{interval} ({len(values)})'


def _by(records, key_fn, value='accuracy'):
  table = collections.defaultdict(list)
  for r in records:
    table[key_fn(r)].append(r[value])
  return table


def _prediction_rows(record) -> list[dict]:
  return evaluate.read_predictions(stats.ROOT / record['predictions'], fields=('score',))


def _exact_share(rows: list[dict]) -> float:
  """Fraction of a run's samples with a fully correct answer (score 1)."""
  return sum(evaluate.full_credit(r['score']) for r in rows) / len(rows)


_STEP = re.compile(r'^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$')
_OPERATIONS = {'+': lambda a, b: a + b, '-': lambda a, b: a - b, '*': lambda a, b: a * b}


def sample_shape(rows: list[dict]) -> dict[str, float] | None:
  """How a run's chain_sum samples are written, from its predictions.

  Returns the share of samples with the closing ``####`` line, the mean number of step lines
  (``a op b = c``), the share with more steps than the problem has operations, and the share of
  written steps whose arithmetic is right; None when the predictions are not chain_sum.
  """
  counts = collections.Counter()
  for row in rows:
    metadata = row.get('metadata')
    inner = json.loads(metadata).get('metadata', {}) if isinstance(metadata, str) else {}
    if not isinstance(inner, dict) or inner.get('source_dataset') != 'chain_sum':
      return None
    steps = [m.groups() for m in map(_STEP.match, row['output'].split('\n')) if m]
    counts['samples'] += 1
    counts['closing'] += '####' in row['output']
    counts['steps'] += len(steps)
    counts['overlong'] += len(steps) > inner['num_terms'] - 1
    counts['right_steps'] += sum(_OPERATIONS[op](int(a), int(b)) == int(c)
                                 for a, op, b, c in steps)
  if not counts['samples']:
    return None
  n = counts['samples']
  return {'closing': counts['closing'] / n, 'steps': counts['steps'] / n,
          'overlong': counts['overlong'] / n,
          'step_accuracy': counts['right_steps'] / counts['steps'] if counts['steps'] else math.nan}


def _shape_table(grid, records) -> list[str]:
  shapes = collections.defaultdict(list)
  for r in records:
    if r['setting'] and r['shape'] is not None:
      shapes[(r['setting'], r['method'])].append(r['shape'])
  if not shapes:
    return []
  lines = ['| setting | method | closing `####` line | steps per sample | more steps than '
           'operations | written steps with right arithmetic |', '|---|---|---|---|---|---|']
  for setting in grid.SETTINGS:
    for method in grid.METHODS:
      runs = shapes.get((setting, method))
      if runs:
        mean = lambda key: sum(run[key] for run in runs) / len(runs)  # pylint: disable=cell-var-from-loop
        lines.append(f"| {setting} | {method} | {100 * mean('closing'):.0f}% | "
                     f"{mean('steps'):.2f} | {100 * mean('overlong'):.0f}% | "
                     f"{100 * mean('step_accuracy'):.0f}% |")
  return lines


def _table(grid, cells, base_values) -> list[str]:
  lines = ['| method | ' + ' | '.join(grid.SETTINGS) + ' |', '|---|' + '---|' * len(grid.SETTINGS)]
  lines.append('| base (no training) | ' + ' | '.join(_cell(base_values) for _ in grid.SETTINGS)
               + ' |')
  for method in grid.METHODS:
    name, hparams, prior = grid.METHODS[method]
    label = f'{method} ({name}{", " if hparams else ""}' + ', '.join(
        f'{k_}={v}' for k_, v in hparams.items()) + (f'; prior {prior}' if prior else '') + ')'
    lines.append(f'| {label} | ' + ' | '.join(_cell(cells[(s, method)]) for s in grid.SETTINGS)
                 + ' |')
  return lines


PAIRED_BASELINES = ('sft', 'dft', 'distill')  # the paper's claim: Target-SFT beats these


def paired_differences(grid, records) -> dict[tuple[str, str, str], list[float]]:
  """Target-SFT minus baseline accuracy, one value per seed where both ran.

  Keyed by (Target-SFT method, baseline, setting). A seed fixes the data order, the corrupted
  problems and the sampling keys, and every run is scored on the same held-out problems, so the
  difference within a seed removes the part of the noise the two runs share.
  """
  accuracy = {(r['setting'], r['method'], r['seed']): r['accuracy'] for r in records
              if r['setting']}
  ours = [m for m, (name, _, _) in grid.METHODS.items() if name == 'target_sft']
  differences = {}
  for method in ours:
    for baseline in (b for b in PAIRED_BASELINES if b in grid.METHODS):
      for setting in grid.SETTINGS:
        differences[(method, baseline, setting)] = [
            accuracy[(setting, method, seed)] - accuracy[(setting, baseline, seed)]
            for seed in grid.SEEDS
            if (setting, method, seed) in accuracy and (setting, baseline, seed) in accuracy]
  return differences


def _paired_table(grid, records) -> list[str]:
  differences = paired_differences(grid, records)
  columns = list(dict.fromkeys((b, s) for _, b, s in differences))  # baseline, then setting
  lines = ['| Target-SFT | ' + ' | '.join(f'vs {b} ({s})' for b, s in columns) + ' |',
           '|---|' + '---|' * len(columns)]
  for method in dict.fromkeys(m for m, _, _ in differences):  # the grid's order
    cells = []
    for baseline, setting in columns:
      values = differences[(method, baseline, setting)]
      if not values:
        cells.append('-')
        continue
      mean, half = stats.mean_and_interval(values)
      interval = '' if math.isnan(half) else f' ± {100 * half:.1f}'
      wins = sum(v > 0 for v in values)
      cells.append(f'{100 * mean:+.1f}{interval} ({wins}/{len(values)})')
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  return lines


def _eta_of(grid, method: str):
  if method == 'dft':
    return 0.0
  name, hparams, prior = grid.METHODS[method]
  if name == 'target_sft' and prior == 'teacher':
    return hparams['eta']
  return None


def _plots(grid, records, out_dir: pathlib.Path, prefix: str = '') -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  cells = _by([r for r in records if r['setting']], lambda r: (r['setting'], r['method']))
  # Accuracy against eta (Target-SFT with the teacher prior; eta = 0 is DFT).
  fig, ax = plt.subplots(figsize=(6, 4))
  for setting in grid.SETTINGS:
    points = sorted((_eta_of(grid, m), cells[(setting, m)]) for m in grid.METHODS
                    if _eta_of(grid, m) is not None and cells[(setting, m)])
    if not points:
      continue
    etas = [p[0] for p in points]
    intervals = [stats.mean_and_interval(p[1]) for p in points]
    ax.errorbar(etas, [100 * s[0] for s in intervals],
                yerr=[0 if math.isnan(s[1]) else 100 * s[1] for s in intervals], marker='o',
                capsize=3, label=setting)
  ax.set_xlabel('eta (0 = DFT; prior = teacher)')
  ax.set_ylabel(f'held-out Average@{grid.EVAL["num_samples"]} (%)')
  ax.set_title('Target-SFT: accuracy against eta (95% intervals over seeds)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_dir / f'{prefix}accuracy_vs_eta.png', dpi=120)
  plt.close(fig)
  written.append(f'{prefix}accuracy_vs_eta.png')
  # Accuracy against the fraction of corrupted demonstrations (single-rationale settings).
  noise = {s: spec['rationale'].get('corrupt_fraction', 0.0) for s, spec in grid.SETTINGS.items()
           if spec['rationale'].get('variants', 1) == 1}
  if len(set(noise.values())) > 1:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in grid.METHODS:
      points = sorted((noise[s], cells[(s, method)]) for s in noise if cells[(s, method)])
      if not points:
        continue
      intervals = [stats.mean_and_interval(p[1]) for p in points]
      ax.errorbar([p[0] for p in points], [100 * s[0] for s in intervals],
                  yerr=[0 if math.isnan(s[1]) else 100 * s[1] for s in intervals], marker='o',
                  capsize=3, label=method)
    ax.set_xlabel('fraction of training problems with a corrupted step')
    ax.set_ylabel(f'held-out Average@{grid.EVAL["num_samples"]} (%)')
    ax.set_title('Accuracy against demonstration noise')
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / f'{prefix}accuracy_vs_noise.png', dpi=120)
    plt.close(fig)
    written.append(f'{prefix}accuracy_vs_noise.png')
  return written


def write(grid, registry, output: pathlib.Path, args, expected_runs: list[str]) -> None:
  """``expected_runs``: every run name of the grid (compare.run_names), to list what is missing."""
  output.parent.mkdir(parents=True, exist_ok=True)
  records = list(registry.records().values())
  k = grid.EVAL['num_samples']
  base = [r['accuracy'] for r in records if r['method'] == 'base']
  cells = _by([r for r in records if r['setting']], lambda r: (r['setting'], r['method']))
  lines = []
  if getattr(grid, 'EXPLORATORY', False):
    lines += ['# Exploratory grid (2026-11-26): kept for reference', '',
              '**This is the exploratory comparison whose Target-SFT eta was read off the test '
              'results** (36 paired comparisons, no correction; 64 held-out problems, 3 seeds, '
              '20 steps, one task). A pre-registered grid (validation-selected hyperparameters, '
              'more problems and seeds) is to replace it; it is kept unchanged below, as '
              f'generated by `python experiments/compare.py report --config {args.config}` from '
              f'`{args.results_dir}/runs.jsonl`; `python experiments/compare.py rescore '
              f'--config {args.config}` still reproduces it.', '', '']
  lines += ['# Method comparison: results', '',
            f'Generated by `python experiments/compare.py report --config {args.config}` from '
            f'`{args.results_dir}/runs.jsonl` ({len(records)} recorded runs). Every number is '
            f'held-out Average@{k} in percent: the mean over seeds, ± the half-width of the 95% '
            'Student-t interval over seeds, and (n) the number of seeds recorded so far. '
            f'`python experiments/compare.py rescore --config {args.config}` re-scores every '
            "saved prediction with the task's scorer and checks it against these numbers.", '']
  expected = expected_runs
  missing = [n for n in expected if n not in registry.records()]
  per_run = [r['wall_seconds'] for r in records if r['method'] not in ('base', 'teacher')]
  lines += ['## Status and budget', '',
            f'{len(expected) - len(missing)} of {len(expected)} runs recorded. '
            + (f'Still to run: {len(missing)} (`python experiments/compare.py run --config '
               f'{args.config}` resumes). '
               if missing else 'The grid is complete. ')
            + (f'A training run takes {sum(per_run) / len(per_run):.0f} s on average here '
               f'(min {min(per_run):.0f}, max {max(per_run):.0f}; load, compile, '
               f'{grid.get_config(expected[-1]).steps} steps and the evaluation), so the whole grid '
               f'needs about {(sum(per_run) / len(per_run)) * sum(1 for n in expected if "/" in n and not n.startswith("base/")) / 3600:.1f} h '
               'of this machine plus the teacher and Base.' if per_run else ''), '']
  # The exploratory grid's own task selection, discussion and plot names; another grid (the
  # paper's) gets none of them and plots named after its report.
  exploratory = getattr(grid, 'EXPLORATORY', False)
  selection = output.parent / 'results' / 'task_selection.jsonl'
  if exploratory and selection.exists():
    lines += ['## Task selection (before any comparison)', '',
              'Base accuracy of the untouched model on 64 held-out problems of each candidate '
              '(`python experiments/select_tasks.py`; greedy, and Average@4 / pass@4 at '
              'temperature 0.7, top-p 0.95). Kept: between about 5% and 50%.', '',
              '| task | difficulty | greedy | Average@4 | pass@4 |', '|---|---|---|---|---|']
    for row in map(json.loads, selection.read_text().splitlines()):
      if 'error' in row:
        lines.append(f"| {row['task']} | {row['difficulty']} | not usable: {row['error']} | | |")
      else:
        lines.append(f"| {row['task']} | {row['difficulty']} | {100 * row['greedy_accuracy']:.1f} "
                     f"| {100 * row['average_at_4']:.1f} | {100 * row['pass_at_4']:.1f} |")
    lines.append('')
  for r in records:
    rows = _prediction_rows(r)  # read once for both per-run summaries
    r['exact'] = _exact_share(rows)
    r['shape'] = sample_shape(rows) if r['setting'] else None
  lines += ['## Accuracy', '',
            f"Average@{k} with the task's own scorer (reasoning-gym's `score_answer`; for "
            'chain_sum it gives partial credit when the gold answer is a substring of the '
            "extracted one, e.g. 0.5 for '-4' against '4'):", '']
  lines += _table(grid, cells, base)
  lines += ['', 'The same samples counted as right only when fully correct (score 1):', '']
  lines += _table(grid, _by([r for r in records if r['setting']],
                            lambda r: (r['setting'], r['method']), 'exact'),
                  [r['exact'] for r in records if r['method'] == 'base'])
  lines += ['', '### Target-SFT against SFT, DFT and distillation, seed by seed', '',
            f'Average@{k} of each Target-SFT run minus that of the baseline run with the same '
            'seed and setting (same data order, corrupted problems and sampling keys; the same '
            'held-out problems everywhere), in points: mean over seeds ± the 95% Student-t '
            'half-width, and (w/n) the seeds where Target-SFT is ahead.', '']
  lines += _paired_table(grid, records)
  shape_lines = _shape_table(grid, records)
  if shape_lines:
    lines += ['', '### How the samples are written', '',
              'From the saved predictions, mean over seeds: the share of samples that end with '
              'the closing `#### N` line, step lines (`a op b = c`) per sample, the share that '
              'write more steps than the problem has operations, and the share of written steps '
              'whose arithmetic is right. A problem of 3 terms needs 2 steps.', '']
    lines += shape_lines
  teacher = next((r for r in records if r['name'] == 'teacher'), None)
  if teacher:
    lines += ['', f"Teacher (the 'teacher' prior): Average@{k} {100 * teacher['accuracy']:.1f} "
              f"on the same held-out problems, seed {teacher['seed']}, trained with "
              f"`{teacher['command']}` in {teacher['wall_seconds']:.0f} s."]
  lines += ['', '## Settings', '']
  for setting, spec in grid.SETTINGS.items():
    lines.append(f'- `{setting}`: {spec}')
  discussion = output.parent / 'discussion.md'
  if exploratory and discussion.exists():
    lines += ['', discussion.read_text().strip()]
  figures = _plots(grid, records, output.parent, '' if exploratory else output.stem + '_')
  lines += ['', '## Plots', ''] + [f'![{f}]({f})' for f in figures]
  total = sum(r['wall_seconds'] for r in records)
  lines += ['', '## Runs', '',
            f'Wall time of all recorded runs: {total / 3600:.2f} h on this machine. Each run is '
            'one command (Base: one evaluation).', '', '| run | Average@k | pass@k | wall s | '
            'command |', '|---|---|---|---|---|']
  for r in sorted(records, key=lambda r: r['name']):
    evaluation = r.get('eval') or {}
    lines.append(f"| {r['name']} | {100 * r['accuracy']:.1f} | "
                 f"{100 * evaluation.get(f'pass_at_{k}', math.nan):.1f} | "
                 f"{r['wall_seconds']:.0f} | `{r['command']}` |")
  output.write_text('\n'.join(lines) + '\n')
  print(f'wrote {output} and {", ".join(figures)}')
