"""XLA_FLAGS for the tests and the processes they start."""

import os

# The tests' programs are small, so compiling them, not running them, is most of the suite's
# time. LLVM at -O0 compiles the tiny train step about 2.7x faster on this project's CPU
# machine (11.4 s -> 4.3 s) and runs it about 2x slower. XLA's HLO passes are untouched: the
# optimized HLO text, memory_analysis() and the FLOP count of that step are the same with and
# without it, so what the sharding and memory tests read from a compiled program is what a
# default build compiles. A compile_check report for a v5e 2x2 slice (HLO, temporaries,
# arguments, FLOPs, collectives) is also the same with and without it
# (tests/test_quick_compile.py checks the CPU case).
#
# A level already in XLA_FLAGS wins: XLA_FLAGS=--xla_backend_optimization_level=2 (XLA's
# default) runs the suite with the default build's codegen. On a GPU the flag lowers the GPU's
# LLVM optimization too.
QUICK_COMPILE = '--xla_backend_optimization_level=0'


def optimization_flag() -> str:
  """The LLVM level of this test run: the one in XLA_FLAGS, else QUICK_COMPILE."""
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith('--xla_backend_optimization_level='):
      return flag
  return QUICK_COMPILE


def with_devices(count: int | None = None) -> str:
  """The flags for a process with ``count`` fake CPU devices (None: JAX's default, one), at the
  test run's LLVM level."""
  devices = [] if count is None else [f'--xla_force_host_platform_device_count={count}']
  return ' '.join(devices + [optimization_flag()])
