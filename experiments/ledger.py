"""A grid's ledger: how many runs are recorded and still to go, the machine time they took
against the budget, the code versions they ran at, the machines, and the table of every run."""

import collections
import math
import pathlib
import re
import subprocess

import numpy as np

from experiments import ROOT

CORES = 2  # the pre-registered grid's machine's; CPU seconds / CORES is a run's wall time alone
BUDGET_HOURS = 12  # its budget (PREREGISTRATION.md): the whole grid in about 12 h of machine time


def git(root: pathlib.Path, *args) -> str | None:
  """git's output in ``root``, or None where git cannot answer (no git, not a repository, a
  commit this checkout lacks: a shallow clone or an archive)."""
  try:
    result = subprocess.run(['git', *args], cwd=root, capture_output=True, text=True,
                            timeout=60, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return result.stdout if result.returncode == 0 else None


def code_version() -> dict:
  """The commit the code runs at, and whether tracked files differ from it."""
  ask = lambda *args: git(ROOT, *args) or ''  # '' where git cannot answer
  return {'commit': ask('rev-parse', 'HEAD').strip() or None,
          'dirty': bool(ask('status', '--porcelain', '--untracked-files=no').strip())}


def rates(grid, trained):
  """Wall and CPU seconds of the trained runs, by whether a run is measured on validation, from
  the machine the grid runs on now once it has a few runs (machines differ), and that machine
  when its runs are the ones counted (else None)."""
  walls, cpus = {True: [], False: []}, {True: [], False: []}
  current = max(trained, key=lambda r: r.get('finished') or '').get('machine')
  on_current = [r for r in trained if r.get('machine') == current]
  timed = on_current if current and len(on_current) >= 3 else trained
  for r in timed:
    walls[grid.on_validation(r['name'])].append(r['wall_seconds'])
    if r.get('cpu_seconds'):
      cpus[grid.on_validation(r['name'])].append(r['cpu_seconds'])
  return walls, cpus, (current if timed is on_current else None)


def _median(values):
  return float(np.median(values)) if values else None


def hours_left(grid, seconds: dict, names: list[str], per_run=1.0) -> tuple[float, dict]:
  """The hours the training runs among ``names`` need, each at the median of ``seconds`` of
  its kind (measured on validation or not; the other kind's median while one has none) divided
  by ``per_run``, in all and by what it is in the plan. Medians: a run that shared the machine
  or was paused inflates a mean."""
  rate = lambda v: (_median(seconds[v]) or _median(seconds[not v])) / per_run
  runs = [n for n in names if n.count('/') == 2]
  by_kind = collections.defaultdict(float)  # what each of the budget's cuts would save
  for name in runs:
    by_kind[grid.kind(name)] += rate(grid.on_validation(name))
  total = sum(rate(grid.on_validation(n)) for n in runs)
  return total / 3600, {kind: s / 3600 for kind, s in by_kind.items()}


def hours_spent(attempts: list[dict]) -> float:
  """The wall hours of the records (a run interrupted and restarted counts its finished
  attempt only)."""
  return sum(r.get('wall_seconds') or 0 for r in attempts) / 3600


def _time_left(grid, trained, missing, cut) -> list[str]:
  """What the runs still to go need at the medians of the runs so far (by wall time and by CPU
  seconds)."""
  walls, cpus, machine = rates(grid, trained)
  shown = lambda xs: f'{_median(xs):.0f} s ({len(xs)} runs)' if xs else 'none yet'
  left, by_kind = hours_left(grid, walls, missing)
  cut_hours = hours_left(grid, walls, cut)[0]
  families = sorted({grid.task_of(r['name']) for r in trained})
  unmeasured = sorted(set(grid.tasks) - set(families))
  lines = ['', 'Measured wall time per run (training, export and measurement), median' + (
      f' on {machine}, the machine the latest runs ran on' if machine else '') + ': '
           f'{shown(walls[True])} for runs measured on validation too (pre-registered '
           f'estimate 330 s), {shown(walls[False])} for the others (estimate 260 s; '
           'PREREGISTRATION change 11 found the first runs on the first machine about twice '
           'the estimates); CPU '
           f'seconds, recorded from PREREGISTRATION change 14 on: {shown(cpus[True])} and '
           f'{shown(cpus[False])}. ' + (
               f'At these rates the {len(missing)} planned runs still to go need about '
               f'{left:.1f} h' if missing else 'No planned run is still to go') + (
               ' (' + ', '.join(f'{kind} {hours:.1f} h'
                                for kind, hours in sorted(by_kind.items())) +
               ')' if by_kind else '') + (
               f'; the {len(cut)} cut ones would need about {cut_hours:.1f} h at these '
               'rates' if cut else '') + (
               f' (no run of {", ".join(unmeasured)} is trained yet; products2 generates up '
               'to twice the tokens of chain3, so this is low)' if unmeasured else '') + '.']
  if missing and (cpus[True] or cpus[False]):
    # Pauses and other work inflate wall time; a run alone keeps both cores busy, so its CPU
    # seconds over 2 approximate its wall time alone.
    cpu_left = hours_left(grid, cpus, missing, per_run=CORES)[0]
    lines += ['', f'At the CPU-second rates instead (CPU seconds / {CORES}, this machine\'s '
              f'cores: a run alone keeps both busy), the runs still to go need about '
              f'{cpu_left:.1f} h; measurement became about 2x faster with '
              'PREREGISTRATION change 15 (the runs from chain3_multi/sft/0 on).']
  return lines


def _spent(grid, attempts, cut) -> list[str]:
  spent = hours_spent(attempts)
  if spent <= BUDGET_HOURS:
    return []
  return ['', f'**The budget is spent.** The {len(attempts)} records of `runs.jsonl` '
          f'(replaced teacher records included; a run interrupted and restarted counts only '
          f'its finished attempt) took {spent:.1f} h of wall time, against the budget of '
          f'about {BUDGET_HOURS} h. As PREREGISTRATION change 23 records, the primaries run '
          'to all their seeds (never cut), then the prior-quality axis, and the '
          'secondaries, the first cut, last; ' + (
              'PREREGISTRATION change 26 cuts the secondaries (' +
              ', '.join(grid.cut_families) + f'): none of their {len(cut)} '
              'planned runs (the selection runs; the seeds after a selection come on top) is '
              'run, and no number here stands for them. Emptying the config\'s '
              '`CUT_FAMILIES` resumes them.' if cut else
              'whether to spend the machine time the last two need is not decided here.')]


def status(grid, records, planned, replaced=(), config='') -> list[str]:
  """The status and budget section: runs recorded, still to go and cut, the time they need,
  the budget, the teachers, the code versions and the machines."""
  cut = [n for n in planned if n not in records and grid.cut(n)]
  missing = [n for n in planned if n not in records and not grid.cut(n)]
  trained = [r for r in records.values() if r['method'] not in ('base', 'teacher')]
  lines = ['## Status and budget', '',
           f'{len(planned) - len(missing) - len(cut)} of the {len(planned)} runs planned so far '
           'are recorded' + (f' and {len(cut)} are cut by the budget (never run; see below)'
                             if cut else '') +
           '; runs waiting for a selection are added when it is made, and '
           f'`python -m experiments.compare run --config {config}` resumes.']
  if trained:
    lines += _time_left(grid, trained, missing, cut)
  lines += ['', 'Pre-registered estimate (`PREREGISTRATION.md`, before any run): about 249 runs, '
            '20.5 h of this machine in all, 11.9 h for the teachers, Base and the primaries of '
            f'the six settings, which run first; over the budget of {BUDGET_HOURS} h the '
            'secondaries and the prior-quality axis are cut first. Whatever has not run is '
            'reported as not run.']
  lines += _spent(grid, list(records.values()) + list(replaced), cut)
  teachers = [r for n, r in sorted(records.items()) if n.startswith('teacher/')]
  if teachers:
    lines += ['', 'Teachers (the priors), greedy test accuracy: ' + ', '.join(
        f"`{r['name']}` {100 * r['accuracy']:.1f}%" for r in teachers) + '.']
  lines += code_versions(list(records.values()) + list(replaced), grid.run_code)
  hosts = collections.Counter(r.get('machine') for r in records.values())
  if any(hosts):
    lines += ['', f'Machines (`{grid.folder}/machines.jsonl`; step times are compared only '
              'between runs on the same one): ' + ', '.join(
                  f'{m or "unlisted"} ({n} runs)' for m, n in hosts.most_common()) + '.']
  return lines + ['']


def _commits(records: list[dict]):
  """Each commit the records ran at, with the first finished time, and the counts of records
  trained, measured and with uncommitted changes at it."""
  first, trained, measured = {}, collections.Counter(), collections.Counter()
  dirty = collections.Counter()
  for r in sorted(records, key=lambda r: r.get('finished') or ''):
    if r.get('method') == 'base':  # never trained: measured at its only commit
      roles = [('measure_code' if r.get('measure_code') else 'code', measured)]
    else:  # trained at 'code', measured at 'measure_code' where it has one
      roles = [('code', trained), ('measure_code' if r.get('measure_code') else 'code', measured)]
    dirty_in = set()
    for role, counts in roles:
      code = r.get(role) or {}
      if code.get('commit'):
        first.setdefault(code['commit'], r.get('finished') or '-')
        counts[code['commit']] += 1
        if code.get('dirty'):
          dirty_in.add(code['commit'])
    dirty.update(dirty_in)  # a record counts once per commit
  return first, trained, measured, dirty


def code_versions(records: list[dict], run_code: tuple, root: pathlib.Path = ROOT) -> list[str]:
  """Each commit the records (replaced ones included) were trained or measured at, in the order
  of their first finished record, with the files of ``run_code`` changed from the previous
  commit and the commits between that changed them: where the grid's code changed. Base is
  measured, never trained: its ``code`` counts as measured."""
  first, trained, measured, dirty = _commits(records)
  if not first:
    return []
  lines = ['', "Code versions. Each commit the runs' records were trained or measured at "
           '(replaced records included; Base is measured only), in the order of its first '
           'finished record, with the files of the runs\' code changed from the previous one '
           '(`git diff --name-only` over `' + '`, `'.join(run_code) + '`: any edit counts, '
           'comments included) and the commits in between that changed them (`git show` '
           'gives each one\'s reason; PREREGISTRATION.md the plan\'s changes). These two columns '
           'come from the checkout\'s git history, not from the records.', '',
           '| commit | first record finished | records trained / measured | files changed from '
           'the previous commit | commits that changed them |', '|---|---|---|---|---|']
  previous = None
  for commit, when in first.items():
    if previous is None:
      change, via = 'the first version', '-'
    else:
      files = git(root, 'diff', '--name-only', '-z', previous, commit, '--', *run_code)
      between = git(root, 'log', '--format=%h', f'{previous}..{commit}', '--', *run_code)
      if files is None or between is None:
        change, via = 'unknown: git could not compare the two here', '-'
      else:
        change = ', '.join(f'`{f}`' for f in files.split('\0') if f) or 'none'
        via = ', '.join(f'`{h}`' for h in between.split()) or '-'
    note = f' ({dirty[commit]} with uncommitted changes)' if dirty[commit] else ''
    lines.append(f'| `{commit[:10]}` | {when} | {trained[commit]} / {measured[commit]}{note} | '
                 f'{change} | {via} |')
    previous = commit
  return lines


def run_table(grid, records, superseded=()) -> list[str]:
  """Every recorded run: accuracy (full credit and as recorded), times, machine, commit and its
  command; then the records a later one of the same name replaced."""
  lines = ['## Runs', '', 'Greedy test accuracy with full credit only (the metric above) and as '
           '`runs.jsonl` records it (partial credit averaged in; what `rescore` checks); the '
           f'machine is the CPU model of `{grid.folder}/machines.jsonl`.', '',
           '| run | greedy test | recorded | wall s | step s (CPU s) | machine | commit | command |',
           '|---|---|---|---|---|---|---|---|']
  for name, r in sorted(records.items()):
    code = r.get('code') or {}
    commit = (code.get('commit') or '?')[:10] + (' (dirty)' if code.get('dirty') else '')
    step = (f"{r['mean_step_seconds']:.2f} ({r.get('mean_step_cpu_seconds') or math.nan:.2f})"
            if r.get('mean_step_seconds') else '-')
    recorded = (r.get('scored') or {}).get('test_greedy', {}).get('recorded_accuracy',
                                                                  r['accuracy'])
    machine = re.sub(r', \d+ cores', '', r.get('machine') or '-')  # the model and extensions
    lines.append(f"| {name} | {100 * r['accuracy']:.1f} | {100 * recorded:.1f} | "
                 f"{r['wall_seconds']:.0f} | {step} | {machine} | {commit} | `{r['command']}` |")
  if superseded:
    lines += ['', 'Records a later record of the same name replaced (a teacher trained again on '
              'a machine without its export: PREREGISTRATION change 21); the runs recorded '
              'before the replacement used these as their prior. Their prediction files were '
              'overwritten by the replacement\'s.', '',
              '| run | recorded greedy test | finished | commit | final training loss |',
              '|---|---|---|---|---|']
    for r in superseded:
      loss = (r.get('final_metrics') or {}).get('loss')
      lines.append(f"| {r['name']} | {100 * r['accuracy']:.1f} | {r.get('finished', '-')} | "
                   f"{((r.get('code') or {}).get('commit') or '?')[:10]} | "
                   f"{'-' if loss is None else f'{loss:.6f}'} |")
  return lines
