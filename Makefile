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

# The port `make run` listens on.
PORT ?= 8001

DEV_ENV := SSE_APP_ENV=dev SSE_CERTS_DIR=$(CERTS_DIR) SSE_PORT=$(PORT) \
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

DEMO_URLS := echo "demo stream: curl -N --cacert $(CERTS_DIR)/ca.pem \
https://localhost:$(PORT)/subscribe/$(DEMO_TOPIC)/$(DEMO_USERID)/$(DEMO_TOKEN)"; \
echo "demo page:   https://localhost:$(PORT)/demo?topic=$(DEMO_TOPIC)&userid=$(DEMO_USERID)&token=$(DEMO_TOKEN)"

# The demo URLs come once the server consumes, below its start-up log. Ctrl-C is a
# deliberate stop and ends with status 0: with job control (set -m) the terminal sends it to
# the server's pipeline alone, not to make (which would die of it); the server stops and
# re-raises it, and its subshell turns that (130, or 143 for SIGTERM) into 0. The log reader
# ignores the signals, so that it reads the server's last lines.
.PHONY: run
run: certs db ## Run the server on https://localhost:8001 against the local PostgreSQL and RabbitMQ
	@set -m -o pipefail; \
	(trap true INT TERM; $(DEV_ENV) $(BIN)/twistd -n --pidfile= sse-server; status=$$?; \
		[ $$status -eq 130 ] || [ $$status -eq 143 ] || exit $$status) | \
	(trap '' INT TERM; shown=; while IFS= read -r line; do \
		printf '%s\n' "$$line"; \
		case "$$shown$$line" in *'"message": "consuming '*) $(DEMO_URLS); shown=1;; esac; \
	done)

.PHONY: publish
publish: venv ## Publish a foundcontract message for the demo user (USERID=... to change)
	$(BIN)/python -m sse_twisted.publish --userid $(or $(USERID),$(DEMO_USERID))

.PHONY: adduser
adduser: ## Add a random user to the local PostgreSQL (STACK=1: the stack's) and print its URL
	@set -- $$($(PYTHON) -c 'import uuid; print(*(uuid.uuid4() for _ in range(3)))'); \
	$(if $(STACK),$(STACK_PSQL),$(PSQL)) \
		-c "INSERT INTO users (uuid, sse_token) VALUES ('$$2', '$$3')" && \
	echo "https://localhost:8001/subscribe/$$1/$$2/$$3"

# The compose stack (docker-compose.yml): prod mode, TLS on every link, certificates from
# ./certs, passwords from ./secrets.
COMPOSE ?= docker compose
STACK_PSQL := $(COMPOSE) exec -T postgres psql -X -q -v ON_ERROR_STOP=1 -U postgres -d sse
SECRETS_DIR ?= secrets
STACK_SECRETS := postgres_password postgres_sse_password rabbitmq_sse_password rabbitmq_admin_password

.PHONY: secrets
secrets: ## Create a random password file for each secret of the stack in ./secrets (never overwrites)
	@install -d -m 0700 $(SECRETS_DIR)
	@# 0644 inside a 0700 directory: compose bind-mounts each file with its own mode, and the
	@# containers' users (postgres, sse) must read it; other host users cannot reach it.
	@for name in $(STACK_SECRETS); do \
		if [ ! -e $(SECRETS_DIR)/$$name ]; then \
			$(PYTHON) -I -c 'import secrets; print(secrets.token_urlsafe(24))' > $(SECRETS_DIR)/$$name && \
			chmod 0644 $(SECRETS_DIR)/$$name && echo "created $(SECRETS_DIR)/$$name"; \
		fi; \
	done

.PHONY: up
up: certs secrets ## Build and start the TLS stack (sse, RabbitMQ, PostgreSQL) with docker compose
	$(COMPOSE) up --detach --build
	@echo "health:      $(COMPOSE) ps (starting takes about a minute)"
	@echo "a user:      make adduser STACK=1 (prints its subscribe URL; trust $(CERTS_DIR)/ca.pem)"
	@echo "RabbitMQ UI: http://localhost:15672 (user admin, password in $(SECRETS_DIR)/rabbitmq_admin_password)"
	@echo "metrics:     make metrics"

.PHONY: metrics
metrics: ## Print the stack server's Prometheus metrics (they listen inside its container only)
	@$(COMPOSE) exec -T sse python -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode(), end='')"

.PHONY: down
down: ## Stop the stack (data volumes stay; docker compose down -v deletes them)
	$(COMPOSE) down

.PHONY: logs
logs: ## Follow the stack's logs
	$(COMPOSE) logs --follow --tail=100

.PHONY: test
test: venv ## Run the test suite (needs the local PostgreSQL and RabbitMQ)
	$(BIN)/pytest

# Benchmarks of issues 5 and 11 (bench/RESULTS.md), not part of `make test`: every scenario
# against sse-twisted, then against the reference server (bench/reference/). One pass by default
# (about 9 minutes here); BENCH_RUNS=3 gives medians. BENCH_ARGS takes more options
# (python -m bench --help), e.g. --commit HEAD, --servers sse-twisted, --no-profile.
BENCH_RUNS ?= 1
BENCH_ARGS ?=

.PHONY: bench
bench: venv ## Run the benchmark suite (one pass; BENCH_RUNS=3 for medians)
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench --runs $(BENCH_RUNS) $(BENCH_ARGS)

# Soak (issue 6), not part of `make test`: connects and disconnects against a real twistd for
# SOAK_SECONDS, reporting the server's RSS and open descriptors at the start, peak and end.
SOAK_SECONDS ?= 180

.PHONY: soak
soak: venv ## Soak: thousands of connects/disconnects; RSS and fds at start, peak, end
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS)

.PHONY: lint
lint: venv ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

.PHONY: clean
clean: ## Remove the virtualenv and caches (keeps certs/)
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
