"""What both compare.py and report.py need: the repository root, git, the reader and writer of
the grids' JSON-lines files and seed-level intervals."""

import contextlib
import fcntl
import json
import math
import os
import pathlib
import stat
import subprocess
import tempfile

from qtarget import jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_json_lines(path: pathlib.Path, required: tuple[str, ...] = ()) -> list[dict]:
  """The records of a JSON-lines file (runs.jsonl, machines.jsonl) in file order, [] when the
  file does not exist; a bad line or one without a ``required`` field is the ValueError of
  ``qtarget.jsonl.read_objects``, naming the file and the line."""
  path = pathlib.Path(path)
  return jsonl.read_objects(path, required, what='record') if path.exists() else []


def git(root: pathlib.Path, *args) -> str | None:
  """git's output in ``root``, or None where git cannot answer (no git, not a repository, a
  commit this checkout lacks: a shallow clone or an archive)."""
  try:
    result = subprocess.run(['git', *args], cwd=root, capture_output=True, text=True,
                            timeout=60, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return result.stdout if result.returncode == 0 else None


def last_of_each_name(lines: list[dict]) -> dict[str, dict]:
  """Records by run name, a later line replacing an earlier one of the same name."""
  return {r['name']: r for r in lines}


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


# Student-t 97.5% quantiles by degrees of freedom, to three decimals.
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
          9: 2.262, 10: 2.228}


def t_quantile(probability: float, df: int) -> float:
  """The Student-t quantile at ``df`` (at least 1) degrees of freedom."""
  if df < 1:
    raise ValueError(f'a Student-t quantile needs at least 1 degree of freedom, got {df}.')
  import scipy.stats  # pylint: disable=g-import-not-at-top  (a JAX dependency)
  return float(scipy.stats.t.ppf(probability, df))


def t_975(df: int) -> float:
  """The Student-t 97.5% quantile at ``df`` degrees of freedom (the table's rounding up to 10,
  as both grids' reports have always printed)."""
  return _T_975[df] if df in _T_975 else t_quantile(0.975, df)


def measured_on_validation(grid, name: str) -> bool:
  """Whether the grid measures a run on validation too (a selection run: about 1.3x as long);
  a grid without ``measurements`` (the first one) measures none."""
  measurements = getattr(grid, 'measurements', None)
  return bool(measurements and measurements(name).get('validation'))


def signed_points(mean: float, half: float) -> str:
  """A fraction's mean in signed points, ± its half-width unless undefined (NaN); a mean that
  rounds to zero prints +0.0, never -0.0."""
  shown = f'{round(100 * mean, 1) + 0.0:+.1f}'  # adding 0.0 turns a rounded -0.0 into 0.0
  return shown + ('' if math.isnan(half) else f' ± {100 * half:.1f}')


def mean_and_interval(values: list[float]) -> tuple[float, float]:
  """Mean and half-width of the 95% Student-t interval over seeds (nan with one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, t_975(n - 1) * sd / math.sqrt(n)
