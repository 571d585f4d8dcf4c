# The two documented entry points: `make demo` (a small real training run) and `make test` (both lanes).
# Each builds its virtual environment on first use (scripts/ensure_venv.sh), cached outside the clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTEST_ARGS ?=
# Slow tests (minutes-long learning runs, multi-process preemption) run with `make test PYTEST_MARKS=`.
PYTEST_MARKS ?= not slow

.PHONY: demo test test-main test-xla venv-main venv-xla

demo:
	venv=$$(scripts/ensure_venv.sh main); PYTHONPATH=$(CURDIR) $$venv/bin/python examples/demo.py

test: test-main test-xla

# Main lane: the whole suite on torch 2.13 CPU, jax 0.10, transformers 5.x.
test-main:
	venv=$$(scripts/ensure_venv.sh main); PYTHONPATH=$(CURDIR) $$venv/bin/python -m pytest tests -q -m "$(PYTEST_MARKS)" $(PYTEST_ARGS)

# XLA lane: the Colab TPU runtime's stack (torch/torch_xla 2.9, jax 0.7.2, transformers 5.15): the tests
# of that stack (selected in tests/conftest.py; XTRAINER_XLA_LANE_FULL=1 runs the whole suite).
test-xla:
	venv=$$(scripts/ensure_venv.sh xla); PYTHONPATH=$(CURDIR) $$venv/bin/python -m pytest tests -q -m "$(PYTEST_MARKS)" $(PYTEST_ARGS)

# Side-by-side benchmark vs transformers' Trainer and bare loops (bench/harness.py; writes bench/RESULTS.md).
.PHONY: bench
bench:
	venv=$$(scripts/ensure_venv.sh main); PYTHONPATH=$(CURDIR) XTRAINER_BENCH_VIA_MAKE=1 $$venv/bin/python bench/harness.py $(BENCH_ARGS)

venv-main:
	scripts/ensure_venv.sh main
venv-xla:
	scripts/ensure_venv.sh xla
