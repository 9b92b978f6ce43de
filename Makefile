# Set-up and the two everyday commands. `make demo` and `make test` create the virtual environment on first use.
#
#   make demo          the whole pipeline on generated videos, on a CPU (about 7 minutes): a positive control
#   make demo-control  the same with the negative control (fvlm demo --control none): the ratio ends at 1
#   make test          the test suite (no GPU, no network)
#   make test-fast     without the slow end-to-end tests
#   make test-faults   the fault-injection and bad-input suites (kills, full disks, damaged files, fuzzed input)
#   make bench         the CPU benchmarks (precompute, feature codec, loader, train step, listing)
#   make gpu-check     on one CUDA GPU (< 8 min): compiled vs eager train step, full-size precompute, batch-64 step
#   make ui-check      the Prefect UI in headless Chromium (installs Debian's chromium when missing; about 2 min):
#                      pictures really render; screenshots into docs/ui
#
# GPU hosts: `make setup TORCH="torch==2.14.1"` (or any CUDA build of torch >= 2.4 installed first).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-control test test-fast test-faults bench gpu-check ui-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so that the project's `torch>=2.4` is already satisfied by the build chosen here
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fvlm demo

demo-control: $(STAMP)
	$(BIN)/fvlm demo --control none

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-faults: $(STAMP)
	$(BIN)/python -m pytest -v tests/faults tests/tasks/test_listing_fuzz.py tests/tasks/test_bad_videos.py

bench: $(STAMP)
	$(BIN)/python benchmarks/precompute.py
	$(BIN)/python benchmarks/feature_codec.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/listing.py

gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

# Installs Debian's chromium with apt-get when no Chromium is found (FVLM_CHROMIUM, or chromium on PATH): as root
# it runs apt-get itself (about 400 MB); otherwise it prints the command to run and stops.
ui-check: $(STAMP)
	@if [ -z "$$FVLM_CHROMIUM" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
	    && ! command -v google-chrome >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	  else \
	    echo "no Chromium found; install it with:"; \
	    echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium"; \
	    exit 1; \
	  fi; \
	fi
	FVLM_UI_SHOTS=docs/ui $(BIN)/python -m pytest -v -s tests/ui

clean:
	rm -rf $(VENV) fvlm-demo fvlm-demo-control .pytest_cache
