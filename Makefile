# Two commands for a newcomer: `make run` and `make test`. Everything else here is what they build on.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RECAST := $(VENV)/bin/recast
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
CACHE := .cache
BANK := $(CACHE)/banks/minilm-default
DEMO := $(CACHE)/demo

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-run system-deps-run system-deps-test run test lint bank demo clean

# What serving needs (`make run`): the project and its pinned dependencies, no test or benchmark tools.
$(RUN_STAMP): pyproject.toml tools/install.py
	$(PYTHON) -m venv $(VENV)
	$(PY) tools/install.py
	touch $@

# Everything (`make test`, benchmarks): serving's set plus the dev, bench and triton extras.
$(STAMP): $(RUN_STAMP)
	$(PY) tools/install.py dev bench triton
	touch $@

install-run: $(RUN_STAMP)

install: $(STAMP)

# The default template bank, built once and cached.
$(BANK)/bank.safetensors: | $(RUN_STAMP)
	$(RECAST) mimic --out $(BANK)

bank: $(BANK)/bank.safetensors

# Demo tasks trained once from bundled real data (TREC question types, SMS spam) and cached.
$(DEMO)/%.safetensors: | $(BANK)/bank.safetensors
	$(RECAST) datasets export $* --out $(DEMO)/$*
	$(RECAST) train --bank $(BANK) --data $(DEMO)/$*/train.csv --val-data $(DEMO)/$*/val.csv \
		--test-data $(DEMO)/$*/test.csv --max-train-examples 1000 --epochs 3 --out $@

demo: $(DEMO)/trec.safetensors $(DEMO)/sms_spam.safetensors

# Main job: the server on the default backbone at 127.0.0.1:8000, with the demo tasks loaded.
run: system-deps-run $(BANK)/bank.safetensors demo
	@echo
	@echo "Starting the server on http://127.0.0.1:8000 (web console: http://127.0.0.1:8000/console, API docs:"
	@echo "http://127.0.0.1:8000/docs). Once the log"
	@echo "says 'server runtime ready', try from another terminal:"
	@echo
	@echo "  curl -s http://127.0.0.1:8000/v1/tasks"
	@echo "  curl -s -X POST http://127.0.0.1:8000/v1/tasks/trec/predict -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"inputs\": [\"Who wrote Hamlet?\", \"How far is the Moon from the Earth?\"]}'"
	@echo "  curl -s -X POST http://127.0.0.1:8000/v1/tasks/sms_spam/predict -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"inputs\": [\"WINNER! Claim your free prize now\", \"see you at 5?\"]}'"
	@echo "  curl -s -X PUT http://127.0.0.1:8000/v1/tasks/my-task --data-binary @$(DEMO)/trec.safetensors \\"
	@echo "       -H 'Content-Type: application/octet-stream'"
	@echo "  curl -s http://127.0.0.1:8000/metrics | grep recast_"
	@echo
	$(RECAST) serve --bank $(BANK) --store $(CACHE)/tasks \
		--preload trec=$(DEMO)/trec.safetensors --preload sms_spam=$(DEMO)/sms_spam.safetensors

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

system-deps-run:
	bash tools/system-deps.sh run

system-deps-test:
	bash tools/system-deps.sh test

test: lint system-deps-test
	$(PY) -m pytest

clean:
	rm -rf $(CACHE) $(VENV)
