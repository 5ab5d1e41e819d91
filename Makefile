# Switchyard: `make run` starts everything with a demo, `make test` runs every test.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

.PHONY: run test test-unit test-integration lint format services venv migrate seed clean

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

services:
	@scripts/ensure_services.sh

migrate: venv services
	@$(PY) scripts/ensure_database.py
	$(PY) manage.py migrate --noinput

seed: migrate
	$(PY) manage.py seed_demo | tee .demo-credentials

run: seed
	@scripts/run.sh

test: venv services
	$(PY) -m pytest tests/unit -q -n 2
	$(PY) -m pytest tests/integration -q

test-unit: venv
	$(PY) -m pytest tests/unit -q -n 2

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .staticfiles .demo-credentials
