# Two commands for a newcomer: `make run` and `make test`. Everything else here is what they build on.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RECAST := $(VENV)/bin/recast
STAMP := $(VENV)/.installed
CACHE := .cache
BANK := $(CACHE)/banks/minilm-default
DEMO := $(CACHE)/demo

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install system-deps run test lint bank demo clean

$(STAMP): pyproject.toml tools/install.py
	$(PYTHON) -m venv $(VENV)
	$(PY) tools/install.py dev bench triton
	touch $@

install: $(STAMP)

# The default template bank, built once and cached.
$(BANK)/bank.safetensors: | $(STAMP)
	$(RECAST) mimic --out $(BANK)

bank: $(BANK)/bank.safetensors

# Main job: mimic the default backbone (cached), train a demo task on real data, print its accuracy.
run: system-deps $(BANK)/bank.safetensors
	$(RECAST) datasets export trec --out $(DEMO)/trec
	$(RECAST) train --bank $(BANK) --data $(DEMO)/trec/train.csv --val-data $(DEMO)/trec/val.csv \
		--test-data $(DEMO)/trec/test.csv \
		--max-train-examples 2000 --epochs 4 --out $(DEMO)/trec.safetensors
	$(RECAST) inspect $(DEMO)/trec.safetensors
	$(RECAST) predict --bank $(BANK) --task $(DEMO)/trec.safetensors \
		"How far is the Moon from the Earth?" "Who wrote Hamlet?" "What does NASA stand for?"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

system-deps:
	bash tools/system-deps.sh

test: lint system-deps
	$(PY) -m pytest

clean:
	rm -rf $(CACHE) $(VENV)
