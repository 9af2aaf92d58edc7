# Two commands from a fresh clone: `make demo` and `make test`.
# Each creates the virtual environment .venv and installs what it needs when missing.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-bayes bench-crossed bench-all sbc clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import sys; assert sys.version_info >= (3, 12), f"bayeslmm needs Python >= 3.12, the venv has {sys.version}"'
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,bench]"
	@touch $(STAMP)

# the whole workflow on sleepstudy: REML, NUTS (4 chains x 1000 draws), the side-by-side table,
# and everything written to demo-output/ (summary, JSON, saved fits, CSV tables, PNG plots)
demo: $(STAMP)
	$(VENV)/bin/bayeslmm fit sleepstudy "Reaction ~ Days + (Days | Subject)" --method both --random-seed 1 --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_reml.py

bench-bayes: $(STAMP)
	$(PY) benchmarks/bench_bayes.py

# crossed, nested and q = 3 models against bambi and rstanarm (when R has it); ARGS="--quick" for a smoke run
bench-crossed: $(STAMP)
	$(PY) benchmarks/bench_crossed.py $(ARGS)

# the whole suite, one table: bayeslmm vs bambi (NUTS), lme4 and statsmodels (REML), 1e3 to 1e7 rows;
# about an hour on 2 cores (benchmarks/README.md); ARGS="--quick" for a smoke run of a few minutes
bench-all: $(STAMP)
	$(PY) benchmarks/run_all.py $(ARGS)

# simulation-based calibration of the NUTS engine (docs/calibration.md); resumable, ~30 min on 2 cores
sbc: $(STAMP)
	nice -n 15 $(PY) validation/run_sbc.py

clean:
	rm -rf $(VENV) *.egg-info
