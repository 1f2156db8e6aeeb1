#!/usr/bin/env bash
# Prepares .whl/ for bench/gpu_check.sh on a GPU machine that has torch, numpy, timm's needs and
# pytest but no DeepSpeed and no package registry (Python 3.12, x86-64 manylinux):
#   DeepSpeed built here with DS_BUILD_OPS=0 (pure Python; its CUDA ops JIT-build there if ever used),
#   the pure-Python packages it needs that such a machine lacks, and the timm release this project
#   is tested with. About 8 MB; .whl/ is git-ignored (.git/info/exclude) and travels as a carried path.
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER="${1:-3.12}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
DEST="$REPO/.whl"
mkdir -p "$DEST"
grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$REPO/.git/info/exclude"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Same versions as the project's venv, so the GPU run tests what CI tests.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
    "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)" "timm==$(version timm)"
ls -1 "$DEST"
du -sh "$DEST"

# ffcv: no wheel exists for it. Carry this venv's build (its Python package, the compiled _libffcv
# renamed to the version-neutral `_libffcv.so` suffix every CPython accepts; the module only exports
# C functions that ffcv reaches through ctypes) and the shared libraries it links (OpenCV core and
# imgproc, libjpeg-turbo and what they need), minus the C/C++ runtime every Linux with torch has.
SITE_PACKAGES="$("$PY" -c 'import ffcv, os; print(os.path.dirname(os.path.dirname(ffcv.__file__)))')"
rm -rf "$DEST/ffcv" "$DEST/ffcv-libs"
mkdir -p "$DEST/ffcv-libs"
cp -r "$SITE_PACKAGES/ffcv" "$DEST/ffcv"
find "$DEST/ffcv" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$DEST/ffcv/benchmarks"
EXT="$(ls "$DEST"/ffcv/_libffcv*.so)"
mv "$EXT" "$DEST/ffcv/_libffcv.so"
ldd "$DEST/ffcv/_libffcv.so" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|ld-linux*|libpthread.so*|libdl.so*|librt.so*) ;;
    *) cp -L "$lib" "$DEST/ffcv-libs/" ;;
  esac
done
ls -1 "$DEST/ffcv-libs"
du -sh "$DEST"
