"""The grid's ledger: how many runs are recorded and still to go, the machine time they took
against the budget, the code versions and machines, and the table of every run
(experiments/report2.py puts these first and last in RESULTS.md)."""

import collections
import math
import pathlib
import re

import numpy as np

import records2  # pylint: disable=import-error  (experiments/records2.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

CORES = 2  # the grid machine's; CPU seconds / CORES is a run's wall time alone
BUDGET_HOURS = 12  # the budget (PREREGISTRATION.md): the whole grid in about 12 h of machine time


def superseded(lines: list[dict]) -> list[dict]:
  """The records of runs.jsonl (``lines``, in file order) that a later one of the same name
  replaced."""
  last = {r['name']: i for i, r in enumerate(lines)}
  return [r for i, r in enumerate(lines) if last[r['name']] != i]


def status(grid, records, planned, replaced=()):
  is_cut = getattr(grid, 'is_cut', lambda name: False)
  cut = [n for n in planned if n not in records and is_cut(n)]
  missing = [n for n in planned if n not in records and not is_cut(n)]
  trained = [r for r in records.values() if r['method'] not in ('base', 'teacher')]
  lines = ['## Status and budget', '',
           f'{len(planned) - len(missing) - len(cut)} of the {len(planned)} runs planned so far '
           'are recorded' + (f' and {len(cut)} are cut by the budget (never run; see below)'
                             if cut else '') +
           '; runs waiting for a selection are added when it is made, and '
           '`python experiments/compare.py run --config configs/compare2_smollm2.py` resumes.']
  if trained:
    # Medians, by what a run measures (validation or not): a run that shared the machine or was
    # paused inflates a mean. Only chain3 has run so far where products2 has no trained run: its
    # runs generate twice the tokens, so the estimate is low until they are measured.
    validated = lambda name: stats.measured_on_validation(grid, name)
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
    cut_hours = sum(rate(validated(n)) for n in cut) / 3600
    by_kind = collections.defaultdict(float)  # what each of the budget's cuts would save
    for n in missing:
      if n.count('/') == 2:
        by_kind[records2.run_kind(grid, n)] += rate(validated(n))
    families = sorted({grid.task_family_of(r['name']) for r in trained})
    unmeasured = sorted(set(grid.TASKS) - set(families))
    lines += ['', 'Measured wall time per run (training, export and measurement), median' + (
        f' on {current}, the machine the latest runs ran on' if timed is on_current else '') +
              ': '
              f'{shown(walls[True])} for runs measured on validation too (pre-registered '
              f'estimate 330 s), {shown(walls[False])} for the others (estimate 260 s; '
              'PREREGISTRATION change 11 found the first runs on the first machine about twice '
              'the estimates); CPU '
              f'seconds, recorded from PREREGISTRATION change 14 on: {shown(cpus[True])} and '
              f'{shown(cpus[False])}. ' + (
                  f'At these rates the {len(missing)} planned runs still to go need about '
                  f'{left / 3600:.1f} h' if missing else 'No planned run is still to go') + (
                  ' (' + ', '.join(
                  f'{kind} {hours / 3600:.1f} h' for kind, hours in sorted(by_kind.items())) +
              ')' if by_kind else '') + (
                  f'; the {len(cut)} cut ones would need about {cut_hours:.1f} h at these '
                  'rates' if cut else
                  '') + (
                  f' (no run of {", ".join(unmeasured)} is trained yet; products2 generates up '
                  'to twice the tokens of chain3, so this is low)' if unmeasured else '') + '.']
    if missing and (cpus[True] or cpus[False]):
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
            f'the six settings, which run first; over the budget of {BUDGET_HOURS} h the '
            'secondaries and the prior-quality axis are cut first. Whatever has not run is '
            'reported as not run.']
  attempts = list(records.values()) + list(replaced)
  spent = sum(r.get('wall_seconds') or 0 for r in attempts) / 3600
  if spent > BUDGET_HOURS:
    lines += ['', f'**The budget is spent.** The {len(attempts)} records of `runs.jsonl` '
              f'(replaced teacher records included; a run interrupted and restarted counts only '
              f'its finished attempt) took {spent:.1f} h of wall time, against the budget of '
              f'about {BUDGET_HOURS} h. As PREREGISTRATION change 23 records, the primaries run '
              'to all their seeds (never cut), then the prior-quality axis, and the '
              'secondaries, the first cut, last; ' + (
                  'PREREGISTRATION change 26 cuts the secondaries (' +
                  ', '.join(getattr(grid, 'CUT_FAMILIES', ())) + f'): none of their {len(cut)} '
                  'planned runs (the selection runs; the seeds after a selection come on top) is run, and no number here stands for them. Emptying the config\'s '
                  '`CUT_FAMILIES` resumes them.' if cut else
                  'whether to spend the machine time the last two need is not decided here.')]
  teachers = [r for n, r in sorted(records.items()) if n.startswith('teacher/')]
  if teachers:
    lines += ['', 'Teachers (the priors), greedy test accuracy: ' + ', '.join(
        f"`{r['name']}` {100 * r['accuracy']:.1f}%" for r in teachers) + '.']
  lines += code_versions(list(records.values()) + list(replaced))
  hosts = collections.Counter(r.get('machine') for r in records.values())
  if any(hosts):
    lines += ['', 'Machines (`results2/machines.jsonl`; step times are compared only between '
              'runs on the same one): ' + ', '.join(
                  f'{m or "unlisted"} ({n} runs)' for m, n in hosts.most_common()) + '.']
  return lines + ['']


# The files a run is made of: the trainer and model code, the measurement, the runner and the
# modules it imports, and the grid's definition. Any edit counts, comments included; the installed
# libraries are not in git, and the parts of qtarget/ a run never imports are listed too.
RUN_CODE = ('qtarget/', 'experiments/measure.py', 'experiments/compare.py',
            'experiments/stats.py', 'configs/compare2_smollm2.py', 'configs/smollm2_demo.py')


def code_versions(records: list[dict], root: pathlib.Path = stats.ROOT) -> list[str]:
  """Each commit the records (replaced ones included) were trained or measured at, in the order
  of their first finished record, with the files of RUN_CODE changed from the previous commit
  and the commits between that changed them: where the grid's code changed (issue 18, item 6).
  Base is measured, never trained: its ``code`` counts as measured."""
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
  if not first:
    return []
  lines = ['', "Code versions. Each commit the runs' records were trained or measured at "
           '(replaced records included; Base is measured only), in the order of its first '
           'finished record, with the files of the runs\' code changed from the previous one '
           '(`git diff --name-only` over `' + '`, `'.join(RUN_CODE) + '`: any edit counts, '
           'comments included) and the commits in between that changed them (`git show` '
           'gives each one\'s reason; PREREGISTRATION.md the plan\'s changes). These two columns '
           'come from the checkout\'s git history, not from the records.', '',
           '| commit | first record finished | records trained / measured | files changed from '
           'the previous commit | commits that changed them |', '|---|---|---|---|---|']
  previous = None
  for commit, when in first.items():
    files = between = None
    if previous is not None:
      files = stats.git(root, 'diff', '--name-only', '-z', previous, commit, '--', *RUN_CODE)
      between = stats.git(root, 'log', '--format=%h', f'{previous}..{commit}', '--', *RUN_CODE)
    if previous is None:
      change, via = 'the first version', '-'
    elif files is None or between is None:
      change, via = 'unknown: git could not compare the two here', '-'
    else:
      change = ', '.join(f'`{f}`' for f in files.split('\0') if f) or 'none'
      via = ', '.join(f'`{h}`' for h in between.split()) or '-'
    note = f' ({dirty[commit]} with uncommitted changes)' if dirty[commit] else ''
    lines.append(f'| `{commit[:10]}` | {when} | {trained[commit]} / {measured[commit]}{note} | '
                 f'{change} | {via} |')
    previous = commit
  return lines


def run_table(records, superseded=()):
  lines = ['## Runs', '', 'Greedy test accuracy with full credit only (the metric above) and as '
           '`runs.jsonl` records it (partial credit averaged in; what `compare.py rescore` '
           'checks); the machine is the CPU model of `results2/machines.jsonl`.', '',
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
