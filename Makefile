# Two entry points: `make demo` (a real deploy to a disposable local host) and `make test`.
# Everything else here is what those two need. Run as root on Debian/Ubuntu.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SANDBOX_HOSTS ?= 1
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: demo test unit e2e venv system-deps artefacts wheelhouse hf-wheelhouse router-wheelhouse tiny-model rootfs vllm-image down clean

demo: venv system-deps artefacts
	sandbox status >/dev/null 2>&1 || sandbox up $(SANDBOX_HOSTS)
	pyinfra -y inventories/sandbox.py deploy.py
	chat "Summarize Kimi-K2.6 in one sentence."
	@echo
	@echo "Deployed. '. .venv/bin/activate' puts pyinfra, pytest and the commands on PATH;"
	@echo "then 'pyinfra inventories/sandbox.py deploy.py --dry' shows zero changes,"
	@echo "'sandbox status' lists the hosts and 'make down' tears them down."

# The e2e suite first: its first sandbox host boots right after the artefacts are built, on a
# machine as cold as `make demo` finds it (the unit tests in between hid a start-up race).
test: venv system-deps artefacts
	$(BIN)/pytest tests/e2e
	$(BIN)/pytest tests/unit

unit: venv
	$(BIN)/pytest tests/unit

e2e: venv system-deps artefacts
	$(BIN)/pytest tests/e2e

# The lock, then this checkout in editable mode: the packages tasks, tools and harness, and the
# commands of pyproject.toml as console scripts in .venv/bin (on PATH here, and in a shell after
# `. .venv/bin/activate`). Editable, so the commands run this folder's code. Unisolated: the
# build backend is the setuptools the lock pins, so no second download or index is needed.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -qq --disable-pip-version-check --no-build-isolation \
	  --check-build-dependencies --no-deps -e .
	touch $@

# Debian packages the sandbox needs on the controller (idempotent; no-op when present).
system-deps:
	@command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null \
	  && command -v zstd >/dev/null && command -v ssh >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends debootstrap systemd-container zstd openssh-client iproute2 \
	    curl >/dev/null; }

artefacts: wheelhouse hf-wheelhouse router-wheelhouse tiny-model rootfs vllm-image
wheelhouse: venv
	wheelhouse
hf-wheelhouse: venv
	hf-wheelhouse
router-wheelhouse: venv
	router-wheelhouse
tiny-model: venv
	make-tiny-model
rootfs: venv system-deps
	sandbox rootfs >/dev/null
# The docker runtime's image, built offline from the rootfs and the wheelhouse (once per inputs).
vllm-image: wheelhouse rootfs
	vllm-image >/dev/null

# Teardown needs no venv (harness/sandbox.py uses the standard library only), so that a broken
# or deleted venv never leaves hosts running.
down:
	$(PYTHON) -m harness.sandbox down

clean: down
	rm -rf $(VENV) .cache .sandbox
