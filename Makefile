# sse-twisted — `make` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CERTS_DIR ?= certs

# The local development backends (plaintext on this machine).
PGHOST ?= 127.0.0.1
PGPORT ?= 5432
PGUSER ?= postgres
PGDATABASE ?= postgres
PSQL := psql -X -q -v ON_ERROR_STOP=1 -h $(PGHOST) -p $(PGPORT) -U $(PGUSER) -d $(PGDATABASE)

# The demo subscriber `make run` creates (v4 UUIDs: topic, user, token).
DEMO_TOPIC ?= 7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94
DEMO_USERID ?= 0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10
DEMO_TOKEN ?= 3c9d2f7e-1b4a-4e8d-a6c5-7f0e2b9d4c31

DEV_ENV := SSE_APP_ENV=dev SSE_CERTS_DIR=$(CERTS_DIR) \
	SSE_RABBITMQ_TLS=false SSE_RABBITMQ_HOST=127.0.0.1 \
	SSE_POSTGRES_SSLMODE=disable SSE_POSTGRES_HOST=$(PGHOST) SSE_POSTGRES_PORT=$(PGPORT) \
	SSE_POSTGRES_USERNAME=$(PGUSER) SSE_POSTGRES_DB_NAME=$(PGDATABASE)

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/twistd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode: a path .pth, so that twistd finds twisted/plugins/ (setuptools #3548).
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $@

.PHONY: venv
venv: $(BIN)/twistd ## Create .venv and install the project with its dev tools

.PHONY: certs
certs: venv ## Create development certificates in ./certs (never overwrites)
	$(BIN)/python -m sse_twisted.devcerts $(CERTS_DIR)

.PHONY: db
db: ## Create the users table and the demo user in the local PostgreSQL (if missing)
	$(PSQL) -f schema/users.sql
	$(PSQL) -c "INSERT INTO users (uuid, sse_token) SELECT '$(DEMO_USERID)', '$(DEMO_TOKEN)' \
		WHERE NOT EXISTS (SELECT 1 FROM users WHERE uuid = '$(DEMO_USERID)' AND sse_token = '$(DEMO_TOKEN)')"

.PHONY: run
run: certs db ## Run the server on https://localhost:8001 against the local PostgreSQL and RabbitMQ
	@echo "demo stream: curl -N --cacert $(CERTS_DIR)/ca.pem https://localhost:8001/subscribe/$(DEMO_TOPIC)/$(DEMO_USERID)/$(DEMO_TOKEN)"
	$(DEV_ENV) $(BIN)/twistd -n --pidfile= sse-server

.PHONY: publish
publish: venv ## Publish a foundcontract message for the demo user (USERID=... to change)
	$(BIN)/python -m sse_twisted.publish --userid $(or $(USERID),$(DEMO_USERID))

.PHONY: test
test: venv ## Run the test suite (needs the local PostgreSQL and RabbitMQ)
	$(BIN)/pytest

.PHONY: lint
lint: venv ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

.PHONY: clean
clean: ## Remove the virtualenv and caches (keeps certs/)
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
