# make demo / make test install what is missing (idempotent), then run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := bubblewrap libseccomp2 python3 util-linux procps iproute2 curl openssl gcc
# only for the tests: they start a throwaway PostgreSQL server and OCI registries of their own
# on loopback (tests/support; the registry package's own config is never used)
TEST_APT_PACKAGES := postgresql docker-registry apache2-utils busybox-static socat

.PHONY: setup system test-system venv demo test lint unit containment bench clean

setup: system venv

# install the packages of $(1) that are missing
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

system:
	$(call apt_install,$(APT_PACKAGES))

test-system:
	$(call apt_install,$(TEST_APT_PACKAGES))

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c 'import stockade, pyseccomp, sqlalchemy, alembic, pydantic, psycopg, psycopg_pool'
	@touch $@

venv: $(VENV)/.installed
	@$(PY) -m compileall -q src >/dev/null

demo: setup
	@echo "== stockade doctor"; $(VENV)/bin/stockade doctor
	@echo; echo "== stockade run examples/demo/job.yaml"
	$(VENV)/bin/stockade run examples/demo/job.yaml --workspace examples/demo
	@echo; echo "== stockade jobs"; $(VENV)/bin/stockade jobs --limit 5

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup test-system lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

unit: venv test-system
	$(VENV)/bin/pytest -q tests/unit

containment: setup
	$(VENV)/bin/pytest -q tests/containment

bench: setup test-system
	@command -v podman >/dev/null || (apt-get install -y -qq podman runc busybox-static >/dev/null)
	@test -x /usr/sbin/squid || (apt-get install -y -qq squid >/dev/null)
	$(PY) benchmarks/job_start.py
	$(PY) benchmarks/egress.py
	$(PY) benchmarks/masking.py
	$(PY) benchmarks/dispatch.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
