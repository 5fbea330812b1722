# Common commands. `make help` lists them.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Stages run as `python stages/<name>.py`: put the venv first so DVC finds the project's Python.
export PATH := $(BIN):$(PATH)
# `make serve`: the registered model the pipeline's export stage made under params.yaml (tracking.model_name, else
# <data set>-classifier, <folder>-classifier for your own images), computed when used; MODEL=name for another.
MODEL ?= $(shell $(BIN)/python -c 'from image_classifier import params, tracking; print(tracking.registered_name(params.load()))')
PORT ?= 5000
SERVE_PORT ?= 5001
STORE := sqlite:///$(CURDIR)/mlruns/mlflow.db
# `make serve` takes the model from the MLFLOW_TRACKING_URI environment variable (a team server) when set.
SERVE_STORE = $(or $(MLFLOW_TRACKING_URI),$(STORE))
# `make team-server`: the team's MLflow server (src/image_classifier/team_server.py). Its own files go in
# TEAM_STORE; runs in TEAM_DB (postgresql://user@host:port/db for a team; the password in PGPASSWORD or ~/.pgpass),
# artifacts in TEAM_ARTIFACTS (s3://bucket/prefix: keys in AWS_*, endpoint in MLFLOW_S3_ENDPOINT_URL). It listens on
# 127.0.0.1; TEAM_HOST=0.0.0.0 TEAM_ALLOWED_HOSTS=name[:port],... open it to the network, which needs TEAM_LOGIN=1
# (users and permissions; the admin's password in MLFLOW_AUTH_ADMIN_PASSWORD; users in TEAM_AUTH_DB).
TEAM_STORE ?= $(HOME)/mlflow-team
TEAM_DB ?= sqlite:///$(abspath $(TEAM_STORE))/mlflow.db
TEAM_ARTIFACTS ?= $(abspath $(TEAM_STORE))/artifacts
TEAM_HOST ?= 127.0.0.1
TEAM_ALLOWED_HOSTS ?=
# `make tune`: how many trials this run adds to which study.
TRIALS ?= 20
STUDY ?= default
# An Optuna storage URL shared by several processes or machines ("" = mlruns/optuna.db); postgresql:// needs the
# `team` extra (PostgreSQL's driver), which the target then installs.
STORAGE ?=
# `make pretrained`: the timm architectures whose published weights to download into the cache.
ARCH ?= timm:resnet18
TEAM_LOGIN ?=
TEAM_AUTH_DB ?=
# `make example-folder`: where the example image folder goes and how many images it gets.
EXAMPLE_DEST ?= data/images
EXAMPLE_COUNT ?= 300

.DEFAULT_GOAL := help
.PHONY: help setup setup-bench setup-team setup-test repro test test-fast lint format bench bench-predict bench-timm ui team-server serve predict example-folder tune pretrained docs clean

help: ## List the common commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: ## Install system packages (Debian, as root) and the venv for the pipeline
	@scripts/setup.sh pipeline

setup-test: ## Install everything the tests need as well (Chromium, pytest, ruff)
	@scripts/setup.sh test

repro: setup ## Set up, then run the whole pipeline (dvc repro)
	dvc repro

test: setup-test ## Set up, then run the whole test suite, slow tests included
	pytest

test-fast: setup-test ## Run the tests not marked slow
	pytest -m "not slow"

lint: setup-test ## Check style with ruff
	ruff check . && ruff format --check .

format: setup-test ## Reformat the code with ruff
	ruff format . && ruff check --fix .

bench: setup-bench ## Measure speed against the PyTorch quickstart, predict's throughput, fine-tuning; markdown tables
	python benchmarks/bench.py
	python benchmarks/bench_predict.py
	python benchmarks/bench_finetune.py

setup-bench: ## Install what `make bench` needs as well (real ImageNet weights for the fine-tuning rows)
	@scripts/setup.sh bench

bench-predict: setup ## predict's images per second: PyTorch against ONNX Runtime, decoding apart and included
	python benchmarks/bench_predict.py

bench-timm: setup ## timm:resnet18: our loop against timm's train.py (TIMM_TRAIN=path/to/train.py), a fine-tune
	python benchmarks/bench_timm.py $(if $(TIMM_TRAIN),--timm-train $(TIMM_TRAIN))

ui: setup ## MLflow UI over the local store on http://127.0.0.1:5000 (PORT=...)
	@mkdir -p mlruns/artifacts
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 --port $(PORT) --workers 1 \
	  --backend-store-uri $(STORE) --artifacts-destination $(CURDIR)/mlruns/artifacts

setup-team: ## Install what the team server needs as well (logins, PostgreSQL's driver)
	@scripts/setup.sh team

team-server: setup-team ## Shared MLflow server for teammates on http://127.0.0.1:5000 (TEAM_DB=, TEAM_ARTIFACTS=, TEAM_LOGIN=1)
	python -m image_classifier.team_server --host $(TEAM_HOST) --port $(PORT) --backend-store-uri $(TEAM_DB) \
	  --artifacts-destination $(TEAM_ARTIFACTS) --folder $(abspath $(TEAM_STORE))$(if $(TEAM_ALLOWED_HOSTS), --allowed-hosts $(TEAM_ALLOWED_HOSTS))$(if $(TEAM_LOGIN), --login)$(if $(TEAM_AUTH_DB), --auth-db $(TEAM_AUTH_DB))

serve: setup ## Serve the champion of the model params.yaml registers over REST on http://127.0.0.1:5001/invocations (MODEL=, SERVE_PORT=)
	MLFLOW_TRACKING_URI=$(SERVE_STORE) mlflow models serve -m "models:/$(MODEL)@champion" --env-manager local \
	  --host 127.0.0.1 --port $(SERVE_PORT)

predict: setup ## Classify the first test images with the trained model (predict --help for more)
	predict --index 0 1 2 3 4

example-folder: setup ## Real example images: Fashion-MNIST PNGs in data/images/<class>/ (EXAMPLE_COUNT=300)
	python scripts/make_example_folder.py --dest $(EXAMPLE_DEST) --count $(EXAMPLE_COUNT)

tune: $(if $(filter postgresql%,$(STORAGE)),setup-team,setup) ## Hyperparameter search over tune.yaml (TRIALS=20 STUDY=default STORAGE=); prints the winner's dvc exp run
	tune --trials $(TRIALS) --study $(STUDY)$(if $(STORAGE), --storage $(STORAGE))

pretrained: setup ## Download timm weights into ~/.cache/image-classifier (ARCH="timm:resnet18 timm:convnext_nano")
	python scripts/fetch_pretrained.py $(ARCH)

docs: setup-test ## Regenerate docs/params.md and docs/errors.md (from params.py, params.yaml, tests/test_faults.py)
	python scripts/make_docs_reference.py

clean: ## Remove pipeline outputs from the workspace (the DVC cache and mlruns/ stay)
	rm -rf data/processed data/raw data/resume models reports/*/*.png
