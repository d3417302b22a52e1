# Two commands on a fresh machine with Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test check lint bench clean browser sim

# `make sim SEEDS=10000 JOBS=2`: the whole-cluster simulation over that many seeds (docs/simulation.md).
SEEDS ?= 200
JOBS ?= 2

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) run_cluster.py --config configuration.txt

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# The dashboard's browser test needs Debian's chromium; CI (root, CI=true) installs it, elsewhere the test
# skips with a loud reason when it is missing.
browser:
	@if [ "$$CI" = "true" ] && ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
			>/dev/null 2>&1 || echo "!!! could not install chromium: the browser test will skip"; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy cluster registry bully node client bench run_cluster.py tests/sim/cluster

# What CI runs (.ci/run): ruff and mypy, then every test.
check: lint test

sim: $(STAMP)
	$(PY) -m tests.sim.cluster run --seeds $(SEEDS) --jobs $(JOBS)

bench: $(STAMP)
	$(PY) -m bench.all

clean:
	rm -rf $(VENV) data
