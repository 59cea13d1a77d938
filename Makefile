# MaaS mesh: the single entry point. `make up` runs the stack, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, exactly pinned: this spec resolves to the CPU build already on disk on the dev/CI
# machines; any other spec may pull a multi-GB CUDA build. Override for GPU hosts.
TORCH_SPEC ?= torch==2.13.0
WORKERS ?= 1
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/mesh_pb/*.proto)
GEN_STAMP := mesh_pb/.generated

.PHONY: venv proto lint typecheck compose-check test test-fast up demo bench tools clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

proto: $(GEN_STAMP)
$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -f mesh_pb/*_pb2*.py mesh_pb/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

lint: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy mesh gateway router workers compressor

compose-check: $(STAMP)
	$(VENV)/bin/docker-compose -f docker-compose.yml config -q
	$(VENV)/bin/hadolint --failure-threshold warning deploy/*.Dockerfile

test: lint compose-check
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: proto
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: proto
	$(PY) -m mesh.cli demo build

up: proto
	$(PY) -m mesh.up --workers $(WORKERS)

bench: proto
	$(PY) -m mesh.cli bench all --out docs/benchmarks.md

tools:
	bash deploy/fetch-perf-analyzer.sh .tools

# The mesh side by side with MLServer and KServe's model server (docs/peers.md): their venvs under
# .tools/peers, then every server started, checked and measured in turn; results in var/peers/<time>/.
.PHONY: bench-peers
bench-peers: proto
	test -x .tools/perf_analyzer || bash deploy/fetch-perf-analyzer.sh .tools
	bash deploy/peers/install.sh
	$(PY) deploy/peers/compare.py

clean:
	rm -rf $(VENV) var mesh_pb/*_pb2*.py mesh_pb/*_pb2*.pyi $(GEN_STAMP)
