# make demo / make test install what is missing (idempotent), then run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := bubblewrap libseccomp2 python3 util-linux procps iproute2 curl openssl gcc \
	mmdebstrap apt-utils docker-registry
# a local Debian package mirror for images (make demo's image, the image tests): fetched once
# from the host's mirror by mmdebstrap, then served from disk (copy://), never the network
DEBS := .cache/debs
DEB_SUITE := $(shell . /etc/os-release && echo $$VERSION_CODENAME)
DEB_PACKAGES := python3,ca-certificates,usr-is-merged,busybox-static
# only for the tests: they start a throwaway PostgreSQL server and OCI registries of their own
# on loopback (tests/support; the registry package's own config is never used), and run the
# red-team corpus on the oci backend (runc) too
TEST_APT_PACKAGES := postgresql apache2-utils busybox-static socat runc

.PHONY: setup system test-system venv debs demo test lint unit containment bench clean FORCE

setup: system venv debs

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

debs: $(DEBS)/Release

# rewritten only when the suite or the package list changes: then the mirror is fetched again
.cache/debs.want: FORCE
	@mkdir -p .cache; want="$(DEB_SUITE) $(DEB_PACKAGES)"; \
	  echo "$$want" | cmp -s - $@ || echo "$$want" > $@

$(DEBS)/Release: .cache/debs.want
	@echo "fetching the Debian packages images are built from (once, into $(DEBS))"
	@rm -rf $(DEBS).tmp && mkdir -p $(DEBS).tmp
	@mmdebstrap --quiet --variant=essential --include=$(DEB_PACKAGES) --skip=download/empty \
	  --skip=essential/unlink --customize-hook='sync-out /var/cache/apt/archives $(abspath $(DEBS)).tmp' \
	  $(DEB_SUITE) /dev/null
	@cd $(DEBS).tmp && rm -rf lock partial && apt-ftparchive packages . > Packages 2>/dev/null && \
	  apt-ftparchive -o APT::FTPArchive::Release::Suite=$(DEB_SUITE) \
	  -o APT::FTPArchive::Release::Codename=$(DEB_SUITE) release . > Release
	@rm -rf $(DEBS) && mv $(DEBS).tmp $(DEBS)

demo: setup
	@echo "== stockade doctor"; $(VENV)/bin/stockade doctor
	@echo; echo "== stockade run examples/demo/job.yaml"
	$(VENV)/bin/stockade run examples/demo/job.yaml --workspace examples/demo
	@echo; examples/demo/image-demo.sh
	@echo; echo "== stockade jobs"; $(VENV)/bin/stockade jobs --limit 5

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# two workers, a test file each at a time: most tests wait on real processes (jobs, servers,
# registries), and every test looks only at what is its own, so files run side by side
test: setup test-system lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

unit: venv test-system
	$(VENV)/bin/pytest -q tests/unit

containment: setup
	$(VENV)/bin/pytest -q tests/containment

bench: setup test-system
	@command -v podman >/dev/null || (apt-get install -y -qq podman runc busybox-static >/dev/null)
	@command -v umoci >/dev/null || (apt-get install -y -qq skopeo umoci >/dev/null)
	@test -x /usr/sbin/squid || (apt-get install -y -qq squid >/dev/null)
	$(PY) benchmarks/job_start.py
	$(PY) benchmarks/egress.py
	$(PY) benchmarks/masking.py
	$(PY) benchmarks/dispatch.py
	$(PY) benchmarks/images.py
	$(PY) benchmarks/image_scan.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
