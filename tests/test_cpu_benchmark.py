"""benchmarks/cpu.py in its smallest mode: every worker runs and both sides see the same model."""

import pathlib
import re
import subprocess
import sys

import pytest

import availability

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about 2 minutes on 2 cores: six processes, three compiles
@pytest.mark.torch
@availability.needs_smollm2('the tiny config uses SmolLM2\'s tokenizer')
def test_quick_mode_prints_a_ratio_for_every_comparison():
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  done = subprocess.run([sys.executable, str(ROOT / 'benchmarks/cpu.py'), '--quick'],
                        capture_output=True, text=True, check=False, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  for name in ('sft32', 'target32', 'generate'):
    assert re.search(rf'^\s*{name}: ours .* ours / theirs \d+\.\d+', out, re.M), out
  # The same weights and batch on both sides: the first SFT losses agree.
  losses = re.findall(r'sft32\s+(?:ours|theirs): .*first loss (\d+\.\d+)', out)
  assert len(losses) == 2 and abs(float(losses[0]) - float(losses[1])) < 1e-3, out
  assert re.search(r'(\d+) of \1 answers identical', out), out
