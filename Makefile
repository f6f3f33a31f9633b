# Two commands: `make demo` and `make test` (ruff, then the test suite). Both create .venv and install with the committed
# CPU constraints (never let pip choose torch freely: a CUDA build is gigabytes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the suite runs in one process per core (tests/conftest.py gives each one torch thread); whole files per worker,
# so a module's fixtures are built once
TEST_WORKERS ?= 2

.PHONY: install test demo study bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: install
	$(PY) -m gradscore_train.ablate configs/ablations/toy.yaml

# the correlation study on real images (issue 13): trains 12 digits models, assesses 41; resumable; ~40 min on 2 cores
study: install
	$(PY) -m gradscore_train.ablate configs/ablations/digits_study.yaml

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
