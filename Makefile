# esmm-spark: `make demo` runs the pipeline end to end on a local Spark; `make test` runs the test suite.
# Both create .venv and install everything on first use (Horovod is built once into ~/.cache/esmm-spark/wheels).
PY := .venv/bin/python
CONF ?= conf/demo.yaml
SETS ?=
PYTEST := $(PY) -m pytest -q --durations=15
# make test's workers (pytest-xdist; each file runs whole on one worker, its module fixtures built once); 0: one process
TEST_WORKERS ?= 2

.PHONY: install demo test test-slow test-all bench clean distclean

install:
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh $(CONF) $(SETS)

# The project's bytecode, written once before a suite (about 1 s, up-to-date files skipped): where the environment
# sets PYTHONDONTWRITEBYTECODE (this machine's does) every one of the suite's Python processes (Spark workers, Horovod
# ranks, jobs) would otherwise compile the esmm modules it imports again, about 0.3 s each.
BYTECODE := $(PY) -m compileall -q esmm schemas jobs tests >/dev/null

# the contributor's loop: everything but the `slow`-marked tests (README, "Tests and benchmarks")
test: install
	@$(BYTECODE)
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# the slow profile alone (the Airflow DAG runs, the archive-shipping cluster run, ...); .ci/run runs both
test-slow: install
	@$(BYTECODE)
	$(PYTEST) -m slow tests

test-all: install
	@$(BYTECODE)
	$(PYTEST) tests

bench: install
	$(PY) bench/etl.py
	$(PY) bench/train.py
	$(PY) bench/evaluate.py

clean:
	rm -rf data/demo .pytest_cache

distclean: clean
	rm -rf .venv data
