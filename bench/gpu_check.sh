#!/usr/bin/env bash
# The CUDA path in one command, for a bare GPU machine with no package registry:
#   1. installs what is missing from wheels carried in .whl/ (made here by bench/gpu_wheels.sh:
#      DeepSpeed built with DS_BUILD_OPS=0, its pure-Python needs, timm, and this machine's ffcv
#      build with the OpenCV / libjpeg-turbo libraries it links);
#   2. runs the tests marked `gpu` (tests/test_gpu.py);
#   3. trains dwnet_tiny, convnext_tiny and swin_tiny through the real engine (bf16, ZeRO-2, 224 px)
#      on an ImageNet-like JPEG tree generated there, and writes one JSON with every figure.
#
#   bash bench/gpu_check.sh [--out DIR] [--budget-s SECONDS]   # on the GPU machine
#   bash bench/gpu_check.sh --quick [--out DIR]                # the tests and dwnet_tiny's loaders only
#   bash bench/gpu_check.sh --cpu-dry-run [--out DIR]          # the same steps on CPU, tiny sizes
#
# Where `import ffcv` still fails (no carried build, or its libraries do not load there) the loader
# benchmark uses the ImageFolder backend, and the report says so.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DRY_RUN=0
QUICK=()
OUT_DIR=""
BUDGET_S=420
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    --quick) QUICK=(--quick) ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR="${OUT_DIR:-${OUT:-$REPO/runs/gpu_check}}"
mkdir -p "$OUT_DIR"

# The project's venv when there is one (CPU dry run in make test), else the machine's python3.
PYTHON="${PYTHON:-$([[ -x "$REPO/.venv/bin/python" ]] && echo "$REPO/.venv/bin/python" || echo python3)}"
CALLER_PYTHONPATH="${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}"

if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  if ! ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: deepspeed is not installed and no wheels are in $REPO/.whl; run bench/gpu_wheels.sh first" >&2
    exit 2
  fi
  SITE="${TMPDIR:-/tmp}/dwnet-gpu-site"
  echo "[gpu_check] installing carried wheels into $SITE: $(cd "$REPO/.whl" && ls *.whl | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$REPO"/.whl/*.whl || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="$REPO:$SITE${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}"
fi

if ! "$PYTHON" -c "import ffcv" 2>/dev/null && [[ -d "$REPO/.whl/ffcv" ]]; then
  SITE="${SITE:-${TMPDIR:-/tmp}/dwnet-gpu-site}"
  echo "[gpu_check] using the carried ffcv build and its libraries (.whl/ffcv, .whl/ffcv-libs)"
  mkdir -p "$SITE" && rm -rf "$SITE/ffcv" && cp -r "$REPO/.whl/ffcv" "$SITE/ffcv"
  export LD_LIBRARY_PATH="$REPO/.whl/ffcv-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$REPO:$SITE${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}"
fi

if [[ $DRY_RUN == 1 ]]; then
  export DS_ACCELERATOR=cpu
  exec "$PYTHON" bench/gpu_check.py --out "$OUT_DIR" --budget-s "$BUDGET_S" --cpu-dry-run
fi
export DWNET_GPU_TESTS=1
exec "$PYTHON" bench/gpu_check.py --out "$OUT_DIR" --budget-s "$BUDGET_S" "${QUICK[@]}"
