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
