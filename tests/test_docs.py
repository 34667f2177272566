"""The examples in the docstrings and the README run and print what they say."""

import doctest
import pathlib
import re

import jax.numpy as jnp
import pytest

from qtarget import losses
from qtarget import native
from qtarget import targets

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


@pytest.mark.parametrize('module', [targets, losses], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  globs = {'jnp': jnp, 'targets': targets, 'losses': losses, 'native': native}
  result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_readme_example_runs():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.DOTALL)
  assert blocks, 'README has no python example'
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert 'grads' in namespace and jnp.all(jnp.isfinite(namespace['grads']))
