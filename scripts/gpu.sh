#!/usr/bin/env bash
# The GPU runner, one command on a CUDA machine; nothing else needed, results go to benchmarks/results/.
#   scripts/gpu.sh            everything, in this order
#   scripts/gpu.sh quick      the validation that fits one 10-minute device call (benchmarks/quick.py):
#              the gpu tests, the goals at 16K and 64K, tuned vs default tiles, the launch order, each
#              stage within its budget (480 s in all) -> ${OUT:-benchmarks/results}/quick_<gpu>.json and
#              a table last. Pass SPARSEC_COMMIT=<hash> where the copy has no .git.
#   scripts/gpu.sh quick-dry  the same on the CPU at toy sizes (CI runs it: tests/test_quick.py)
#   scripts/gpu.sh STAGE ...  some stages (each fits a shorter time limit than the whole):
#     tests    the gpu-marked tests: generated kernels forward and backward vs float64, the tuner on the device
#     goals-forward, goals-backward
#              benchmarks/suite.py --preset goals: band(1024)+global(16), BigBird and the full-pattern yardstick
#              at n = 16K and 64K, bf16, D=128, H=16, forward (or forward+backward), vs FlexAttention, masked
#              SDPA and dense SDPA -> suite_goals_{forward,backward}_<gpu>.json/.png, the issue's goals evaluated
#              (goals-forward first runs `sparsec tune`, the command users run ahead of time)
#     library  benchmarks/suite.py: every library pattern at n = 4K..128K (long: tunes each pattern once)
#     focused  the launch order ablation (launch_order_<gpu>.json), and the earlier benchmarks with
#              hand-written Flex mask_mods at n = 16K (gpu_forward_<gpu>.json, gpu_backward_<gpu>.json)
#              and lsh(64) (gpu_content_<gpu>.json)
# Tuned tiles go to a fresh cache dir (SPARSEC_CACHE_DIR), so every run tunes from nothing and reports it.
#   scripts/gpu.sh wheels   (on the CPU machine, before a device call) downloads the pure-Python
#              packages the lent machine lacks (lark, tqdm) into .gpu/wheels; carry .gpu there.
# Python: $PYTHON, else .venv/bin/python, else the machine's python3 (the lent GPU machine: torch 2.11,
# triton 3.6, no lark), with the carried wheels installed into .gpu/site and the checkout on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then
  mkdir -p .gpu/wheels
  "${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps -d .gpu/wheels lark tqdm
  ls .gpu/wheels
  exit 0
fi
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
if ! "$PY" -c "import lark, tqdm" 2>/dev/null; then
  [ -d .gpu/wheels ] || { echo "scripts/gpu.sh: $PY lacks lark/tqdm and .gpu/wheels is missing (run scripts/gpu.sh wheels here, carry .gpu)" >&2; exit 2; }
  "$PY" -m pip install -q --no-deps --no-index --target .gpu/site .gpu/wheels/*.whl
  export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # sparsec from the checkout (not installed there)
"$PY" -c "import torch, triton, sparsec; print('gpu.sh:', '$PY', 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
export SPARSEC_CACHE_DIR=${SPARSEC_CACHE_DIR:-$(mktemp -d)}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests goals-forward goals-backward focused library)
for stage in "${stages[@]}"; do
  case "$stage" in
    quick) "$PY" benchmarks/quick.py ;;
    quick-dry) "$PY" benchmarks/quick.py --dry-run ${QUICK_OUT:+--out "$QUICK_OUT"} ;;
    tests) "$PY" -m pytest -q -m gpu tests/ ;;
    goals-forward)
      # the suite then finds this key cached (its tune_s ~ 0 there)
      "$PY" -m sparsec tune patterns/bigbird.sa --n 16384 --heads 16 --dim 128 --dtype bfloat16
      "$PY" benchmarks/suite.py --device cuda --preset goals --modes forward ;;
    goals-backward) "$PY" benchmarks/suite.py --device cuda --preset goals --modes forward+backward ;;
    library) "$PY" benchmarks/suite.py --device cuda ;;
    focused)
      "$PY" benchmarks/launch_order.py
      "$PY" benchmarks/cpu_forward.py --device cuda
      "$PY" benchmarks/cpu_backward.py --device cuda
      "$PY" benchmarks/content.py --device cuda ;;
    *) echo "scripts/gpu.sh: unknown stage $stage (quick, quick-dry, tests, goals-forward, goals-backward," \
            "focused, library)" >&2
       exit 2 ;;
  esac
done
