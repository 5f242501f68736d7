# Two entry points: `make run` (server on embedded defaults, with the reference
# data-source backend) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install lock js deps-test lint bench bench-peers bench-compare clean

# Installs the versions pinned in requirements.lock (the ones the tests ran with);
# -qq shows errors only (setuptools prints a notice on every editable install).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -qq -c requirements.lock -e '.[dev]'
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

# The client package (js/sdk): its runtime deps plus what its checks use
# (typescript, eslint, esbuild, react for the README example), from its own lockfile.
js/sdk/node_modules/.package-lock.json: js/sdk/package-lock.json
	cd js/sdk && npm ci --no-audit --no-fund --loglevel=error

js: js/node_modules/.package-lock.json js/sdk/node_modules/.package-lock.json

# What the tests run besides Python: redis-server, nginx (they start their own
# instances on free loopback ports), node + npm (stock Yjs clients), chromium
# (browser tests, driven by playwright-core). Missing Debian packages are
# installed with apt-get: as root directly, otherwise through sudo when there is
# one; without either, this says exactly what to install and stops.
NODE_MIN_MAJOR := 20
PROMTOOL := $(VENV)/tools/promtool

deps-test:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	  else echo "make test needs these Debian packages:$$missing"; \
	       echo "install them as root (apt-get install -y$$missing), then run make test again"; exit 1; fi; \
	  echo "installing$$missing with $${sudo:-apt-get as root} (the tests start their own instances)"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@major=$$(node -p 'process.versions.node.split(".")[0]'); \
	if [ "$$major" -lt $(NODE_MIN_MAJOR) ]; then \
	  echo "the stock Yjs client tests need Node.js $(NODE_MIN_MAJOR) or newer; this node is $$(node --version)"; exit 1; fi

# promtool (checks deploy/prometheus/alerts.yml) taken out of Debian's prometheus
# package without installing it: no daemon, no root needed.
$(PROMTOOL):
	@mkdir -p $(VENV)/tools
	@cd $(VENV)/tools && if apt-get download prometheus >/dev/null 2>&1; then \
	  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > promtool.part && chmod +x promtool.part \
	  && mv promtool.part promtool; rm -f prometheus_*.deb promtool.part; \
	else echo "note: no Debian prometheus package here: the promtool check is skipped (the rules' structure is still tested)"; fi

BACKEND_PORT ?= 8766

# The reference data-source backend runs in the background (SQLite in ./data) and
# stops when the collaboration server exits; changes are forwarded to it, and its
# change hook tells the server about changes made through its own API
# (curl -X PATCH localhost:8766/data-sources/ds-demo -d '{"description": "from the backend"}').
SERVER_PORT ?= 8765
run: $(STAMP)
	@mkdir -p data
	@$(BIN)/collab-refbackend --port $(BACKEND_PORT) --db data/refbackend.sqlite3 \
	  --notify-url http://127.0.0.1:$${COLLAB_PORT:-$(SERVER_PORT)} & backend=$$!; \
	trap 'kill $$backend 2>/dev/null; wait $$backend 2>/dev/null' EXIT INT TERM; \
	COLLAB_PORT=$${COLLAB_PORT:-$(SERVER_PORT)} \
	COLLAB_BACKEND_URL=$${COLLAB_BACKEND_URL:-http://127.0.0.1:$(BACKEND_PORT)} $(BIN)/collab serve

test: $(STAMP) deps-test js $(PROMTOOL)
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
	rm -rf $(VENV) js/node_modules js/sdk/node_modules loadtest/peers/node_modules data
