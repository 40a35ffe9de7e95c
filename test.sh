#!/usr/bin/env bash
# Run the test suite (installs first if .venv is missing or incomplete). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
.venv/bin/python -m pytest -q "$@"
