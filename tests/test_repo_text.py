"""The repository's text speaks of the library, its results and its users, not of how the
project itself was built: no file reads as a development log.

Every text file of the repository (``git ls-files``, tracked and new but not ignored; without
git, a walk of the tree) is searched, line by line, for the patterns below. A match fails the
test with its file and line. Dates say when something was measured or added ("added after
pre-registration, on 2026-12-02"); history is in git.
"""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
THIS_FILE = pathlib.Path(__file__).resolve()

# Case-insensitive, whole words only (\b): 'silently' does not contain the word 'lent', and
# identifiers joined by underscores (pytest_sessionstart, TensorBoard's session_log) do not
# contain the word 'session'.
PATTERNS = {
    # 'session 33', 'this session', 'sessions 29-31': the sittings in which the project was
    # worked on. Nothing in the library needs the word; a pytest hook takes no `session`
    # argument here, and a test run is called a test run.
    'session': r'\bsessions?\b',
    # 'a lent GPU', 'a borrowed machine': the hardware the work was done on, not a user's.
    'lent or borrowed machine': r'\b(lent|borrowed)\b',
    # 'the device tool', 'the device machine': the tool that lends such machines. (The device,
    # as in "never waiting on the device", is JAX's accelerator and stays allowed.)
    'device tool': r'\bdevice[ -](tools?|machines?)\b',
    # 'the planners', 'a reviewer', 'a review note', 'review mends': the people and roles that
    # made the project. (Reviewing as an activity, 'review the config', stays allowed.)
    'planner or reviewer': r'\b(planners?|reviewers?)\b',
    'review note': r'\breview[ -](notes?|mends?)\b',
    # 'a helper', 'review helpers': the processes that did the work. The word has no use in the
    # code either: a function is named for what it does, so 'helper' is banned outright (an
    # identifier like `_helper` or `records_helpers` is joined by underscores and would not
    # match; none exists).
    'helper': r'\bhelpers?\b',
    # 'workshop': the environment the project was built in.
    'workshop': r'\bworkshops?\b',
}
COMPILED = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in PATTERNS.items()}
ANY = re.compile('|'.join(f'(?:{pattern})' for pattern in PATTERNS.values()), re.IGNORECASE)
# Every pattern contains one of these words: a file without any of them needs no regex.
WORDS = ('session', 'lent', 'borrowed', 'device', 'planner', 'review', 'helper', 'workshop')
# Directories a tree walk skips when git is absent: version control, caches, build outputs and
# the trainer's and the grid's run directories (none of them in git).
SKIPPED_DIRECTORIES = {'.git', '__pycache__', '.pytest_cache', '.whl', 'runs', 'runs2',
                       'build', 'dist'}


def text_files() -> list[pathlib.Path]:
  """The repository's files: git's list (tracked, and new files not ignored), else a walk."""
  try:
    listed = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=ROOT,
        capture_output=True, check=True).stdout.decode().split('\0')
    paths = [ROOT / name for name in listed if name]
  except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
    paths = [path for path in ROOT.rglob('*')
             if not SKIPPED_DIRECTORIES.intersection(path.relative_to(ROOT).parts)
             and not any(part.endswith('.egg-info') for part in path.parts)]
  return sorted(path for path in paths if path.is_file() and path.resolve() != THIS_FILE)


def read_text(path: pathlib.Path) -> str | None:
  """The file's text, or None for a binary file (images, archives)."""
  data = path.read_bytes()
  if b'\0' in data:
    return None
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    return None


def findings(path: pathlib.Path, text: str) -> list[str]:
  """``file:line: [pattern] line`` for every line of ``text`` that matches a pattern."""
  found = []
  lowered = text.lower()
  if not any(word in lowered for word in WORDS) or not ANY.search(text):  # most files: quick
    return found
  for number, line in enumerate(text.splitlines(), start=1):
    for name, pattern in COMPILED.items():
      match = pattern.search(line)
      if match:
        start = max(match.start() - 60, 0)
        found.append(f'{path.relative_to(ROOT)}:{number}: [{name}] ...{line[start:start + 140]}')
  return found


def test_patterns_find_what_they_are_for():
  examples = {
      'session': 'measured in session 33', 'lent or borrowed machine': 'on a lent GPU',
      'device tool': 'the device tool runs it', 'planner or reviewer': 'left to the planners',
      'review note': 'a review note of session 32', 'helper': 'shared with a review helper',
      'workshop': 'the workshop tools'}
  for name, example in examples.items():
    assert COMPILED[name].search(example), (name, example)
  allowed = ['silently wrong', 'def pytest_sessionstart():', 'e.session_log.START',
             'never waiting on the device in between', 'review the config before a run',
             'excellent', 'a TPU device']
  for line in allowed:
    assert not any(pattern.search(line) for pattern in COMPILED.values()), line


def test_no_file_speaks_of_how_the_project_was_built():
  files = text_files()
  assert any(path.name == 'README.md' for path in files)
  found = []
  for path in files:
    text = read_text(path)
    if text is not None:
      found += findings(path, text)
  assert not found, ('these lines speak of how the project was built; say what is measured or '
                     'added, and when (a date), instead:\n' + '\n'.join(found))
