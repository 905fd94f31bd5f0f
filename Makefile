# The README's commands. `make demo` and `make test` set everything up themselves.
#
#   make venv    create .venv and install the package with its test tools (reruns when pyproject.toml changes)
#   make demo    the whole service: a server, two workers, training across both, a service answering
#   make plan-demo  plan the example workloads on the example inventory
#   make test    lint, format check, type check, generated-code freshness, then the tests
#   make bench   the planning benchmark (bench/plan_scale.py)
#   make proto   regenerate proto/apportion/**/*_pb2*.py{,i} from the .proto files

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The examples of the README; examples/small/ is the fallback while they do not exist.
DEMO_INVENTORY := $(firstword $(wildcard examples/inventory.yaml) examples/small/inventory.yaml)
DEMO_WORKLOADS := $(firstword $(wildcard examples/workloads.yaml) examples/small/workloads.yaml)

.PHONY: venv demo plan-demo test lint typecheck proto-check pytest bench proto

venv: $(STAMP)

# pyproject.toml pins ortools, protobuf and grpcio(-tools); installing the package
# with its [test] extra resolves against those pins and so never swaps them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(BIN)/python -m server.demo

plan-demo: venv
	$(BIN)/apportion plan --inventory $(DEMO_INVENTORY) --workloads $(DEMO_WORKLOADS)

test: lint typecheck proto-check pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy solver server worker scripts

proto-check: venv
	$(BIN)/python scripts/gen_protos.py --check

pytest: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python bench/plan_scale.py

proto: venv
	$(BIN)/python scripts/gen_protos.py
