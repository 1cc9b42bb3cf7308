# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
# CPU build of PyTorch unless told otherwise (GPU machines: make TORCH_CONSTRAINTS= ...).
TORCH_CONSTRAINTS ?= constraints/cpu.txt

$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS)) -e '.[dev]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sloserve demo

test: install
	$(VENV)/bin/python -m pytest
