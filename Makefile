# The two commands a fresh clone needs: `make chat` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WSTEST := .autobahn/py27/bin/wstest

.PHONY: chat cluster game notes notes-bundle test lint typecheck unit mutants fuzz docs docs-build soak cluster-soak bench bench-quick bench-hibernation bench-admin bench-yjs clean

$(BIN)/rooms: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(BIN)/rooms
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

chat: $(BIN)/rooms  ## serve the example chat on http://127.0.0.1:8000
	$(BIN)/rooms serve examples.chat.app:app --host 127.0.0.1 --port 8000 --data-dir data/chat

# The chat as three nodes (ports 8000-8002) on the local PostgreSQL, database rooms_chat
# (created if missing); CLUSTER_DSN for another server. See docs/cluster.md.
CLUSTER_DSN ?= postgresql://postgres@127.0.0.1:5432/rooms_chat

$(VENV)/.postgres: $(BIN)/rooms
	$(BIN)/python -m pip install -q -e '.[postgres]'
	touch $@

cluster: $(VENV)/.postgres  ## serve the example chat as a 3-node cluster on PostgreSQL
	$(BIN)/python -m examples.chat.cluster --dsn $(CLUSTER_DSN)

game: $(BIN)/rooms  ## serve the example game on http://127.0.0.1:8001
	$(BIN)/rooms serve examples.game.app:app --host 127.0.0.1 --port 8001 --data-dir data/game

$(VENV)/.yjs: $(BIN)/rooms
	$(BIN)/python -m pip install -q -e '.[yjs]'
	touch $@

notes: $(VENV)/.yjs  ## serve the example collaborative notes on http://127.0.0.1:8002
	$(BIN)/rooms serve examples.notes.app:app --host 127.0.0.1 --port 8002 --data-dir data/notes

# The notes page's editor bundle (examples/notes/static/editor.js, kept in the repository so
# that make notes needs no npm): rebuilt from examples/notes/web with the versions it pins.
notes-bundle:
	cd examples/notes/web && npm ci --no-audit --no-fund --silent && npm run build --silent

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# Autobahn|Testsuite (Python 2.7) for tests/system/test_autobahn.py; if it cannot be installed here
# that test is skipped with the reason (and fails under ROOMS_REQUIRE_AUTOBAHN=1, as in CI).
$(WSTEST): tests/system/autobahn/install.sh tests/system/autobahn/requirements-py27.txt
	tests/system/autobahn/install.sh .autobahn || echo "make: no Autobahn|Testsuite; its test will be skipped"

# wscat (npm) for tests/system/test_wscat.py, skipped with the reason if npm is missing.
WSCAT := tests/system/wscat/node_modules/.bin/wscat
$(WSCAT): tests/system/wscat/package.json tests/system/wscat/package-lock.json
	cd tests/system/wscat && npm ci --no-audit --no-fund --silent || echo "make: no wscat; its test will be skipped"

# The standard Yjs clients (y-websocket on Node) for tests/system/test_yjs.py, skipped with the
# reason if npm is missing.
YJS_CLIENTS := tests/system/yjs/node_modules/.package-lock.json
$(YJS_CLIENTS): tests/system/yjs/package.json tests/system/yjs/package-lock.json
	cd tests/system/yjs && npm ci --no-audit --no-fund --silent || echo "make: no y-websocket clients; their test will be skipped"

unit: $(VENV)/.dev $(WSTEST) $(WSCAT) $(YJS_CLIENTS)
	$(BIN)/python -m pytest -q

# Each guarantee broken on purpose in a copy of the tree: the tests named with it must fail
# (tests/mutants.py; about a minute).
mutants: $(VENV)/.dev
	$(BIN)/python -m tests.mutants $(MUTANTS)

# Coverage-guided fuzzing (atheris) of the parsing surfaces, FUZZ_SECONDS per target; new
# inputs go to tests/fuzz/corpus/, crashes to .fuzz/ (see tests/fuzz/__init__.py).
FUZZ_SECONDS ?= 60

$(VENV)/.fuzz: $(BIN)/rooms
	$(BIN)/python -m pip install -q -e '.[fuzz]'
	touch $@

fuzz: $(VENV)/.fuzz  ## fuzz every parsing surface for FUZZ_SECONDS each (6 targets)
	$(BIN)/python -m tests.fuzz all --seconds $(FUZZ_SECONDS)

# The documentation site (mkdocs.yml, docs/): the reference pages are generated from the
# docstrings, and docs/hooks.py checks the pages against the code. NO_MKDOCS_2_WARNING silences
# the theme's notice about its end of life (not a build warning).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs: $(VENV)/.dev  ## serve the documentation on http://127.0.0.1:8004, rebuilt on change
	$(MKDOCS) serve -a 127.0.0.1:8004

docs-build: $(VENV)/.dev  ## build the documentation into site/; any warning fails
	$(MKDOCS) build --strict --site-dir site

test: lint typecheck docs-build unit mutants  ## lint, strict type check, docs build, every test, the mutants

soak: $(VENV)/.dev  ## 2,000 connections, steady traffic, 3 minutes: RSS and fds must stay flat
	$(BIN)/python -m tests.system.soak $(SOAK_ARGS)

cluster-soak: $(VENV)/.dev  ## 3 nodes on PostgreSQL, 1,000 messages/s in, 10 minutes: no false node death
	$(BIN)/python -m tests.system.cluster_soak $(SOAK_ARGS)

# The benchmark: Rooms against websockets and Node ws (and in cluster mode on the local
# PostgreSQL, ROOMS_BENCH_POSTGRES for another), built here (bench/.venv, node_modules,
# the C load generator), one table of medians and ratios; see bench/run.py.
bench/.ready: bench/requirements.txt bench/package.json bench/wsload.c
	$(PYTHON) -m venv bench/.venv
	bench/.venv/bin/python -m pip install -q -r bench/requirements.txt
	cd bench && npm ci --no-audit --no-fund --silent
	cc -O2 -Wall -o bench/wsload bench/wsload.c
	touch $@

bench: $(VENV)/.postgres $(VENV)/.yjs bench/.ready  ## about 15 minutes
	bench/.venv/bin/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/yjs.py

bench-yjs: $(VENV)/.yjs bench/.ready  ## one Yjs document: Rooms' DocRoom against y-websocket's server
	$(BIN)/python bench/yjs.py $(BENCH_ARGS)

bench-quick: $(VENV)/.postgres bench/.ready  ## about 4 minutes
	bench/.venv/bin/python bench/run.py --quick $(BENCH_ARGS)

bench-admin: $(VENV)/.dev  ## what the admin page costs at 10,000 connections in 1,000 rooms
	$(BIN)/python bench/admin.py $(BENCH_ARGS)

bench-hibernation: $(VENV)/.dev  ## memory per connection while rooms hibernate
	$(BIN)/python bench/hibernation.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .autobahn tests/system/wscat/node_modules tests/system/yjs/node_modules bench/.venv bench/node_modules bench/wsload bench/.ready .mypy_cache .ruff_cache .pytest_cache site
