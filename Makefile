# The two commands: `make demo` (whole pipeline on the default data) and `make test`.
# Both create .venv when missing. On a machine without CUDA, torch is pinned to the CPU wheel
# first so that resolving the project's `torch>=2.6` pulls no GPU build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CPU_TORCH := torch==2.13.0
# Where the CPU torch comes from: empty = pip's configured indexes; on Linux, PyPI's torch is the
# CUDA build, so a machine without a GPU says TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: demo test test-learning fuzz install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q 'torch>=2.6'; \
	else \
		$(BIN)/python -m pip install -q $(CPU_TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipeline.commands.demo

# `rlhf label`'s page is tested in a real headless browser: Debian's chromium, installed here when
# it is missing and apt can install it (as root). The browser test is skipped only without it.
browser:
	if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && \
			[ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: apt-get could not install chromium; the browser test will be skipped" >&2; \
	fi

# Two workers of one thread each: most tests wait on a subprocess or the disk part of the time, so
# two cores run two of them side by side faster than one with two threads. A module's tests share
# a worker (its session fixtures are built once per worker).
test: $(STAMP) browser
	OMP_NUM_THREADS=1 RLHF_NO_PROGRESS=1 $(BIN)/python -m pytest -q -x -n 2 --dist loadfile \
		-m "not learning" tests

# What the tiny recipe learns, judged by the gold scorer (trains it as `make demo` does: minutes).
test-learning: $(STAMP)
	OMP_NUM_THREADS=2 RLHF_NO_PROGRESS=1 $(BIN)/python -m pytest -q -x -m learning tests

# The fuzz tests with 30 times `make test`'s budget and a fresh random seed (about ten minutes);
# a failure prints the input and the seed that reproduce it.
fuzz: $(STAMP)
	OMP_NUM_THREADS=2 RLHF_NO_PROGRESS=1 RLHF_FUZZ_PROFILE=long $(BIN)/python -m pytest -q \
		-m fuzz tests/fuzz --hypothesis-show-statistics

clean:
	rm -rf $(VENV) runs
