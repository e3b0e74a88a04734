# Two entry points a new user needs: `make serve` and `make test`. Each creates .venv and installs what
# it needs the first time (the stamp files remember), so both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
# make loadtest: the server to load, Locust users, how long, where the CSV, HTML and summary go.
URL ?= http://127.0.0.1:$(PORT)
USERS ?= 16
DURATION ?= 60s
OUT ?= loadtests/results
# torch and torchvision are pinned by the `export` extra; pip takes them from this machine's wheel cache.
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: serve test coverage test-all test-docker lint loadtest bench kernels gpu-wheels gpu-check train-demo eval-demo export-demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Slim serving install: no torch, no export toolchain.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[cpu]'
	touch $@

# Locust for load tests against a running server; no torch.
$(VENV)/.loadtest-installed: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[cpu,loadtest]'
	touch $@ $(VENV)/.serve-installed

# Everything the tests use: export toolchain (torch, open_clip, onnx, transformers) and dev tools.
$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[cpu,export,dev]'
	touch $@ $(VENV)/.serve-installed $(VENV)/.loadtest-installed

# The playground page at / is on here (CLIPSERVE_PLAYGROUND=false turns it off); the images leave it off.
serve: $(VENV)/.serve-installed
	CLIPSERVE_PLAYGROUND=$${CLIPSERVE_PLAYGROUND:-true} $(BIN)/clipserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest

coverage: $(VENV)/.test-installed
	$(BIN)/python -m pytest --cov=service --cov=models --cov=export --cov-report=term

test-all: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m ''

# Builds the cpu image and runs it and the compose stack on a private Docker engine with stand-in base images
# (tests/deploy/docker_harness.py). Needs root and Debian's docker.io, docker-compose and debootstrap.
test-docker: $(VENV)/.test-installed
	CLIPSERVE_REQUIRE_DOCKER=1 $(BIN)/python -m pytest -m docker -s tests/deploy/test_docker.py

# Headless Locust against a running server (make serve, a container, a cluster): make loadtest URL=http://host:8000
loadtest: $(VENV)/.loadtest-installed
	$(BIN)/python -m loadtests.run --host $(URL) --users $(USERS) --run-time $(DURATION) --out $(OUT) $(ARGS)

# Every speed number side by side in one run (about 15 minutes here; the first run also exports a random-init
# ViT-B-32 into .bench/): raw engines, /classify against a transformers app, the per-request breakdown. Writes
# docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks/*.png.
bench: $(VENV)/.test-installed
	$(BIN)/python -m loadtests.bench $(ARGS)

# The CUDA similarity kernel's fatbin (service/kernels/similarity.fatbin), for running the GPU path from this
# checkout; needs nvcc (CUDA 13), no GPU. The gpu image builds its own.
kernels: $(VENV)/.serve-installed
	$(BIN)/python -m service.kernels.build

# Wheels that the GPU check needs and a bare GPU machine lacks (no network there), fetched here into .whl/.
gpu-wheels: $(VENV)/.test-installed
	$(BIN)/python -m loadtests.gpu_wheels --dest .whl

# On a GPU machine (PyTorch with CUDA, nvcc): builds the kernel, runs the tests marked gpu and the GPU
# benchmarks, and writes gpu-report.md to $$OUT (or ./gpu-report). Uses the machine's own python3, not a venv.
gpu-check:
	python3 -m loadtests.gpu_check --out "$${OUT:-gpu-report}"

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

train-demo: $(VENV)/.test-installed
	$(BIN)/clipserve train-demo

eval-demo: $(VENV)/.test-installed
	$(BIN)/clipserve eval-demo

# The demo model's committed ONNX repository (models/demo/config.py: EXPORT_FORMATS); tests fail if it drifts.
export-demo: $(VENV)/.test-installed
	$(BIN)/clipserve export --demo --formats onnx,onnx-int8 --repository models/demo/repository

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
