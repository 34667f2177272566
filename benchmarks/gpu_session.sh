#!/usr/bin/env bash
# The one prepared script for a session with a lent GPU (the device tool runs it in the repository
# root; $OUT comes back). Correctness first, then the loss and train-step benchmarks; each part
# logs to $OUT and a failure does not stop the next part.
#   device run: bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
pip install -q --no-deps -e . >"$OUT/install.log" 2>&1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import jax; print(jax.__version__, jax.devices())" >"$OUT/jax.txt" 2>&1
# The Pallas kernels compiled for real at small shapes, against the dense loss (the interpret-mode
# tests run the same checks on CPU).
JAX_PLATFORMS=cuda QTARGET_PALLAS_IMPLEMENTATION=pallas timeout 240 python -m pytest -q -x tests/test_fused_pallas.py \
  >"$OUT/test_fused_pallas.log" 2>&1
timeout 240 python benchmarks/loss.py --gpu >"$OUT/loss.log" 2>&1
cp benchmarks/results/loss_gpu.json "$OUT/" 2>/dev/null
timeout 240 python benchmarks/train_step.py --gpu >"$OUT/train_step.log" 2>&1
cp benchmarks/results/train_step_gpu.json "$OUT/" 2>/dev/null
timeout 180 python benchmarks/train_step.py --gpu --loss fused >"$OUT/train_step_fused.log" 2>&1
tail -n 30 "$OUT"/*.log
