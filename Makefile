# qwrap: set-up, demo, tests and per-format targets. `make help` lists them.
# Expensive outputs (llama.cpp build, environments) live in the cache
# ($QWRAP_CACHE_DIR, default ~/.cache/qwrap), keyed by their pins, so reruns are no-ops.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
QWRAP := $(VENV)/bin/qwrap
PY := $(VENV)/bin/python
BACKENDS ?= gptqmodel autoawq auto-gptq
OUT ?= out
QUANTS ?= Q4_K_M Q8_0
MODEL ?=
DEMO := demo-out
PYTEST_ARGS ?=
SCALING_ARGS ?= --sizes 7m 110m 400m 1b

.PHONY: help setup venv llama envs backend-envs browser slurm demo test test-fast gguf awq gptq all-formats bench lint wheel clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  Variables: MODEL=<folder or org/name> OUT=<folder> QUANTS=\"Q4_K_M Q8_0\" QWRAP_ARGS=..."

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.installed ## The qwrap package (light: no torch) in .venv

llama: venv ## Fetch (hash-checked) and build the pinned llama.cpp into the cache (qwrap setup)
	$(QWRAP) setup --no-envs >/dev/null

envs: venv ## The converter environment (torch CPU + transformers) and the report one (matplotlib) in the cache
	$(QWRAP) setup --no-llama >/dev/null

backend-envs: venv ## The AWQ/GPTQ backend environments in the cache
	$(QWRAP) setup --no-llama --no-envs $(foreach b,$(BACKENDS),--backends $(b)) >/dev/null

browser: ## Headless Chromium for the quality-page test (Debian/Ubuntu apt, when missing)
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }

slurm: ## Debian's slurm-wlm (slurmctld, slurmd, munge) for the real-Slurm tests (apt, when missing)
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y slurm-wlm; }

setup: venv llama envs backend-envs browser slurm ## Everything the tests and demo need

# The model: 300 steps on the corpus in 512-token windows (the evaluation's context), about 2-3
# minutes on 2 cores, built once into the cache (keyed by the script, corpus and arguments).
# Calibration reads the text it was trained on, evaluation the held-out tail it never saw.
demo: venv llama envs ## Train a small model offline (once, cached) and quantize it to a few GGUF types, with quality figures
	@model=$$($$($(QWRAP) env create convert) scripts/make-tiny-model --cached "$$(scripts/cache-dir)/demo-models" \
	    --train-steps 300 --train-seq-len 512 --train-batch 2 --texts) && \
	set -x && $(QWRAP) run "$$model" -o $(DEMO)/gguf -q Q4_K_M -q Q5_K_M -q Q8_0 \
	    --calib "$$model/texts/train.txt" --eval-text "$$model/texts/held-out.txt" --eval-tokens 2560
	@echo "Artifacts, model card and quality page (quality.html) in $(DEMO)/gguf; run again to see every step reused."

# The tests start hundreds of qwrap processes and workers: each reads qwrap's compiled bytecode,
# as a wheel install has it, not recompiling every changed module (hosts that set
# PYTHONDONTWRITEBYTECODE never write it): about 0.1 s of CPU a process.
BYTECODE = $(PY) -m compileall -q wrapper/qwrap

test: setup ## All tests (real tools, tiny models); about 13-15 minutes warm on 2 cores
	$(BYTECODE)
	QWRAP_REQUIRE_TOOLCHAIN=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv ## The tests that need no toolchain, under a minute (not slow, backend or heavy)
	$(BYTECODE)
	$(PY) -m pytest -m "not slow and not backend and not heavy" $(PYTEST_ARGS)

gguf: venv llama envs ## make gguf MODEL=... QUANTS="Q4_K_M Q8_0" OUT=...
	@test -n "$(MODEL)" || { echo "usage: make gguf MODEL=<folder or org/name> [QUANTS=...] [OUT=...]"; exit 2; }
	$(QWRAP) run "$(MODEL)" -o "$(OUT)" --format gguf $(foreach q,$(QUANTS),-q $(q)) $(QWRAP_ARGS)

awq: venv envs backend-envs ## make awq MODEL=... OUT=...
	@test -n "$(MODEL)" || { echo "usage: make awq MODEL=<folder or org/name> [OUT=...]"; exit 2; }
	$(QWRAP) run "$(MODEL)" -o "$(OUT)" --format awq $(QWRAP_ARGS)

gptq: venv envs backend-envs ## make gptq MODEL=... OUT=...
	@test -n "$(MODEL)" || { echo "usage: make gptq MODEL=<folder or org/name> [OUT=...]"; exit 2; }
	$(QWRAP) run "$(MODEL)" -o "$(OUT)" --format gptq $(QWRAP_ARGS)

all-formats: setup ## make all-formats MODEL=... (GGUF + AWQ + GPTQ in one run)
	@test -n "$(MODEL)" || { echo "usage: make all-formats MODEL=<folder or org/name> [OUT=...]"; exit 2; }
	$(QWRAP) run "$(MODEL)" -o "$(OUT)" --format gguf --format awq --format gptq $(foreach q,$(QUANTS),-q $(q)) $(QWRAP_ARGS)

bench: setup ## Benchmarks; results in bench/results/
	$(PY) bench/gguf_overhead.py
	$(PY) bench/resume.py
	$(PY) bench/backends_overhead.py
	$(PY) bench/dag_gguf.py
	$(PY) bench/scaling.py $(SCALING_ARGS)
	$(PY) bench/help_time.py
	$(PY) bench/eval_share.py
	$(PY) bench/budget_search.py
	$(PY) bench/soak.py

lint: venv ## ruff + mypy
	$(VENV)/bin/ruff check wrapper tests
	$(VENV)/bin/mypy

wheel: venv ## The qwrap wheel (python -m build) in dist/
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean: ## Remove local outputs (not the cache)
	rm -rf $(DEMO) $(OUT) .pytest_cache build dist
