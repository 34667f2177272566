"""A grid's records: ``runs.jsonl`` (one line per finished run) and the prediction files its
lines name, read and written whole under a lock; the full-credit scores of a run, the runs of a
method, and the lines a later one replaced."""

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import stat
import tempfile

import numpy as np
from qtarget import evaluate
from qtarget import jsonl

from experiments import ROOT


def read_json_lines(path: pathlib.Path, required: tuple[str, ...] = ()) -> list[dict]:
  """The records of a JSON-lines file (runs.jsonl, machines.jsonl) in file order, [] when the
  file does not exist; a bad line or one without a ``required`` field is the ValueError of
  ``qtarget.jsonl.read_objects``, naming the file and the line."""
  path = pathlib.Path(path)
  return jsonl.read_objects(path, required, what='record') if path.exists() else []


_LOCKED = set()  # the directories this process holds the lock of


@contextlib.contextmanager
def _directory_locked(path: pathlib.Path):
  """An exclusive lock on ``path``'s directory (held until the block ends), yielding the
  directory's descriptor: every writer of the grids' files in that directory takes it. A write
  inside another's block (an ``update_json_lines`` change that writes) would wait on its own
  lock forever, so it raises instead."""
  key = os.path.realpath(path.parent)
  if key in _LOCKED:
    raise RuntimeError(f'{path.parent} is already locked by this process: a JSON-lines write '
                       'inside an update_json_lines change would wait on itself.')
  directory = os.open(path.parent, os.O_RDONLY)
  try:
    fcntl.flock(directory, fcntl.LOCK_EX)
    _LOCKED.add(key)
    yield directory
  finally:
    _LOCKED.discard(key)
    os.close(directory)  # releases the lock


def _replace(path: pathlib.Path, objects: list[dict], directory: int, prefix: str = '') -> None:
  """``prefix`` and then ``objects`` one per line, written to a temporary file beside ``path``,
  synced and renamed into place: a process killed meanwhile leaves the previous file."""
  handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.partial')
  try:
    with os.fdopen(handle, 'w', encoding='utf-8') as f:
      f.write(prefix + ''.join(json.dumps(o) + '\n' for o in objects))
      f.flush()
      os.fsync(f.fileno())
    os.chmod(partial, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
    os.replace(partial, path)
    os.fsync(directory)  # the rename itself, on disk
  except BaseException:
    pathlib.Path(partial).unlink(missing_ok=True)
    raise


def write_json_lines(path: pathlib.Path, objects: list[dict], append: bool = False) -> None:
  """Writes ``objects`` one per line to ``path`` (after its lines with ``append``), whole and
  renamed into place under the directory's lock: a process killed while writing leaves the
  previous file, never a torn line, and two processes appending to one file both keep their
  lines. A caller that reads, changes and writes back uses ``update_json_lines``."""
  path = pathlib.Path(path)
  with _directory_locked(path) as directory:
    text = path.read_text(encoding='utf-8') if append and path.exists() else ''
    if text and not text.endswith('\n'):  # a last line written by hand
      text += '\n'
    _replace(path, objects, directory, prefix=text)


def update_json_lines(path: pathlib.Path, change, required: tuple[str, ...] = ()):
  """Reads ``path``'s records (as ``read_json_lines``), passes them to ``change`` and writes
  back the list it returns (nothing when it returns None), all under one lock: another
  writer's lines cannot land between the read and the write and be lost. Returns what
  ``change`` returned."""
  path = pathlib.Path(path)
  with _directory_locked(path) as directory:
    changed = change(read_json_lines(path, required))
    if changed is not None:
      _replace(path, changed, directory)
    return changed


def last_of_each_name(lines: list[dict]) -> dict[str, dict]:
  """Records by run name, a later line replacing an earlier one of the same name."""
  return {r['name']: r for r in lines}


def superseded(lines: list[dict]) -> list[dict]:
  """The records of runs.jsonl (``lines``, in file order) that a later one of the same name
  replaced."""
  last = {r['name']: i for i, r in enumerate(lines)}
  return [r for i, r in enumerate(lines) if last[r['name']] != i]


class Registry:
  """A grid's folder: runs.jsonl, one line per finished run, and predictions/."""

  def __init__(self, directory: pathlib.Path):
    self.dir = pathlib.Path(directory)
    self.path = self.dir / 'runs.jsonl'
    self.dir.mkdir(parents=True, exist_ok=True)

  def lines(self) -> list[dict]:
    """Every record in file order, replaced ones included (a run measured again, a teacher
    trained again, appends a line of the same name)."""
    return read_json_lines(self.path, required=('name',))

  def records(self) -> dict[str, dict]:
    """The last record of each run name."""
    return last_of_each_name(self.lines())

  def add(self, record: dict) -> None:
    write_json_lines(self.path, [record], append=True)

  def predictions_path(self, name: str, label: str = '') -> pathlib.Path:
    stem = name.replace('/', '__') + (f'__{label}' if label else '')
    return self.dir / 'predictions' / (stem + '.jsonl')


def scores(record, label='test_greedy') -> tuple[list[str], np.ndarray]:
  """The questions of a run's predictions and whether each got full credit (1.0 or 0.0), row
  by row (the split's order; a question that occurs twice counts twice, as in the accuracy)."""
  rows = evaluate.read_predictions(ROOT / record['scored'][label]['predictions'])
  return ([r['question'] for r in rows],
          np.array([evaluate.full_credit(r['score']) for r in rows], np.float64))


@functools.lru_cache(maxsize=None)
def _confidences(path, modified_ns, size) -> tuple[np.ndarray, np.ndarray]:
  del modified_ns, size  # in the cache key only: a rewritten file is read again
  rows = [r for r in evaluate.read_predictions(path, fields=('score',))
          if r.get('confidence') is not None]
  arrays = (np.array([r['confidence'] for r in rows], np.float64),
            np.array([evaluate.full_credit(r['score']) for r in rows], np.float64))
  for array in arrays:  # shared by every caller
    array.flags.writeable = False
  return arrays


def answer_confidences(record) -> tuple[np.ndarray, np.ndarray] | None:
  """A run's greedy test answers that have a confidence (the mean probability of the answer's
  own tokens): the confidences and whether each got full credit (1.0 or 0.0), read-only; None
  for a run without greedy test predictions."""
  scored = (record.get('scored') or {}).get('test_greedy') or {}
  if 'predictions' not in scored:
    return None
  path = ROOT / scored['predictions']
  status = path.stat() if path.exists() else None  # a missing file: read_predictions says so
  return _confidences(path, status and status.st_mtime_ns, status and status.st_size)


def with_full_credit(records: dict) -> dict:
  """The records with every scored accuracy recomputed from its prediction file as full credit
  only (score 1), the pre-registered primary metric. reasoning-gym's scorer also gives partial
  credit (0.5 for a sign error, for instance), which the recorded ``accuracy`` (what
  ``rescore`` checks) averages in; it is kept as ``recorded_accuracy``. An entry without a
  prediction file keeps its accuracy."""
  for record in records.values():
    for label, entry in (record.get('scored') or {}).items():
      if 'predictions' in entry and 'recorded_accuracy' not in entry:
        entry['recorded_accuracy'] = entry['accuracy']
        entry['accuracy'] = float(np.mean(scores(record, label)[1]))
    if 'test_greedy' in (record.get('scored') or {}):
      record['accuracy'] = record['scored']['test_greedy']['accuracy']
  return records


def runs(records, setting, method) -> list[dict]:
  """The runs of ``method`` in ``setting``, by name (so seed by seed)."""
  return [r for n, r in sorted(records.items())
          if n.startswith(f'{setting}/{method}/') and n.count('/') == 2]


def value(record, label, field='accuracy'):
  """A scored split's ``field`` (None where the run has no such split)."""
  entry = (record.get('scored') or {}).get(label)
  return None if entry is None else entry.get(field)


def present(runs_, label) -> list[float]:
  """The runs' accuracies on ``label`` where they have one."""
  return [v for v in (value(r, label) for r in runs_) if v is not None]


def seed_accuracies(records, setting, method) -> dict[int, float]:
  return {int(r['name'].split('/')[2]): r['accuracy'] for r in runs(records, setting, method)}
