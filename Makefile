# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Each creates .venv and installs the toolkit on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The PyTorch build to install first. The default pins a CPU-friendly release; pass
# TORCH=torch (or a CUDA wheel spec) to take your platform's default build instead.
TORCH  ?= torch==2.13.0

export HF_HUB_OFFLINE := 1

.PHONY: install quickstart test clean

$(BIN)/rlhf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/rlhf

install: $(BIN)/rlhf

quickstart: install
	$(BIN)/rlhf run recipes/quickstart.yaml

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
