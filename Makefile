# Two commands for a fresh machine:
#   make demo   - create .venv, install ekd, run `ekd demo` on the built-in synthetic faces
#   make test   - create .venv, install ekd with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch from pip's default index (PyPI: the CUDA build on Linux) or from TORCH_INDEX, e.g.
# make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU-only build; pip takes a
# wheel provided on disk (find-links) where there is one.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_ARGS ?=

.PHONY: venv demo test clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test,onnx,plot,tensorboard]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/ekd demo $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out outputs runs .pytest_cache
