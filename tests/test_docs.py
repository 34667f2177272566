"""The examples in the docstrings and the README run and print what they say."""

import doctest
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
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


def test_readme_design_example_runs(monkeypatch):
  """The README's own design, registered in a private copy of the registry."""
  monkeypatch.setattr(targets, 'METHODS', dict(targets.METHODS))
  monkeypatch.setattr(targets, 'CONSTRUCTORS', dict(targets.CONSTRUCTORS))
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.DOTALL)
  design = [block for block in blocks if 'targets.Method(' in block]
  assert len(design) == 1, 'README shows one design of its own'
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)  # logits, labels, prior_logits  # pylint: disable=exec-used
  exec(compile(design[0], 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  target, logits, labels = namespace['target'], namespace['logits'], namespace['labels']
  p_y = jnp.take_along_axis(jax.nn.softmax(logits), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(target.trust, jnp.sqrt(p_y), rtol=1e-6)
  assert 'sqrt_trust_geometric' in targets.METHODS
