# The two commands a new user needs: `make run` and `make test` (both set themselves up).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export CLD_DATA_DIR ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(CLD_DATA_DIR)/dagster_home
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: setup run test bench docs clean-data

setup: $(VENV)/.installed

# Reinstall only when the dependency pins change; constraints.txt pins every transitive package.
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

# Dagster UI and daemon on http://127.0.0.1:3000; generates a small national quarter on first run.
run: setup
	@mkdir -p "$(CLD_DATA_DIR)/landing"
	@$(BIN)/cld-pipeline instance --refresh >/dev/null
	@if [ -z "$$(find "$(CLD_DATA_DIR)/landing" "$(CLD_DATA_DIR)/archive" -maxdepth 1 -type f -print -quit 2>/dev/null)" ]; then \
		echo "nothing received yet: generating a small synthetic national quarter into landing/"; \
		$(BIN)/cld-pipeline generate --scale small; \
	fi
	umask 077 && $(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)   # Dagster's storage owner-only too

test: setup
	$(BIN)/python -m pytest

# Heavy: generates 100k / 1M / 8M-row collections under bench/work/ and runs them, then times
# median-sized national files from landing to pseudonymised with the daemon (about an hour).
BENCH_ARGS ?= --latency
bench: setup
	$(BIN)/cld-pipeline bench $(BENCH_ARGS)

docs: setup
	$(BIN)/cld-pipeline spec-docs
