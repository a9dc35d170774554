# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
# torch first, pinned to the CPU wheel on this kind of machine, so pip never resolves a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-quick test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/brainfm demo --out $(DEMO_OUT)

demo-quick: $(VENV)/.installed
	$(VENV)/bin/brainfm demo --out $(DEMO_OUT) --quick

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT)
