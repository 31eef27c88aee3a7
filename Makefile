# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
RECBOLE_VERSION ?= 1.2.1
DEMO_DIR ?= artifacts/demo

.PHONY: venv demo test lint typecheck unit soak clean lock test-floors

# torch goes in first, pinned, so the project's looser requirement is already met and pip
# never pulls the CUDA build. Everything else comes from the lock file (requirements/dev.lock,
# made by `make lock`), then the project itself without dependencies. MovieLens-100K is read
# from inside the recbole wheel, which is downloaded, not installed: recbole is never imported
# and its own dependencies are never needed.
# pip runs with -qq: errors only. A pip configuration whose extra index lacks a package
# otherwise prints a warning per package, which reads like a failed install.
PIPQ := --quiet --quiet
$(VENV)/.installed: pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIPQ) --upgrade pip
	$(PIP) install $(PIPQ) torch==$(TORCH_VERSION)
	$(PIP) install $(PIPQ) -r requirements/dev.lock
	PYTHONWARNINGS=ignore $(PIP) install $(PIPQ) --no-deps -e .  # no setuptools banner about editable installs
	$(PIP) download $(PIPQ) --no-deps --dest $(VENV)/share/two-tower-retrieval \
		recbole==$(RECBOLE_VERSION)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/retrieval demo --out $(DEMO_DIR)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint --config .hadolint.yaml docker/Dockerfile docker/Dockerfile.gpu docker/Dockerfile.redis

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

# The lock files, for Linux x86_64 and Python 3.11 (CI and the images), made by uv from
# pyproject.toml. torch is left out of them (it is installed first, pinned, as above) but its
# CPU build's dependencies are in: TORCH_WHEELS is where uv finds that build (a directory
# holding the wheel, or --extra-index-url with PyTorch's CPU wheel index). floors.lock holds
# the lowest version of every direct dependency that pyproject.toml allows: `make test-floors`.
TORCH_WHEELS ?= --find-links /opt/wheels
UV := $(VENV)/bin/uv
LOCK := $(UV) pip compile pyproject.toml --quiet --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --no-emit-package torch \
	--constraint requirements/torch.txt $(TORCH_WHEELS)
$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet uv
lock: $(UV)
	$(LOCK) --extra cpu -o requirements/runtime.lock
	$(LOCK) --extra cpu --extra dev -o requirements/dev.lock
	$(LOCK) --extra cpu --extra dev --resolution lowest-direct -o requirements/floors.lock

# The test suite against floors.lock: every direct dependency at its lowest allowed version
# (torch excepted: the one CPU build installed first), in a separate virtual environment.
FLOORS_VENV ?= .venv-floors
test-floors: requirements/floors.lock
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install $(PIPQ) --upgrade pip
	$(FLOORS_VENV)/bin/pip install $(PIPQ) torch==$(TORCH_VERSION)
	$(FLOORS_VENV)/bin/pip install $(PIPQ) -r requirements/floors.lock
	PYTHONWARNINGS=ignore $(FLOORS_VENV)/bin/pip install $(PIPQ) --no-deps -e .
	$(FLOORS_VENV)/bin/pip download $(PIPQ) --no-deps \
		--dest $(FLOORS_VENV)/share/two-tower-retrieval recbole==$(RECBOLE_VERSION)
	$(FLOORS_VENV)/bin/pytest -q -p no:cacheprovider

# The images and the compose stack built and run for real on a Docker engine, end to end
# (docker/docker-test.sh: build, jobs, API queries, index hot swap, clean stop; results in
# bench/results/docker_test.json). Not part of `make test`, which needs no Docker. Prints
# SKIP with the reason where Docker cannot run; DOCKER_TEST_REQUIRED=1 fails instead.
.PHONY: docker-test
docker-test:
	bash docker/docker-test.sh

clean:
	rm -rf $(VENV) $(FLOORS_VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
