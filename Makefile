# Everything a fresh machine with Python 3.11, make, gcc and node needs is installed from here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PROTO  := protos/abstream/v1/analytics.proto protos/abstream/v1/admin.proto
# ADDR= and DATA= override ABSTREAM_ADDR and ABSTREAM_DATA_DIR, which override the defaults
# (127.0.0.1:50051, ./data): `make run` passes a flag only for what was given.
ADDR   ?=
DATA   ?=
N      ?= 10000000

.PHONY: all install proto lint test run ui cluster bench clean

all: test

$(STAMP): pyproject.toml setup.py store/_dictionary.c store/_kernels.c service/_events.c clients/_ndjson.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

## Regenerate the committed Python code for the contract.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTO)

lint: $(STAMP)
	$(VENV)/bin/buf lint

NODE_STAMP := clients/node/node_modules/.installed-stamp
## The results page's charts, served by the server itself: Vega, and the page's Vega-Lite specs
## compiled to Vega here (so the browser loads and compiles no Vega-Lite).
UI_STAMP := rest/ui/node_modules/.installed-stamp
CHARTS := rest/ui/build/charts.json

$(UI_STAMP): rest/ui/package.json rest/ui/package-lock.json
	cd rest/ui && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(CHARTS): rest/ui/charts.mjs rest/ui/build.mjs $(UI_STAMP)
	cd rest/ui && node build.mjs

ui: $(CHARTS)

$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

## Debian packages the tests start for real: a ClickHouse cluster (clickhouse-server 18.16 and
## zookeeper), openssl for the documented trial certificates, curl for the tutorial's commands and
## chromium (with a font) for the results page; apt-get needs root, as CI is.
DEBS := clickhouse-server clickhouse-client zookeeper openssl curl chromium fonts-liberation
DEBS_STAMP := $(VENV)/.debs-stamp

$(DEBS_STAMP): | $(STAMP)
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	touch $@

## The tutorial platform's own clients, which the HTTP API's tests drive: its CLI (in a venv of its
## own: its pins are not ours) and its TypeScript SDK.
TB_VENV  := $(VENV)/tinybird
TB_STAMP := $(TB_VENV)/.installed-stamp
SDK_STAMP := tests/sdk/node_modules/.installed-stamp

$(TB_STAMP): | $(STAMP)
	test -x $(TB_VENV)/bin/python || $(PYTHON) -m venv $(TB_VENV)
	$(TB_VENV)/bin/pip install --quiet tinybird-cli==6.5.5
	touch $@

$(SDK_STAMP): tests/sdk/package.json tests/sdk/package-lock.json
	cd tests/sdk && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: lint $(NODE_STAMP) $(CHARTS) $(SDK_STAMP) $(TB_STAMP) $(DEBS_STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

run: $(STAMP) $(CHARTS)
	$(VENV)/bin/abstream serve $(if $(ADDR),--addr $(ADDR)) $(if $(DATA),--data-dir $(DATA))

## A local ClickHouse cluster (2 shards x 2 replicas, ZooKeeper) with abstream serving on it at ADDR.
cluster: $(STAMP) $(DEBS_STAMP)
	$(PY) -m abstream.clickhouse.cluster $(if $(ADDR),--addr $(ADDR)) $(if $(DIR),--dir $(DIR))

## Benchmark against DuckDB on N generated events (cached in bench/data); report in bench/results.
bench: $(STAMP) $(CHARTS) $(if $(filter clickhouse,$(ENGINE)),$(DEBS_STAMP))
	$(PY) -m bench.run --events $(N) $(if $(ENGINE),--engine $(ENGINE)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info store/*.so service/*.so
