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

.PHONY: all install proto lint test run bench clean

all: test

$(STAMP): pyproject.toml setup.py store/_dictionary.c store/_kernels.c service/_events.c
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

$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: lint $(NODE_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

run: $(STAMP)
	$(VENV)/bin/abstream serve $(if $(ADDR),--addr $(ADDR)) $(if $(DATA),--data-dir $(DATA))

## Benchmark against DuckDB on N generated events (cached in bench/data); report in bench/results.
bench: $(STAMP)
	$(PY) -m bench.run --events $(N) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info store/*.so service/*.so
