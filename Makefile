# Two commands a newcomer runs on a fresh Debian/Ubuntu machine (as root, with python3 and make):
#   make demo   start the sandbox fleet and converge it with gpufleet
#   make test   unit tests, then the sandbox end-to-end tests; leaves nothing running
# Both first install what the machine lacks (gpufleet/sandbox/system-deps.sh says what).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: demo test unit lint schemas wheel system-deps down clean fresh-check cuda-build

system-deps:
	@sh gpufleet/sandbox/system-deps.sh

$(VENV)/.installed: pyproject.toml | system-deps
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: system-deps $(VENV)/.installed
	$(PY) -m gpufleet.sandbox.engine start
	gpufleet sandbox up
	pyinfra -y inventory/sandbox.py deploys/fleet.py --exclude broken
	gpufleet sandbox services

unit: $(VENV)/.installed
	$(PY) -m pytest -m "not sandbox" -q

# the JSON Schemas of every --json document (tests/test_cli_convention.py fails when stale)
schemas: $(VENV)/.installed
	$(PY) -m gpufleet.fleet.documents

# an installable wheel in dist/: deploys, facts, templates and group data inside
wheel: $(VENV)/.installed
	$(PY) -m pip wheel --no-deps -w dist .

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The engine and the sandbox are torn down whatever the tests did; pytest's status is kept.
test: system-deps $(VENV)/.installed
	@$(PY) -m gpufleet.sandbox.engine start; \
	status=0; \
	$(PY) -m pytest -q $(PYTEST_ARGS) || status=$$?; \
	gpufleet sandbox down >/dev/null || status=1; \
	$(PY) -m gpufleet.sandbox.engine stop; \
	exit $$status

down: $(VENV)/.installed
	gpufleet sandbox down
	$(PY) -m gpufleet.sandbox.engine stop

clean: down
	rm -rf .sandbox $(VENV)

# Slow, not part of CI: the README's two commands, as written, in a bare Debian container.
fresh-check: $(VENV)/.installed
	$(PY) -m gpufleet.sandbox.engine start
	$(PY) -m gpufleet.sandbox.freshcheck

# Slow, not part of CI: a group's whole CUDA llama.cpp image, every kernel, built against the
# devel base made from this machine's CUDA toolkit (GROUP=spark or rtx5090).
GROUP ?= spark
cuda-build: $(VENV)/.installed
	$(PY) -m gpufleet.sandbox.engine start
	$(PY) -m gpufleet.sandbox.cuda full-build $(GROUP)
