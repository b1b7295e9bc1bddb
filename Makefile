# Two entry points: `make train` and `make test`. Both create .venv on first use.
# torch==2.13.0 is installed first so that pip takes the local CPU wheel instead of a multi-GB CUDA build.
# The venv gets every extra (DeepSpeed, plotting, transformers) so that the whole suite runs; `make test-fast` runs the unit
# and kernel-backend tests (tests/unit, tests/kernels: the CPU backend's own tests live in tests/kernels/cpu).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast test-torch2.14 bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,deepspeed,plot,hf]'
	@touch $(STAMP)

setup: $(STAMP)

train: setup
	$(PY) -m train $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "(unit or kernels) and not slow" $(ARGS)

# The suite under torch 2.14 (torch-npu 2.14.0's pair) in its own venv; the CUDA wheel pip fetches runs on CPU. The
# C++ CPU kernels build into their own cache, so the two torch versions never load each other's build.
VENV214 := .venv-torch2.14
test-torch2.14:
	@test -x $(VENV214)/bin/python || $(PYTHON) -m venv $(VENV214)
	$(VENV214)/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1
	$(VENV214)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,deepspeed,plot,hf]'
	TORCH_EXTENSIONS_DIR=$(HOME)/.cache/torch_extensions_torch2.14 $(VENV214)/bin/python -m pytest -q $(ARGS)

bench: setup
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) $(VENV214) outputs .pytest_cache
