# esmm-spark: `make demo` runs the pipeline end to end on a local Spark; `make test` runs the test suite.
# Both create .venv and install everything on first use (Horovod is built once into ~/.cache/esmm-spark/wheels).
PY := .venv/bin/python
CONF ?= conf/demo.yaml
SETS ?=

.PHONY: install demo test test-fast bench clean distclean

install:
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh $(CONF) $(SETS)

test: install
	$(PY) -m pytest -q --durations=15 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) bench/etl.py
	$(PY) bench/train.py
	$(PY) bench/evaluate.py

clean:
	rm -rf data/demo .pytest_cache

distclean: clean
	rm -rf .venv data
