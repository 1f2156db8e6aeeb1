#!/usr/bin/env bash
# Every benchmark with defaults sized for a small CPU machine (2 cores: ~14 minutes in all).
# Usage: bench/run_all.sh [> bench/my_results.txt]     GPU: see bench/RESULTS.md, "GPU (device tool)".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# Shared machine: OpenMP threads sleep instead of spinning at barriers (see bench/common.py).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

run() { echo; echo "\$ $*"; "$@"; }
run "$PY" bench/model.py --batch 8 --repeats 5
run "$PY" bench/zero_memory.py --world-sizes 2 4
run "$PY" bench/scaling.py --rounds 3
run "$PY" bench/loader.py --images 768 --rounds 3
run "$PY" bench/data_prep.py --images 3000 --rounds 3
run "$PY" bench/nonfinite_guard.py --repeats 5
run "$PY" bench/host_overhead.py
