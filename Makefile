# edgefleet — every target creates .venv and installs the pinned dependencies when missing.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Test processes (pytest-xdist); each test module runs whole in one of them, in the
# order collected. tests/conftest.py groups the modules that run fleets of real processes
# against deadlines into two lanes, each one module at a time (REAL_TIME_LANES), and
# collects them and the other longest modules first, so that none starts when the other
# processes are nearly done.
TEST_WORKERS ?= 3

.PHONY: demo test test-fast test-browser test-litert check-arm64 lint bench images clean

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

# The second model runtime: LiteRT (ai-edge-litert) with numpy 2 in an environment of its own
# (edgefleet[litert], constraints-litert.txt), and the tests that run models and agents in it.
# Left out there, as LiteRT 2.1.6 differs: it exports no setting for its log threshold, so its
# one "Created TensorFlow Lite XNNPACK delegate" INFO line stays (test_runtime_logs.py); and
# its float results put the sample model v2's held-out accuracy at 0.8864, not the 0.8876
# documented with tflite-runtime.
LITERT_VENV  := .venv-litert
LITERT_STAMP := $(LITERT_VENV)/.installed
LITERT_TESTS := tests/unit/test_runtime_choice.py tests/unit/test_model_runtime.py \
	tests/unit/test_selftest.py tests/unit/test_bundle_builder.py \
	tests/integration/test_edge_agent_cli.py tests/integration/test_standalone_agent.py \
	tests/integration/test_agent_install.py \
	--deselect "tests/unit/test_model_runtime.py::test_the_runtimes_own_info_lines_show_only_at_debug[info-False]" \
	--deselect tests/unit/test_bundle_builder.py::test_calibration_is_measured_on_the_labelled_rows

$(LITERT_STAMP): pyproject.toml constraints-litert.txt
	test -x $(LITERT_VENV)/bin/python || $(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-litert.txt -e '.[server,litert,test]'
	touch $(LITERT_STAMP)

test-litert: $(LITERT_STAMP)
	$(LITERT_VENV)/bin/python -m pytest --numprocesses $(TEST_WORKERS) --dist loadfile $(LITERT_TESTS)

# The agent-only install on 64-bit ARM: Debian bookworm arm64 under qemu-user (debootstrap,
# kept in ~/.cache/edgefleet/), a signed bundle verified, an agent run, served and killed
# mid-install. Needs root; slow, so not part of `test`: run it before changing the agent's
# dependencies or runtime.
check-arm64: $(STAMP)
	$(BIN)/python -m tools.arm64.check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

images: $(STAMP)
	$(BIN)/python -m firmware_images.build

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
