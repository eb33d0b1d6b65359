# One-command set-up: every target creates .venv if missing, installs torch==2.13.0 FIRST
# (a CPU wheel; a bare `torch` would pull GBs of CUDA packages), then rspo with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rspo-installed

.PHONY: install demo test lint docs study study-e8k1 drift test-trl-newest verl-env test-verl test-verl-e2e stress-trl \
  megatron-env test-megatron gpu-check clean

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

# The stability study on the main testbed (issue 13: builtin:countdown-e64k8, the demo's regime): the four main
# arms x 5 seeds, ten ablations x 3 seeds, the direct gradient-variance measurement; reports into
# docs/study/e64k8*/ (about 75 min on 2 cores; resumable: finished runs are skipped).
study: $(STAMP)
	$(VENV)/bin/rspo study configs/study-e64k8.yaml
	$(VENV)/bin/rspo report runs/study-e64k8 --out docs/study/e64k8 --overwrite \
	  --command-line "rspo study configs/study-e64k8.yaml"
	$(VENV)/bin/rspo study configs/study-e64k8-ablations.yaml
	$(VENV)/bin/rspo report runs/study-e64k8-ablations --out docs/study/e64k8-ablations --overwrite \
	  --command-line "rspo study configs/study-e64k8-ablations.yaml"
	$(VENV)/bin/rspo gradvar configs/gradvar-e64k8.yaml
	mkdir -p docs/study/e64k8-gradvar && cp runs/gradvar-e64k8/report.md runs/gradvar-e64k8/results.json \
	  docs/study/e64k8-gradvar/

# The first stability study (issue 6), on the first testbed (builtin:countdown-base, 8 experts top-1): all
# four grids and their reports in docs/study/ (about 2.5 h on 2 cores; resumable). The ablations' report
# reads the main arms' runs.
STUDIES := countdown countdown-mild countdown-collapse ablations
study-e8k1: $(STAMP)
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

# The docs site (MkDocs, Material, an API reference from the docstrings), built strictly: a broken link, a
# missing anchor or a module the reference cannot find fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d build/site

test: $(STAMP) lint docs
	$(PY) -m pytest -q

# The verl plugin's tests and rspo's routing tests in verl's environment: a separate venv with
# `pip install rspo[verl]` (verl 0.9.x and its own pins: transformers < 5.11, ray, ...) next to the same
# CPU torch, plus uvicorn/fastapi (verl-core, needed to import verl's actor worker). About 2 min to set up.
VERL_VENV ?= .venv-verl
VERL_STAMP := $(VERL_VENV)/.rspo-installed
$(VERL_STAMP): pyproject.toml
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade pip
	$(VERL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VERL_VENV)/bin/python -m pip install -q -e ".[verl]" pytest hypothesis uvicorn fastapi
	touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest -q -o addopts="-ra" -p no:cacheprovider tests/verl_plugin \
	  tests/test_routing_capture.py tests/test_router_shift.py

# verl's real `python -m verl.trainer.main_ppo` with the plugin, on CPU (tests/verl_e2e: the CPU shim, the HF
# rollout, recipe.py's commands): plain GRPO; RSPO on two ranks, saved, then resumed with R3; the legacy
# trainer's error. Four main_ppo runs, about 7 minutes here (each is mostly process start-up).
VERL_E2E_STAMP := $(VERL_VENV)/.rspo-e2e-installed
$(VERL_E2E_STAMP): $(VERL_STAMP) tests/verl_e2e/requirements.txt
	$(VERL_VENV)/bin/python -m pip install -q -r tests/verl_e2e/requirements.txt
	touch $(VERL_E2E_STAMP)

# verl's environment alone (both stamps): `.ci/run` builds it while `make test` runs (it is mostly downloads).
verl-env: $(VERL_E2E_STAMP)

test-verl-e2e: $(VERL_E2E_STAMP)
	RSPO_VERL_E2E=1 $(VERL_VENV)/bin/python -m pytest -q -o addopts="-ra" -p no:cacheprovider tests/verl_e2e \
	  --durations=0

# The Megatron-Core adapter (rspo.integrations.megatron) on a tiny GPTModel with MoE layers, on CPU, in its own
# venv: `pip install rspo[megatron]` (Megatron-Core 0.16.x: torch, numpy, packaging) next to the same CPU torch.
# The CPU patches live in tests/megatron/mcore_cpu.py. About 1 min to set up, under 1 min to run.
MEGATRON_VENV ?= .venv-megatron
MEGATRON_STAMP := $(MEGATRON_VENV)/.rspo-installed
$(MEGATRON_STAMP): pyproject.toml
	test -x $(MEGATRON_VENV)/bin/python || $(PYTHON) -m venv $(MEGATRON_VENV)
	$(MEGATRON_VENV)/bin/python -m pip install -q --upgrade pip
	$(MEGATRON_VENV)/bin/python -m pip install -q torch==2.13.0
	$(MEGATRON_VENV)/bin/python -m pip install -q -e ".[megatron]" pytest hypothesis
	touch $(MEGATRON_STAMP)

megatron-env: $(MEGATRON_STAMP)

test-megatron: $(MEGATRON_STAMP)
	$(MEGATRON_VENV)/bin/python -m pytest -q -o addopts="-ra" -p no:cacheprovider -p no:warnings tests/megatron

# The TRL tests against the newest TRL release on the index (the pinned one is what `make test` uses)
test-trl-newest: $(STAMP)
	$(PY) tests/trl_newest.py

# The two-process TRL run repeated 20 times with every core kept busy (issue 21: a teardown abort one run in a
# few); about 10 minutes. Not in CI.
stress-trl: $(STAMP)
	$(PY) -c "from rspo.lab.pretrain import PretrainConfig, pretrain; pretrain(PretrainConfig(preset='tiny-qwen3-moe', \
	  out_dir='runs/stress-policy', steps=80, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=0, final_eval=False, \
	  shuffle_buffer=64, threads=1), progress=False, overwrite=True)"
	$(PY) tests/scripts/stress_two_process.py runs/stress-policy --runs 20 --load 2

# The GPU check, for a lent accelerator with only torch and transformers (no install: PYTHONPATH=src): the
# CUDA checks (kernel, float32 and bf16 steps, R3) and GRPO/RSPO/RSPO+R3 step time and peak memory on a
# 110M-parameter preset, into $(GPU_CHECK_OUT). Fits in a few minutes on one H100 (not run yet: no GPU so far).
GPU_CHECK_OUT ?= gpu-check.json
gpu-check:
	PYTHONPATH=src python3 benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) $(VERL_VENV) $(MEGATRON_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
