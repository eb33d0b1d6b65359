# One-command set-up: every target creates .venv if missing, installs torch==2.13.0 FIRST
# (a CPU wheel; a bare `torch` would pull GBs of CUDA packages), then rspo with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rspo-installed

.PHONY: install demo test lint study drift test-trl-newest clean

$(STAMP): pyproject.toml requirements-outside.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements-outside.txt
	touch $(STAMP)

install: $(STAMP)

# --overwrite: a second `make demo` replaces the first one's output (only files the demo wrote).
demo: $(STAMP)
	$(VENV)/bin/rspo demo --overwrite

# The stability study (issue 6), all four grids and their reports in docs/study/ (about 2.5 h on
# 2 cores; resumable: finished runs are skipped). The ablations' report reads the main arms' runs.
STUDIES := countdown countdown-mild countdown-collapse ablations
study: $(STAMP)
	for s in $(STUDIES); do \
	  $(VENV)/bin/rspo study configs/study-$$s.yaml && \
	  $(VENV)/bin/rspo report runs/study-$$s --out docs/study/$$s --overwrite \
	    --command-line "rspo study configs/study-$$s.yaml" || exit 1; \
	done

# The drift atlas (issue 13): 8 models pretrained on one budget, 4 RL regimes each, and its report in
# docs/drift/ (about 75 min on 2 cores; resumable: finished runs are skipped).
drift: $(STAMP)
	$(VENV)/bin/rspo drift configs/drift-atlas.yaml
	$(VENV)/bin/rspo drift-report runs/drift --out docs/drift --overwrite \
	  --command-line "rspo drift configs/drift-atlas.yaml"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

test: $(STAMP) lint
	$(PY) -m pytest -q

# The TRL tests against the newest TRL release on the index (the pinned one is what `make test` uses)
test-trl-newest: $(STAMP)
	$(PY) tests/trl_newest.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
