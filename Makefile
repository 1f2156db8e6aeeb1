# One entry point for users and CI. `make test` and `make demo` install what they need first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip install -q --progress-bar off
QUIET := 2>&1 | { grep -v -e 'is ignored: it is neither' -e 'BuildBackendWarning' || true; }
STAMP := $(VENV)/.setup-stamp
APT_PACKAGES := build-essential pkg-config libopencv-dev libturbojpeg0-dev \
                openmpi-bin libopenmpi-dev openssh-server openssh-client pdsh

export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS := 0
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup lint test test-fast demo bench clean

setup: $(STAMP)

# Re-run only when the dependency list or this recipe changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml Makefile
	@bash .ci/install_system_packages.sh $(APT_PACKAGES)
	@test -x $(PY) || { echo "[setup] creating virtualenv $(VENV)"; python3 -m venv $(VENV); }
	@echo "[setup] upgrading pip/setuptools/wheel"
	@$(PIP) --upgrade pip setuptools wheel $(QUIET)
	@echo "[setup] installing torch + torchvision (CUDA build, also runs on CPU)"
	@$(PIP) torch torchvision $(QUIET)
	@echo "[setup] installing numpy/cython build prerequisites for ffcv"
	@$(PIP) numpy cython pkgconfig $(QUIET)
	@echo "[setup] installing dwnet-ds and its dependencies (DS_BUILD_OPS=0)"
	@$(PIP) --no-build-isolation -e '.[dev,deploy]' $(QUIET)
	@$(PY) -c "import torch, torchvision, timm, deepspeed, ffcv, mpi4py, yaml, onnx, onnxruntime; from importlib.metadata import version as v; \
	  print('[setup] ok:', ', '.join(f'{p} {v(p)}' for p in ('torch', 'torchvision', 'timm', 'deepspeed', 'ffcv', 'mpi4py', 'onnxruntime')))" $(QUIET)
	@touch $(STAMP)

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -v --timeout=1500 --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) -m dwnet.model_report --reference tests/data/dwnet_e24_d1121_c10.pth \
	    --reference-io tests/data/dwnet_e24_d1121_c10_io.pt
	$(PY) -m dwnet.demo

clean:
	rm -rf $(VENV) build *.egg-info
