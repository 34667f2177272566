#!/usr/bin/env bash
# Fetches tokamax and its pure-Python dependencies (no jax: the GPU image has it) into
# .whl/tokamax for `bash benchmarks/gpu_benchmarks.sh tokamax`, for a GPU machine that reaches no
# package registry. About 4 MB. Run it where pip reaches PyPI, before the GPU run (the GPU
# image's Python: 3.12).
set -euo pipefail
PY=${PY:-3.12}
mkdir -p .whl/tokamax
for p in tokamax==0.0.12 pydantic pydantic-core annotated-types typing-inspection qwix jaxtyping \
         wadler-lindig einshape typeguard==2.13.3 immutabledict tensorboardx; do
  pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .whl/tokamax "$p"
done
ls .whl/tokamax
