PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the CPU build of torch 2.13.0 and onnxruntime. GPU machines: make EXTRAS=gpu,train,dev,serve,ray,client
EXTRAS ?= cpu,train,dev,serve,ray,client
PORT ?= 3000
# Every dependency at the version the tests last passed with (make lock writes it, and requirements-bento.txt).
# torch is pinned there exactly and installed first: `pip install torch==2.13.0` takes the CPU build on disk here,
# while any other torch spec would pull several GB of CUDA packages.
LOCK := constraints.txt
TORCH := torch==2.13.0
LOCK_EXTRAS := cpu,train,dev,serve,ray,client
LOCK_VENV := build/lock-venv

.PHONY: test install serve lint lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# The first command on a fresh machine: install, then serve the bundled model (or $CSC_MODEL) on $(PORT).
serve: install
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

clean:
	rm -rf $(VENV) build *.egg-info
