"""The tests compile at LLVM -O0 (tests/xla_flags.py): what they read from a compiled program
must be what a default build compiles."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

_COMPILED = '''
import hashlib, json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, {tests!r})
import test_train_step
from qtarget import train
config = test_train_step.tiny_config()
state = train.create_state(config, *test_train_step._models(config))
batch = jax.tree.map(jnp.asarray, test_train_step.make_batch(rows=config.batch_size))
compiled = jax.jit(train.train_step).trace(state, batch).lower().compile()
memory = compiled.memory_analysis()
print(json.dumps({{
    'hlo': hashlib.sha256(compiled.as_text().encode()).hexdigest(),
    'temporaries': memory.temp_size_in_bytes, 'arguments': memory.argument_size_in_bytes,
    'outputs': memory.output_size_in_bytes, 'flops': compiled.cost_analysis()['flops']}}))
'''


def _compiled_program(xla_flags):
  env = {**os.environ, 'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # compiled here, not loaded
  result = subprocess.run([sys.executable, '-c', _COMPILED.format(tests=str(ROOT / 'tests'))],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two processes compile the tiny train step (about 25 s)
def test_the_quick_compile_leaves_the_optimized_program_and_its_memory_unchanged():
  quick = _compiled_program('--xla_backend_optimization_level=0')
  default = _compiled_program('')
  assert quick['flops'] > 0 and quick['temporaries'] > 0
  assert quick == default
