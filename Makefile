# Two commands a newcomer runs on a fresh Debian/Ubuntu machine (as root, with Python and make):
#   make demo   start the sandbox fleet and converge it with gpufleet
#   make test   unit tests, then the sandbox end-to-end tests; leaves nothing running
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(CURDIR)/$(VENV)/bin
APT_PACKAGES := docker.io debootstrap gnupg openssh-client busybox-static
export PATH := $(BIN):$(PATH)

.PHONY: demo test unit lint system-deps down clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: $(VENV)/.installed system-deps
	$(PY) -m gpufleet.sandbox.engine start
	gpufleet sandbox up
	pyinfra -y inventory/sandbox.py deploys/fleet.py --exclude broken
	gpufleet sandbox services

unit: $(VENV)/.installed
	$(PY) -m pytest -m "not sandbox" -q

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The engine and the sandbox are torn down whatever the tests did; pytest's status is kept.
test: $(VENV)/.installed system-deps
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
