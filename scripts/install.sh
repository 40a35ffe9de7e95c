#!/usr/bin/env bash
# Make .venv with the CPU build of torch (pinned: a loose torch pulls gigabytes of CUDA wheels),
# Triton (its interpreter runs the generated kernels on CPU in the tests) and sparsec.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, triton, sparsec, pytest, hypothesis, transformers" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0 triton==3.9.0 "setuptools>=70.1"   # setuptools: the wheel test builds one
  .venv/bin/pip install -q -e ".[test]"
fi
# The lent GPU machine runs Triton 3.6 (docs/gpu.md): the sm_90 compile test compiles with it too,
# from a side folder put first on PYTHONPATH (torch and the rest from .venv).
if [ ! -f .venv/triton-3.6/triton/__init__.py ]; then
  .venv/bin/pip install -q --no-deps --target .venv/triton-3.6 triton==3.6.0
fi
