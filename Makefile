# medray: `make demo` and `make test` work on a fresh machine; both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medray-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-integration test-e2e test-faults test-security lint \
	typecheck bench bench-score bench-stage bench-train bench-startup bench-quality clean browser pacs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m medray.jobs.demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# One target per suite (tests/README.md says what each needs). Only the unit suite runs
# without starting Ray or the S3 server.
test-unit test-integration test-e2e test-faults test-security: test-%: setup
	$(BIN)/python -m pytest tests/$* $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check jobs cluster workers tests bench tools
	$(BIN)/python tools/check_layers.py
	$(BIN)/python tools/typecheck.py

typecheck: setup
	$(BIN)/python tools/typecheck.py

bench: bench-stage bench-score bench-train

bench-score: setup
	$(BIN)/python bench/bench_score.py

bench-stage: setup
	$(BIN)/python bench/bench_stage.py

bench-train: setup
	$(BIN)/python bench/bench_train.py

bench-startup: setup
	$(BIN)/python bench/bench_startup.py

bench-quality: setup
	$(BIN)/python bench/bench_quality.py

# Headless Chromium for the test that renders the HTML report (skipped when absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed: the HTML rendering test will be skipped"; fi; }

# Orthanc with its DICOMweb plugin for the PACS tests (tests/integration/test_pacs.py); without
# it they skip, except under CI (the CI variable set), where they fail.
pacs:
	@{ command -v Orthanc >/dev/null 2>&1 && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; \
	  else echo "orthanc not installed: the PACS tests will be skipped"; fi; }

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
