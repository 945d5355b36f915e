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

# the contributor's loop: everything but the `slow`-marked tests (README, "Tests and benchmarks")
test: install
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# the slow profile alone (the Airflow DAG runs, the archive-shipping cluster run, ...); .ci/run runs both
test-slow: install
	$(PYTEST) -m slow tests

test-all: install
	$(PYTEST) tests

bench: install
	$(PY) bench/etl.py
	$(PY) bench/train.py
	$(PY) bench/evaluate.py

clean:
	rm -rf data/demo .pytest_cache

distclean: clean
	rm -rf .venv data
