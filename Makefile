PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the CPU build of torch 2.13.0 and onnxruntime. GPU machines: make EXTRAS=gpu,train,dev,serve,ray
EXTRAS ?= cpu,train,dev,serve,ray
PORT ?= 3000

.PHONY: test install serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The first command on a fresh machine: install, then serve the bundled model (or $CSC_MODEL) on $(PORT).
serve: install
	BENTOML_DO_NOT_TRACK=True $(BIN)/bentoml serve --port $(PORT) $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
