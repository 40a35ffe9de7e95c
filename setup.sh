#!/usr/bin/env bash
# Fresh machine to first result: install, then verify and draw the BigBird library pattern.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
mkdir -p out
.venv/bin/sparsec check patterns/bigbird.sa --n 4096
.venv/bin/sparsec show patterns/bigbird.sa --n 4096 -o out/bigbird.png
