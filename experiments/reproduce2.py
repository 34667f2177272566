"""Recorded grid runs trained again elsewhere (another machine, teacher or commit), against the
grid's own record of the same run: does a run's outcome depend on where it ran?

A reproduction is run like any grid run, from a clean worktree at the grid's commit, into its own
results directory holding the grid's teacher records (and their exports, linked), e.g.

    python experiments/compare.py run --config configs/compare2_smollm2.py \\
        --results_dir experiments/results_machine_check --only 'chain3_clean/sft/0'

Its records and prediction files are then kept in ``results2_reproduced/`` (the records'
``predictions`` paths pointing there), which the report compares split by split: full-credit
accuracy, how many answers are the same text, and the final training loss.
"""

import json

from qtarget import evaluate

import machines  # pylint: disable=import-error  (experiments/machines.py)
import stats  # pylint: disable=import-error  (experiments/stats.py)

DIRECTORY = 'experiments/results2_reproduced'


def _rows(entry) -> list[dict]:
  return evaluate.read_predictions(stats.ROOT / entry['predictions'],
                                   fields=('question', 'output', 'score'))


def compare(original: dict, again: dict) -> list[dict]:
  """Per split both scored: full-credit accuracy of each, and the answers that are the same
  text (the same problems in the same order, or an error)."""
  splits = []
  for label, entry in (original.get('scored') or {}).items():
    other = (again.get('scored') or {}).get(label)
    if 'predictions' not in entry or not other or 'predictions' not in other:
      continue
    ours, theirs = _rows(entry), _rows(other)
    if [r['question'] for r in ours] != [r['question'] for r in theirs]:
      raise ValueError(f'{original["name"]} {label}: the reproduction was not scored on the '
                       'same problems in the same order.')
    share = lambda rows: sum(evaluate.full_credit(r['score']) for r in rows) / len(rows)
    splits.append({'label': label, 'answers': len(ours), 'original': share(ours),
                   'again': share(theirs),
                   'same_text': sum(a['output'] == b['output'] for a, b in zip(ours, theirs))})
  return splits


def _kept() -> list[dict]:
  path = stats.ROOT / DIRECTORY / 'runs.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_line(records: dict) -> list[str]:
  """One bullet for the report's summary: how much the reproductions agree; nothing without
  any."""
  pairs = [(records[r['name']], r) for r in _kept() if r['name'] in records]
  splits = [s for original, again in pairs for s in compare(original, again)]
  if not splits:
    return []
  same = sum(s['original'] == s['again'] for s in splits)
  texts = sum(s['same_text'] for s in splits)
  answers = sum(s['answers'] for s in splits)
  return [f'- Machines: {len(pairs)} recorded run(s) ({", ".join(o["name"] for o, _ in pairs)}) '
          'trained again elsewhere (another machine, teacher or commit: the section on runs '
          f'trained again says which): the same accuracy on {same} of {len(splits)} splits, '
          f'{texts} of {answers} answers the same text.']


def section(records: dict, listed_machines: list[dict]) -> list[str]:
  """The report's section on reproductions; nothing when none is kept."""
  kept = _kept()
  if not kept:
    return []
  lines = ['## Runs trained again on another machine (a check, not grid runs)', '',
           f'Recorded runs trained again from a clean worktree (`{DIRECTORY}/`), each beside the '
           "grid's record of the same run, split by split: greedy accuracy with full credit, "
           'the answers that are the same text, and the final training loss. Where they agree, '
           'the machine, the retrained teacher and the code between the two commits did not '
           'change what the run answers.', '',
           '| run | split | original: commit, machine | again: commit, machine | accuracy '
           '(original / again) | same answer text | final loss (original / again) |',
           '|---|---|---|---|---|---|---|']
  for again in kept:
    original = records.get(again['name'])
    if original is None:
      continue
    where = lambda r: (f"`{(r.get('code') or {}).get('commit', 'unknown')[:7]}`, "
                       f"{machines.machine_of(r, listed_machines) or 'unlisted'}")
    loss = lambda r: (r.get('final_metrics') or {}).get('loss', float('nan'))
    for index, split in enumerate(compare(original, again)):
      losses = f'{loss(original):.6f} / {loss(again):.6f}' if index == 0 else 'as above'
      lines.append(f"| {again['name']} | {split['label']} | {where(original)} | {where(again)} "
                   f"| {100 * split['original']:.1f} / {100 * split['again']:.1f} "
                   f"| {split['same_text']} of {split['answers']} "
                   f'| {losses} |')
  return lines + ['']
