#!/usr/bin/env bash
# Make .venv with the CPU build of torch (pinned: a loose torch pulls gigabytes of CUDA wheels) and sparsec.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sparsec, pytest, hypothesis" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[test]"
fi
