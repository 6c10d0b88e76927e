# Two entry points (see README): `make demo` runs the demo fine-tune, `make test` runs the tests.
# Both set up ./.venv first (scripts/setup.sh; skipped when already done).
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint format clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

clean:
	rm -rf .venv .pytest_cache build *.egg-info src/*.egg-info src/loratune/kernels/*.so
