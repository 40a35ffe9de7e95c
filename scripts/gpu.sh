#!/usr/bin/env bash
# The GPU runner, one command on a CUDA machine: the gpu-marked tests (forward and gradients), then
# the forward benchmark and the forward+backward benchmark (bf16, D=128, n=16384, vs FlexAttention
# and dense-mask SDPA) -> benchmarks/results/gpu_forward_<gpu>.json and gpu_backward_<gpu>.json, and the
# content-based benchmark (lsh(64), n=16384, D=64, vs dense flash attention, Flex and dense-mask SDPA)
# -> benchmarks/results/gpu_content_<gpu>.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pytest -q -m gpu tests/
"$PY" benchmarks/cpu_forward.py --device cuda
"$PY" benchmarks/cpu_backward.py --device cuda
"$PY" benchmarks/content.py --device cuda
