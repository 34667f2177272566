"""Raw text records: reasoning-gym problems and local jsonl/parquet files.

A record is a dict of strings: ``prompt``, ``response`` (the demonstration, a step-by-step
rationale where the source has one), ``answer`` (the gold final answer, for scoring), ``task``
and ``metadata`` (JSON, what the task's scorer needs). Bad records raise :class:`RecordError`
naming the file and line or the task and index.
"""

import json
import pathlib
import re
from typing import Iterator

RECORD_FIELDS = ('prompt', 'response', 'answer', 'task', 'metadata')


class RecordError(ValueError):
  """A record that cannot be used; the message names it."""


# reasoning-gym.

def reasoning_gym_records(task: str, size: int, seed: int,
                          difficulty: dict | None = None) -> Iterator[dict]:
  """``size`` problems of a reasoning-gym task drawn with ``seed``."""
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  try:
    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **(difficulty or {}))
  except (KeyError, ValueError, TypeError) as error:
    raise RecordError(f'cannot create reasoning-gym task {task!r} with {difficulty}: '
                      f'{error}') from error
  for index in range(size):
    entry = dataset[index]
    answer = str(entry['answer'])
    rationale = entry['metadata'].get('answer_cot')
    yield {
        'prompt': entry['question'],
        'response': rationale if rationale else answer,
        'answer': answer,
        'task': task,
        'metadata': json.dumps({'question': entry['question'], 'answer': entry['answer'],
                                'metadata': entry['metadata']}, default=str),
    }


# Local files.

_PROMPT_FIELDS = ('prompt', 'problem', 'question', 'instruction')
_RESPONSE_FIELDS = ('response', 'solution', 'completion', 'output')


def final_answer(text: str) -> str | None:
  """The final answer of a solution: after the last ``####``, or the last ``\\boxed{...}``."""
  if '####' in text:
    return text.rsplit('####', 1)[1].strip()
  boxed = last_boxed(text)
  return boxed


def last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{...}``, with nested braces."""
  start = text.rfind('\\boxed{')
  if start < 0:
    return None
  depth, begin = 0, start + len('\\boxed{')
  for position in range(begin, len(text)):
    if text[position] == '{':
      depth += 1
    elif text[position] == '}':
      if depth == 0:
        return text[begin:position].strip()
      depth -= 1
  return None


def system_prompt(record: dict) -> str | None:
  """The system prompt a record carries (in its metadata), or None: the one rendering of a
  record's prompt for training and for evaluation alike."""
  metadata = record.get('metadata') or ''
  if '"system"' not in metadata:
    return None
  return json.loads(metadata).get('system') or None


def _from_messages(messages, where: str) -> tuple[str, str, str | None]:
  if not isinstance(messages, list) or not messages:
    raise RecordError(f'{where}: "messages" must be a non-empty list of role/content dicts.')
  system = next((m.get('content') for m in messages if m.get('role') == 'system'), None)
  users = [m.get('content') for m in messages if m.get('role') == 'user']
  assistants = [m.get('content') for m in messages if m.get('role') == 'assistant']
  if not users:
    raise RecordError(f'{where}: "messages" has no user turn.')
  if not assistants or not assistants[-1]:
    raise RecordError(f'{where}: "messages" has no assistant turn (no response to learn).')
  turns = [m.get('role') for m in messages if m.get('role') != 'system']
  if turns != ['user', 'assistant']:
    raise RecordError(
        f'{where}: "messages" holds the turns {turns}; only one user turn followed by one '
        'assistant turn (after an optional system message) is supported. Split a multi-turn '
        'conversation into one row per assistant turn, with the conversation before it as the '
        'prompt.')
  return users[0], assistants[-1], system


def record_from_row(row: dict, where: str, task: str = 'file',
                    prompt_field: str | None = None,
                    response_field: str | None = None) -> dict:
  """A record from one row of a file: prompt/response fields or a chat ``messages`` list."""
  system = None
  if prompt_field is None and 'messages' in row:
    prompt, response, system = _from_messages(row['messages'], where)
  else:
    pick = lambda given, names: given if given is not None else next(
        (n for n in names if n in row), None)
    p_field, r_field = pick(prompt_field, _PROMPT_FIELDS), pick(response_field, _RESPONSE_FIELDS)
    if p_field is None or row.get(p_field) in (None, ''):
      raise RecordError(f'{where}: no prompt (looked for {prompt_field or _PROMPT_FIELDS} or '
                        '"messages").')
    if r_field is None or row.get(r_field) in (None, ''):
      raise RecordError(f'{where}: record without a response (looked for '
                        f'{response_field or _RESPONSE_FIELDS} or "messages").')
    prompt, response = str(row[p_field]), str(row[r_field])
  answer = row.get('answer')
  answer = str(answer) if answer not in (None, '') else (final_answer(response) or '')
  metadata = {'answer': answer, 'source': where}
  if system:
    metadata['system'] = system
  return {'prompt': prompt, 'response': response, 'answer': answer, 'task': task,
          'metadata': json.dumps(metadata)}


def _rows(path: pathlib.Path) -> Iterator[tuple[dict, str]]:
  if path.suffix == '.jsonl':
    with path.open() as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          yield json.loads(line), f'{path}:{number}'
        except json.JSONDecodeError as error:
          raise RecordError(f'{path}:{number}: not valid JSON ({error}).') from error
  elif path.suffix == '.parquet':
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
      yield row, f'{path}:row {number}'
  else:
    raise RecordError(f'{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet).')


def file_records(path, task: str = 'file', prompt_field: str | None = None,
                 response_field: str | None = None) -> Iterator[dict]:
  """Records of a jsonl or parquet file; raises on a missing or empty file."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'data file {path} does not exist.')
  count = 0
  for row, where in _rows(path):
    count += 1
    yield record_from_row(row, where, task, prompt_field, response_field)
  if count == 0:
    raise RecordError(f'data file {path} is empty.')


_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def extract_answer(output: str, gold: str) -> str:
  """The model's final answer: after ``####``, else the last ``\\boxed{}``, else (for numeric
  gold answers) the last number in the output, else the whole stripped output."""
  answer = final_answer(output)
  if answer is not None:
    return answer
  if _NUMBER.fullmatch(gold.strip()):
    numbers = _NUMBER.findall(output)
    if numbers:
      return numbers[-1].replace(',', '')
  return output.strip()
