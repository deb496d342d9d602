# `make demo` and `make test` work on a fresh clone: both install into .venv first.
VENV ?= .venv
PYTHON ?= python3
# segment-anything imports torchvision; this pair installs and imports cleanly together.
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cellsam-trt demo

test: install
	$(VENV)/bin/python -m pytest -q
