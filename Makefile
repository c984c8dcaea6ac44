# Two commands for a fresh machine:
#   make demo   - create .venv, install ekd, run `ekd demo` on the built-in synthetic faces
#   make test   - create .venv, install ekd with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; pip finds the wheel on disk where one is provided (no CUDA download).
TORCH ?= torch==2.13.0
DEMO_ARGS ?=

.PHONY: venv demo test clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,onnx,plot,tensorboard]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/ekd demo $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out outputs runs .pytest_cache
