# gansteer: `make demo` and `make test` are the two commands a fresh machine needs (see README.md).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup browser demo test lint format protos zoo zoo-eval up generation scoring optimization worker web images load stress clean

$(INSTALLED): services/pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: this CPU build lies on disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e 'clients/python[dev]' -e 'services[dev]'
	touch $(INSTALLED)

setup: $(INSTALLED)

demo: setup
	$(BIN)/python -m gansteer_server.demo --out out/demo

# The rounds page's browser test (tests/test_web_rounds.py) drives Debian's chromium through its chromedriver.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)

test: setup lint browser
	$(BIN)/python protos/generate.py --check
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd clients/python && ../../$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: setup
	$(BIN)/python protos/generate.py

# Reproduce the built-in model zoo from scratch (classifiers in minutes, the generator up to ~150 min on 2 cores;
# it resumes from zoo-work/ if stopped), then register everything, with the generator's early training snapshots
# (scenes-gen-step<N>), under services/gansteer_server/zoo/registry. zoo-eval measures a registered generator once
# and reads its figures back from its card afterwards (python -m gansteer_server.zoo.evaluate --remeasure redoes it).
zoo: setup
	$(BIN)/python -m gansteer_server.zoo.build

zoo-eval: setup
	$(BIN)/python -m gansteer_server.zoo.evaluate

# The processes of a deployment, one per terminal (settings from GANSTEER_* variables; see README.md), or all of
# them at once with `make up`.
up: setup
	$(BIN)/gansteer up

generation: setup
	$(BIN)/gansteer-generation

scoring: setup
	$(BIN)/gansteer-scoring

optimization: setup
	$(BIN)/gansteer-optimization

worker: setup
	$(BIN)/gansteer-worker

web: setup
	$(BIN)/gansteer-web

# The container images (deploy/docker/): gansteer:$(IMAGE_TAG) for CPUs and gansteer-gpu:$(IMAGE_TAG) for NVIDIA GPUs,
# the tags docker-compose.yml and deploy/k8s name. Needs a running Docker engine (BuildKit).
IMAGE_TAG := 0.1.0

images:
	@docker info >/dev/null 2>&1 || { echo "make images: no Docker engine answers here ('docker info' failed), so no image was built; run it where one runs (docs/deploy.md)" >&2; exit 1; }
	docker build -f deploy/docker/Dockerfile -t gansteer:$(IMAGE_TAG) .
	docker build -f deploy/docker/Dockerfile.gpu -t gansteer-gpu:$(IMAGE_TAG) .

# Load test (deploy/locust, docs/operations.md "Load tests"): a `gansteer up` stack on free ports with its own
# redis-server, locust headless against it for DURATION, then out/load/ (locust's CSV, report.html, summary.json) and
# a table; fails on any failed request or job. LOAD_REDIS_URL=redis://host:port/N: a Redis database of the run's own.
USERS ?= 50
SPAWN_RATE ?= 10
DURATION ?= 3m
TORCH_THREADS ?= 1

load: setup
	$(BIN)/python deploy/locust/load.py --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--torch-threads $(TORCH_THREADS) --out out/load $(if $(LOAD_REDIS_URL),--redis-url $(LOAD_REDIS_URL))

# `make test` three times in a row beside two busy processes (both cores here busy): tests must wait on events.
stress: setup
	$(BIN)/python bench/stress.py --runs 3 --busy 2 -- $(MAKE) test

clean:
	rm -rf $(VENV) out var
