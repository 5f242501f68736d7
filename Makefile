# Two entry points: `make run` (server on embedded defaults, with the reference
# data-source backend) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install lock js deps-test lint bench bench-peers bench-compare clean

# Installs the versions pinned in requirements.lock (the ones the tests ran with).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Re-resolve the dependencies in a fresh venv and pin what it got.
lock:
	rm -rf $(VENV).lock && $(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/python -m pip install --quiet -e '.[dev]'
	{ echo "# The versions \`make run\` and \`make test\` install (pip constraints); the tests ran with these."; \
	  echo "# Regenerate with \`make lock\` after changing dependencies in pyproject.toml."; \
	  $(VENV).lock/bin/python -m pip freeze --exclude-editable; } > requirements.lock
	rm -rf $(VENV).lock

js/node_modules/.package-lock.json: js/package-lock.json
	cd js && npm ci --no-audit --no-fund --loglevel=error

js: js/node_modules/.package-lock.json

# Tests start their own redis-server processes; install the binary if missing.
deps-test:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (tests start their own instances)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v node >/dev/null 2>&1 || { \
	  echo "installing nodejs/npm (stock Yjs client tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium (presence panel browser test, driven by playwright-core)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

BACKEND_PORT ?= 8766

# The reference data-source backend runs in the background (SQLite in ./data) and
# stops when the collaboration server exits; changes are forwarded to it.
run: $(STAMP)
	@mkdir -p data
	@$(BIN)/collab-refbackend --port $(BACKEND_PORT) --db data/refbackend.sqlite3 & backend=$$!; \
	trap 'kill $$backend 2>/dev/null; wait $$backend 2>/dev/null' EXIT INT TERM; \
	COLLAB_BACKEND_URL=$${COLLAB_BACKEND_URL:-http://127.0.0.1:$(BACKEND_PORT)} $(BIN)/collab serve

test: $(STAMP) deps-test js
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Benchmark only (not part of `make test`): our server vs Hocuspocus vs the Yjs reference
# server, each pinned to core 0, the harness on core 1; see docs/benchmarks.md.
loadtest/peers/node_modules/.package-lock.json: loadtest/peers/package-lock.json
	cd loadtest/peers && npm ci --no-audit --no-fund --loglevel=error

bench-peers: loadtest/peers/node_modules/.package-lock.json

BENCH_OUT ?= /tmp/bench-compare
bench-compare: $(STAMP) bench-peers
	$(BIN)/python -m loadtest compare --json $(BENCH_OUT).json --markdown $(BENCH_OUT).md

clean:
	rm -rf $(VENV) js/node_modules loadtest/peers/node_modules data
