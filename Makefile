# Set-up and everyday commands. Everything lives in .venv inside the checkout.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install browser espeak demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[models,server,live,dev,ray]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/susurrus samples/jfk.flac --model base --output_dir out/demo

# The page test drives Debian's chromium with Playwright (its own browser download needs a
# network the CI machine lacks); as root, install chromium when it is missing.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium; \
	fi

# The synthetic-voice accuracy test and the benchmark's en-synth input speak with Debian's
# espeak-ng; as root, install it when it is missing.
espeak:
	@if ! command -v espeak-ng >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq espeak-ng; \
	fi

test: install browser espeak
	$(BIN)/ruff check susurrus tests benchmarks
	$(BIN)/pytest -q --durations=25

lint: install
	$(BIN)/ruff check susurrus tests benchmarks

# Speed and accuracy against openai-whisper and faster-whisper on the same weights; the peers
# live in their own venv so they never touch ours. BENCH_ARGS=--quick for a smoke run.
bench: install espeak
	@if [ ! -f benchmarks/.venv-peers/.installed ] || \
	    [ benchmarks/requirements-peers.txt -nt benchmarks/.venv-peers/.installed ]; then \
		set -e; \
		$(PYTHON) -m venv benchmarks/.venv-peers; \
		benchmarks/.venv-peers/bin/pip install -q $(TORCH); \
		benchmarks/.venv-peers/bin/pip install -q --no-deps -r benchmarks/requirements-peers.txt; \
		touch benchmarks/.venv-peers/.installed; \
	fi
	benchmarks/.venv-peers/bin/python benchmarks/run.py --our-python $(BIN)/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out build *.egg-info
