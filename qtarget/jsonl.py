"""Reading JSON-lines files (predictions, run records) with errors that name the file and line.

Plain Python: no jax or flax beyond what ``import qtarget`` brings.
"""

import json
import pathlib


def read_objects(path, required=(), what: str = 'line') -> list[dict]:
  """The JSON objects of the file at ``path``, one per line, in order; blank lines skipped.

  A line that is not JSON, not an object, or lacks a ``required`` field is a ValueError naming
  the file and the line (``what`` names a line's content in that message: 'the prediction has
  no score'). The file must exist.
  """
  path = pathlib.Path(path)
  objects = []
  # split('\n'), not splitlines(): a JSON string may hold U+2028 and other line breaks.
  for number, line in enumerate(path.read_text(encoding='utf-8').split('\n'), 1):
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f'{path}, line {number}, column {error.colno}: not JSON '
                       f'({error.msg}).') from None
    if not isinstance(value, dict):
      raise ValueError(f'{path}, line {number}: expected a JSON object, got '
                       f'{type(value).__name__}.')
    missing = [field for field in required if field not in value]
    if missing:
      raise ValueError(f'{path}, line {number}: the {what} has no {", ".join(missing)} '
                       f'(it has {", ".join(sorted(value)) or "nothing"}).')
    objects.append(value)
  return objects
