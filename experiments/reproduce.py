"""Recorded grid runs trained again elsewhere (another machine, teacher or commit), against the
grid's own record of the same run: does a run's outcome depend on where it ran?

A reproduction is run like any grid run, from a clean worktree at the grid's commit, into its own
folder holding the grid's teacher records (and their exports, linked), e.g.

    python -m experiments.compare run --config configs/compare2_smollm2.py \\
        --results_dir experiments/machine_check --only 'chain3_clean/sft/0'

and kept, on the machine that ran it, with

    python -m experiments.reproduce --config configs/compare2_smollm2.py \\
        --keep WORKTREE/experiments/machine_check

which copies its records (teachers left out) and prediction files into the grid's
``reproduced/`` folder, pointing the records' ``predictions`` there and naming this machine in
``machine``. The report compares each split by split: full-credit accuracy, the answers that are
the same text and those whose credit changed, and the final training loss.
"""

import argparse
import pathlib
import shutil

from qtarget import evaluate

from experiments import ROOT
from experiments import grids
from experiments import machines
from experiments import records as records_lib

# A reproduction, the grid's record of the same run (None if none) and their split-by-split
# comparison (None without a record).
Comparison = tuple[dict, dict | None, list[dict] | None]


def directory(grid) -> pathlib.Path:
  """Where a grid keeps its reproductions."""
  return grid.directory / 'reproduced'


def _rows(entry) -> list[dict]:
  return evaluate.read_predictions(ROOT / entry['predictions'],
                                   fields=('question', 'output', 'score'))


def _predicted(record) -> dict:
  return {label: entry for label, entry in (record.get('scored') or {}).items()
          if 'predictions' in entry}


def compare(original: dict, again: dict) -> list[dict]:
  """Per split either side scored: full-credit accuracy of each, the answers that are the same
  text, and the answers whose full credit changed each way; a split only one side has, or
  scored on other problems, is listed with the reason (``problem``)."""
  ours_by, theirs_by = _predicted(original), _predicted(again)
  splits = []
  for label in list(ours_by) + [l for l in theirs_by if l not in ours_by]:
    if label not in ours_by or label not in theirs_by:
      side = 'the original' if label in ours_by else 'the reproduction'
      splits.append({'label': label, 'problem': f'only {side} has it'})
      continue
    ours, theirs = _rows(ours_by[label]), _rows(theirs_by[label])
    if [r['question'] for r in ours] != [r['question'] for r in theirs]:
      splits.append({'label': label, 'problem': 'not scored on the same problems in the same '
                                                'order'})
      continue
    right = lambda rows: [evaluate.full_credit(r['score']) for r in rows]
    before, after = right(ours), right(theirs)
    splits.append({'label': label, 'answers': len(ours), 'original': sum(before) / len(ours),
                   'again': sum(after) / len(theirs),
                   'same_text': sum(a['output'] == b['output'] for a, b in zip(ours, theirs)),
                   'now_right': sum(a < b for a, b in zip(before, after)),
                   'now_wrong': sum(a > b for a, b in zip(before, after))})
  return splits


def comparisons(records: dict, kept: pathlib.Path) -> list[Comparison]:
  """Each reproduction kept in ``kept`` (the last of each name) with the grid's record of the
  same run and their split-by-split comparison (None and None when the grid has no such
  record): what the summary line and the section both print, compared once."""
  matched = []
  lines = records_lib.read_json_lines(pathlib.Path(kept) / 'runs.jsonl', required=('name',))
  for again in records_lib.last_of_each_name(lines).values():
    original = records.get(again['name'])
    matched.append((again, original, None if original is None else compare(original, again)))
  return matched


def _prior(record) -> str:
  prior = (record.get('config') or {}).get('prior') or {}
  if prior.get('source') == 'hf' and '/teacher/' in prior.get('path', ''):
    return 'teacher/' + prior['path'].split('/teacher/')[1].split('/')[0]
  return 'none'


def summary_line(matched: list[Comparison]) -> list[str]:
  """One bullet for the report's summary, a clause per reproduced run in ``comparisons()``;
  nothing without any."""
  clauses = []
  for again, original, splits in matched:
    if original is None:
      continue
    splits = [s for s in splits if 'problem' not in s]
    answers = sum(s['answers'] for s in splits)
    clauses.append(
        f"{again['name']} (prior: {_prior(again)}): {sum(s['same_text'] for s in splits)} of "
        f"{answers} answers the same text over {len(splits)} splits, full credit changed on "
        f"{sum(s['now_right'] + s['now_wrong'] for s in splits)}")
  if not clauses:
    return []
  return ['- Runs trained again elsewhere (another machine, its retrained teacher and a later '
          'commit together; the section near the end): ' + '; '.join(clauses) + '.']


def _rows_of(again, original, splits) -> list[str]:
  where = lambda r: (f"`{((r.get('code') or {}).get('commit') or 'unknown')[:7]}`, "
                     f"{r.get('machine') or 'unknown'}")
  loss = lambda r: (r.get('final_metrics') or {}).get('loss', float('nan'))
  lines = []
  for index, split in enumerate(splits):
    losses = f'{loss(original):.6f} / {loss(again):.6f}' if index == 0 else 'as above'
    head = f"| {again['name']} | {_prior(again)} | {split['label']} "
    if 'problem' in split:
      lines.append(head + f"| {where(original)} | {where(again)} | not comparable: "
                   f"{split['problem']} | - | - | {losses} |")
      continue
    lines.append(head + f"| {where(original)} | {where(again)} "
                 f"| {100 * split['original']:.1f} / {100 * split['again']:.1f} "
                 f"| {split['same_text']} of {split['answers']} "
                 f"| {split['now_right']} / {split['now_wrong']} | {losses} |")
  return lines


def section(matched: list[Comparison], kept: str) -> list[str]:
  """The report's section on the reproductions in ``comparisons()`` (kept in ``kept``, as the
  report names it); nothing when none is kept."""
  if not matched:
    return []
  rows = [row for again, original, splits in matched if original is not None
          for row in _rows_of(again, original, splits)]
  lines = ['## Runs trained again on another machine (a check, not grid runs)', '',
           f'Recorded runs trained again from a clean worktree (`{kept}/`), each beside the '
           "grid's record of the same run, split by split: greedy accuracy with full credit, "
           'the answers that are the same text and those whose full credit changed (now right '
           '/ now wrong), and the final training loss. Each pair differs in the machine, in the '
           'commit (the code between them changed, generation included), and for a run with '
           'a teacher prior in the teacher, trained again on each '
           'machine (PREREGISTRATION changes 21 and 23): the check cannot tell these apart. '
           'The machine is the one each record names, else unknown.', '']
  if rows:
    lines += ['| run | prior | split | original: commit, machine | again: commit, machine '
              '| accuracy (original / again) | same answer text | credit changed (now right / '
              'now wrong) | final loss (original / again) |',
              '|---|---|---|---|---|---|---|---|---|', *rows]
  missing = [again['name'] for again, original, _ in matched if original is None]
  if missing:
    lines += ['', 'Kept but not in the grid\'s records, so not compared: ' + ', '.join(missing)
              + '.']
  return lines + ['']


def keep(source: pathlib.Path, target: pathlib.Path) -> list[str]:
  """Copies ``source``'s non-teacher records and their prediction files into ``target`` (a
  record of the same name there is replaced), naming this machine; returns the names."""
  target = pathlib.Path(target)
  (target / 'predictions').mkdir(parents=True, exist_ok=True)
  relative = source.relative_to(source.parents[1])  # experiments/<folder>
  kept = str(target.resolve().relative_to(ROOT)) if target.resolve().is_relative_to(ROOT) else (
      str(target.resolve()))
  added = {}
  for record in records_lib.read_json_lines(source / 'runs.jsonl', required=('name',)):
    if record['name'].startswith('teacher/'):
      continue
    for entry in (record.get('scored') or {}).values():
      if 'predictions' in entry:
        name = pathlib.Path(entry['predictions']).name
        shutil.copy(source / 'predictions' / name, target / 'predictions' / name)
        entry['predictions'] = f'{kept}/predictions/{name}'
    record['predictions'] = str(record.get('predictions', '')).replace(str(relative), kept)
    record['machine'] = machines.describe()
    added[record['name']] = record
  # The kept records are read again under the write's lock, so a concurrent keep is not lost.
  records_lib.update_json_lines(
      target / 'runs.jsonl',
      lambda kept_lines: list({**records_lib.last_of_each_name(kept_lines), **added}.values()),
      required=('name',))
  return list(added)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/compare2_smollm2.py',
                      help='the grid whose reproduced/ folder keeps them')
  parser.add_argument('--keep', type=pathlib.Path, required=True,
                      help="a reproduction's folder (with runs.jsonl and predictions/)")
  args = parser.parse_args()
  if not (args.keep / 'runs.jsonl').exists():
    raise SystemExit(f'{args.keep}: no runs.jsonl here, not a grid folder.')
  target = directory(grids.load(args.config))
  print(f"kept in {target}: {', '.join(keep(args.keep.resolve(), target)) or 'nothing'}")


if __name__ == '__main__':
  main()
