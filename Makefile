# edgefleet — every target creates .venv and installs the pinned dependencies when missing.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Test processes (pytest-xdist); each test module runs whole in one of them, in the
# order collected: tests/conftest.py collects the longest modules first (LONGEST), so
# that none starts when the other processes are nearly done.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast test-browser lint bench images clean

$(STAMP): pyproject.toml constraints.txt
	@if test -x $(BIN)/python; then \
	  echo "updating $(VENV): installing pinned dependencies (about a minute)..."; \
	else \
	  echo "creating $(VENV) and installing pinned dependencies (about a minute)..."; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleet-sim demo

test: $(STAMP)
	$(BIN)/python -m pytest --numprocesses $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The dashboard in Debian's headless chromium (also part of ``test``); screenshots of every
# page are saved under the run's temporary folder, which the summary names.
test-browser: $(STAMP)
	$(BIN)/python -m pytest tests/browser

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

images: $(STAMP)
	$(BIN)/python -m firmware_images.build

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
