# Switchyard: `make run` starts everything with a demo, `make test` runs every test,
# `make bench` measures it (docs/performance.md).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

.PHONY: run test load chaos test-scale test-unit test-browser lint format services chromium venv venv-dev migrate seed clean

# Three sets, each with its stamp: the runtime (requirements.txt: what `make run` serves,
# schedules and works with), tests, lint and browser tools on top of it (requirements-dev.txt),
# and what only the benchmark needs (requirements-bench.txt).
$(VENV)/.installed: requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

venv: $(VENV)/.installed

venv-dev: $(VENV)/.installed-dev

services:
	@scripts/ensure_services.sh

# The settings fail closed (DEBUG off, SECRET_KEY required); a local run is development: DEBUG
# on, with the public development key unless SECRET_KEY is set (docs/security.md).
migrate seed run: export DEBUG ?= true

migrate: venv services
	@$(PY) scripts/ensure_database.py
	$(PY) manage.py migrate --noinput

seed: migrate
	$(PY) manage.py seed_demo | tee .demo-credentials

run: seed
	@scripts/run.sh

# Most integration tests wait on the processes they start: three at a time keep 2 cores busy.
test: venv-dev services chromium
	$(PY) -m pytest tests/unit -q -n 2
	$(PY) -m pytest tests/integration tests/browser tests/security -q -n 3 -m "not serial" --durations=10
	$(PY) -m pytest tests/integration tests/reliability -q -m serial

# The load test: 500 clients submitting and streaming for 2 minutes; no 5xx, no lost run.
load: venv-dev services
	SWITCHYARD_LOAD_CLIENTS=500 SWITCHYARD_LOAD_SECONDS=120 $(PY) -m pytest tests/reliability/test_load.py -q -s

# Headless Chromium (Debian's package) driving the inbox; screenshots in tests/browser/artifacts/.
test-browser: venv-dev services chromium
	$(PY) -m pytest tests/browser -q

# The operators' runs list with 1,000,000 runs, each filter timed and printed.
test-scale: venv-dev services
	$(PY) -m pytest tests/scale -q -s

chromium:
	@scripts/ensure_chromium.sh

# Faults under load against private PostgreSQL, RabbitMQ and Redis, then every invariant
# (docs/reliability.md); ≤ 10 min. Report in reliability/results/.
chaos: venv-dev
	$(PY) -m tests.reliability.chaos --profile full

test-unit: venv-dev
	$(PY) -m pytest tests/unit -q -n 2

# The benchmark: ≤ 10 min; QUICK=1 runs every scenario smaller (≤ 2 min).
# BENCH_ARGS passes more options, e.g. BENCH_ARGS="--only s3,s4 --profile".
# requirements-bench.txt: what only the bench needs (gunicorn and DBOS Transact for the
# baselines, matplotlib for the charts); it runs no test tool (tests/support is plain Python).
$(VENV)/.installed-bench: requirements-bench.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	@touch $@

bench: venv services $(VENV)/.installed-bench
	$(PY) -m bench.run $(if $(QUICK),--quick) $(BENCH_ARGS)

lint: venv-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .staticfiles .demo-credentials
