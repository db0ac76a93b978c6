# Everyday commands. Override PYTHON to use another interpreter (default: the project's .venv).
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
BIN ?= $(if $(wildcard .venv/bin/python),.venv/bin/,)
STUDY ?= quickstart
WORKERS ?= 1
STORAGE ?= studies-storage/$(STUDY).journal
TORCH_VERSION ?= 2.13.0

.PHONY: setup quickstart test lint sweep leaderboard ui dashboard bench synth clean reproduce

## Create .venv with the CPU build of torch and the project in editable mode
setup:
	test -d .venv || python3 -m venv .venv
	.venv/bin/python -m pip install --upgrade pip
	.venv/bin/python -m pip install "torch==$(TORCH_VERSION)"
	.venv/bin/python -m pip install -e ".[dev]"

## Set up, then run the main job on the built-in default (synthetic data, weight-free backbone)
quickstart: setup
	$(MAKE) sweep STUDY=quickstart

synth:
	$(PYTHON) -m harness.cli data synth --out data/synth

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

sweep:
	$(PYTHON) -m harness.cli sweep studies/$(STUDY).yaml --workers $(WORKERS)

leaderboard:
	$(PYTHON) -m harness.cli leaderboard $(if $(filter command line,$(origin STUDY)),--study $(STUDY),)

ui:
	$(PYTHON) -m mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

## optuna-dashboard: every study under studies-storage/ (a snapshot), or one study live with STUDY=name
dashboard:
ifneq ($(filter command line,$(origin STUDY) $(origin STORAGE)),)
	$(BIN)optuna-dashboard --host 127.0.0.1 --port 8080 \
		$(if $(findstring ://,$(STORAGE)),,--storage-class JournalFileStorage) $(STORAGE)
else
	$(PYTHON) -m harness.study dashboard --storage-dir studies-storage --host 127.0.0.1 --port 8080
endif

bench:
	$(PYTHON) -m harness.cli bench all

## Run one published system with its released settings: make reproduce SYSTEM=paper-adm [DATASET=data/DAVIS]
reproduce:
	$(PYTHON) -m harness.cli reproduce $(if $(SYSTEM),$(SYSTEM),--list) $(if $(DATASET),--dataset $(DATASET),)

clean:
	rm -rf runs cache .pytest_cache
