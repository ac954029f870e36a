# FastFlow research harness. `make sweep` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true

CATEGORY ?=
MVTEC_ROOT ?= data
TRIALS ?=
WORKERS ?= 1
SPACE ?=
CONFIG ?= experiments/demo.yaml
PORT ?= 5000
DASHBOARD_PORT ?= 8080
BACKBONE ?= resnet18
CATEGORIES ?=

.PHONY: install train sweep promote test test-all test-distributed chaos ui dashboard data paper benchmark clean

install: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

train: install
	$(BIN)/fastflow train --config $(CONFIG) $(if $(CATEGORY),--set data.category=$(CATEGORY) --set data.root=$(MVTEC_ROOT))

# No CATEGORY: the offline demo (sweeps/demo.yaml, synthetic category). With CATEGORY: the paper's backbones
# (sweeps/default.yaml), or sweeps/offline.yaml with a one-line notice where their ImageNet weights cannot be
# loaded; SPACE=... names a space (an explicit space whose weights cannot be loaded stops in one line).
sweep: install
	$(BIN)/fastflow sweep $(if $(CATEGORY),--category $(CATEGORY) --root $(MVTEC_ROOT)) \
		$(if $(SPACE),--space $(SPACE)) $(if $(TRIALS),--trials $(TRIALS)) --workers $(WORKERS)

promote: install
	$(BIN)/fastflow promote --category $(or $(CATEGORY),synthetic)

test: install
	$(BIN)/python -m pytest -q --durations=10

test-all: install
	$(BIN)/python -m pytest -q -m ""

# Two `fastflow sweep` workers on one study through PostgreSQL (Optuna) and `mlflow server` (PostgreSQL
# backend, proxied artifacts), all on 127.0.0.1 in a temp dir; ~3-4 min on 2 CPU cores, not part of `make test`.
test-distributed: install
	bash scripts/distributed_test.sh

# Fault injection: SIGINT/SIGTERM/SIGKILL at random points of train, sweep (1 and 2 workers) and racing
# promoters, a tracking-server outage and a full disk, each followed by a re-run and an invariant check
# (scripts/chaos.py); MINUTES=15 by default, every kind at least once.
chaos: install
	nice -n 10 $(BIN)/python scripts/chaos.py $(if $(MINUTES),--minutes $(MINUTES))

ui: install
	$(BIN)/fastflow ui --port $(PORT)

dashboard: install
	$(BIN)/optuna-dashboard --host 127.0.0.1 --port $(DASHBOARD_PORT) $${OPTUNA_STORAGE:-sqlite:///mlruns/optuna.db}

# `make paper BACKBONE=resnet18 [CATEGORIES="bottle screw"] [TRIALS=N] [MVTEC_ROOT=...] [SET="train.epochs=100"]`:
# one run (or an N-trial sweep) per category with experiments/$(BACKBONE).yaml, skipping categories already done,
# then reports/paper_gap.{md,html,png}. Re-run the same command to resume.
paper: install
	$(BIN)/fastflow paper --backbone $(BACKBONE) --root $(MVTEC_ROOT) $(if $(CATEGORIES),--categories $(CATEGORIES)) \
		$(if $(TRIALS),--trials $(TRIALS) --workers $(WORKERS)) $(foreach s,$(SET),--set $(s))

.PHONY: report
report: install
	$(BIN)/fastflow report

data: install
	$(BIN)/fastflow download mvtec --root $(MVTEC_ROOT)

clean:
	rm -rf .cache reports outputs .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

# Speed of the backbone-feature cache on ../shared/data/mvtec3d_tire (see benchmarks/README.md).
# QUICK=1: a few minutes; COMPARE=1: also anomalib 2.7.0's FastFlow, installed on first use into
# benchmarks/.venv-anomalib (never a dependency of the project). Extra flags: BENCHMARK_ARGS="--presets resnet18".
benchmark: install
	nice -n 10 $(BIN)/python benchmarks/benchmark.py $(if $(QUICK),--quick) $(if $(COMPARE),--compare-anomalib) \
		$(BENCHMARK_ARGS)
