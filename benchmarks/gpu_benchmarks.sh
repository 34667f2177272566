#!/usr/bin/env bash
# The GPU benchmarks and the GPU kernel tests in one script. Run it from the repository root on a
# GPU machine; it writes its logs and JSON to $OUT (default /tmp/gpu_benchmarks). Correctness
# first, then the loss-head and train-step benchmarks; each part has its own time limit, logs to
# $OUT and writes its JSON as it goes, so a part that fails or runs out of time does not cost the
# others.
#
#   bash benchmarks/gpu_benchmarks.sh [PART ...]
#
# .whl (ignored by git) may hold pure-Python wheels that the GPU machine's image lacks or has at
# another version than the one tested: ml_collections 1.1.0 and flax 0.12.12 (fetched with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl NAME==VERSION`), for
# a machine that reaches no package registry; qtarget runs from the working tree through
# PYTHONPATH.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_benchmarks}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    >"$OUT/env.txt" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PYTHON -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} >>"$OUT/env.txt" 2>&1
part() {  # part NAME SECONDS COMMAND...: one timed part, its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "[$name] exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/env.txt"
}
# Parts: attention and train_step by default (about 7 minutes); name others as arguments (e.g.
# `bash benchmarks/gpu_benchmarks.sh tests loss`): tests, loss, loss_pallas, train_step,
# train_step_cached, loss_small_chunks, attention, tokamax.
tests() {  # the Pallas kernels compiled with Triton, against the dense loss at small shapes (the
  # same tests run interpreted on CPU in the default suite; conftest defaults JAX to the CPU).
  # float32 dots at full precision: XLA's default on a GPU lets cuBLAS use TF32 for the dense
  # reference, which alone moves values by ~1e-4.
  JAX_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest QTARGET_PALLAS_IMPLEMENTATION=pallas \
    part test_fused_pallas 90 \
    $PYTHON -m pytest -q -p no:cacheprovider tests/test_fused_pallas.py
}
loss() {  # the three loss-head shapes of `benchmarks/loss.py --gpu`: optax CE, dense Q, fused Q
  # (chunks of 1024 and 512, head gradient accumulated in float32 and in bfloat16) and the matmul
  # floor; the Pallas kernels (21x the floor on an H100) only with `loss_pallas`
  part loss 240 $PYTHON benchmarks/loss.py --gpu --no-pallas --chunk-sizes 1024,512 \
    --out "$OUT/loss_gpu.json"
}
loss_pallas() {  # the Pallas kernels at the first loss shape
  part loss_pallas 120 $PYTHON benchmarks/loss.py --gpu --pallas --chunk-sizes 1024 \
    --shapes 16384,576,576,49152 --out "$OUT/loss_gpu_pallas.json"
}
train_step() {  # Qwen2.5-1.5B shape, 4 x 2048: the old path (einsum attention, a Python loop of
  # layers) against cuDNN attention with scanned layers, remat policies, dense and fused loss,
  # SFT and Target-SFT, batch 8 (benchmarks/train_step.py GPU_VARIANTS)
  part train_step 330 $PYTHON benchmarks/train_step.py --gpu --out "$OUT/train_step_gpu.json"
}
train_step_cached() {  # the cached prior (top-64 rows in the batch) against SFT and the online
  # prior at the Qwen2.5-1.5B shape, save_dots, dense and fused
  part train_step_cached 300 $PYTHON benchmarks/train_step.py --gpu --variants \
    sft/fused/cudnn/scan/save_dots/4,target_sft/fused/cudnn/scan/save_dots/4,target_sft_cached/fused/cudnn/scan/save_dots/4,sft/dense/cudnn/scan/save_dots/4,target_sft/dense/cudnn/scan/save_dots/4,target_sft_cached/dense/cudnn/scan/save_dots/4 \
    --out "$OUT/train_step_gpu_cached.json"
}
attention() {  # one layer's attention at the Qwen shape: reference, xla, cudnn (packed segments)
  part attention 90 $PYTHON benchmarks/attention.py --gpu --out "$OUT/attention_gpu.json"
}
tokamax() {  # tokamax's attention kernels (mosaic, triton, cudnn, xla_chunked) beside ours at
  # the Qwen shape, packed segments as a mask; needs `bash benchmarks/fetch_tokamax_wheels.sh`
  # first (tokamax and its pure-Python dependencies in .whl/tokamax, carried with .whl)
  if ! ls .whl/tokamax/*.whl >/dev/null 2>&1; then
    echo "[tokamax] skipped: .whl/tokamax is empty (run benchmarks/fetch_tokamax_wheels.sh)" |
      tee -a "$OUT/env.txt"
    return
  fi
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_tokamax \
    .whl/tokamax/*.whl >>"$OUT/env.txt" 2>&1
  PYTHONPATH=/tmp/site_tokamax:$PYTHONPATH part tokamax 150 \
    $PYTHON benchmarks/attention.py --gpu --tokamax --out "$OUT/attention_gpu_tokamax.json"
}
loss_small_chunks() {  # the fused loss's memory at smaller token chunks (no Pallas)
  part loss_small_chunks 90 $PYTHON benchmarks/loss.py --gpu --no-pallas --chunk-sizes 512,256 \
    --out "$OUT/loss_gpu_small_chunks.json"
}
parts=("$@")
# The default: attention and train_step, about 7 minutes of GPU time with the start.
[ ${#parts[@]} -eq 0 ] && parts=(attention train_step)
for name in "${parts[@]}"; do
  case $name in
    tests | loss | loss_pallas | train_step | train_step_cached | loss_small_chunks | attention \
      | tokamax)
      $name ;;
    *) echo "unknown part '$name': choose from tests, loss, loss_pallas, train_step," \
         "train_step_cached, loss_small_chunks, attention, tokamax" >&2
       exit 2 ;;
  esac
done
tail -n 40 "$OUT"/*.log
