PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the CPU build of torch 2.13.0 and onnxruntime. GPU machines: make EXTRAS=gpu,train,dev,serve,ray,client
# (and make serve SERVE_EXTRAS=gpu,serve).
EXTRAS ?= cpu,train,dev,serve,ray,client
# What `bentoml serve` of the service imports: ONNX, ONNX Runtime and BentoML (no training, Ray or test packages).
SERVE_EXTRAS ?= cpu,serve
PORT ?= 3000
# Every dependency at the version the tests last passed with (make lock writes it, and requirements-bento.txt).
# torch is pinned there exactly and installed first: `pip install torch==2.13.0` takes the CPU build on disk here,
# while any other torch spec would pull several GB of CUDA packages.
LOCK := constraints.txt
TORCH := torch==2.13.0
LOCK_EXTRAS := cpu,train,dev,serve,ray,client
LOCK_VENV := build/lock-venv

.PHONY: test install serve lint lock clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras: `make serve` installing the serving extras does not stand for the test extras.
$(VENV)/.installed-%: $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -c $(LOCK) -e ".[$*]"
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# The first command on a fresh machine: install what serving needs, then serve the bundled model (or $CSC_MODEL).
serve: $(VENV)/.installed-$(SERVE_EXTRAS)
	@echo "Open http://localhost:$(PORT)/ui/ for the page; the API and its docs are at http://localhost:$(PORT)/ (ready when /readyz answers 200)"
	BENTOML_DO_NOT_TRACK=True $(BIN)/bentoml serve --port $(PORT) $(SERVE_ARGS)

# Refresh the lock: a fresh venv, the newest releases of every extra (nothing pinned but torch), the tests, and
# only if they pass, constraints.txt and requirements-bento.txt from what that venv holds.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install -e ".[$(LOCK_EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pytest $(PYTEST_ARGS)
	$(LOCK_VENV)/bin/python .ci/lock.py $(LOCK_EXTRAS)
	rm -rf $(LOCK_VENV)
	@echo "Lock written; 'make test' reinstalls .venv from it."

# Everything that needs a CUDA GPU in one command (.ci/gpu-check says what): the CUDA tests, `csc bench` on the
# CUDA backends, training throughput and a training run of GPU_TRAIN_SECONDS. It runs with the python3 of a GPU
# machine (torch with CUDA already there) and installs nothing but the project itself.
GPU_PYTHON ?= python3
GPU_DATA ?= ../shared/data/cbsd432
GPU_TRAIN_SECONDS ?= 240
GPU_PHASES ?= checks train
gpu-check:
	PYTHON=$(GPU_PYTHON) DATA=$(GPU_DATA) TRAIN_SECONDS=$(GPU_TRAIN_SECONDS) .ci/gpu-check $(GPU_PHASES)

clean:
	rm -rf $(VENV) build *.egg-info
