# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
RECBOLE_VERSION ?= 1.2.1
DEMO_DIR ?= artifacts/demo

.PHONY: venv demo test lint typecheck unit soak clean

# torch goes in first, pinned, so the project's looser requirement is already met
# and pip never pulls the CUDA build. recbole is installed without its dependencies:
# only the MovieLens-100K copy it ships is read.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet --no-deps recbole==$(RECBOLE_VERSION)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/retrieval demo --out $(DEMO_DIR)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint --config .hadolint.yaml docker/Dockerfile docker/Dockerfile.gpu

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q

test: lint typecheck unit

# The long rows of the reliability suite (docs/reliability.md): about 40 minutes with the
# defaults; SOAK_ARGS="--minutes 5 --row17-s 30 --kills 10" for a short form.
SOAK_ARGS ?=
soak: venv
	$(PY) bench/soak.py --workdir artifacts/soak --out artifacts/soak/soak.json $(SOAK_ARGS)

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
