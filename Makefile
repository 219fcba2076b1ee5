# One entry point for users and CI. `make test` works on a fresh clone with no GPU and no download.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
EXTRAS ?= dev

.PHONY: setup test lint demo model eval bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed-$(EXTRAS)

test: setup
	$(BIN)/python -m pytest -q

# Ask the shipped model a question (no download, no GPU): the canvas denoising, the thinking, then the answer
# (tests/test_shipped.py checks that this question is answered right for seeds 0-9).
DEMO ?= What is 347 + 589?
demo:
	$(MAKE) setup EXTRAS=text,vision
	$(BIN)/diffusiongemma generate "$(DEMO)" --think --show-canvas --seed 0

# Train the shipped model from scratch (CPU): tokenizer, then text and vision together.
model:
	$(MAKE) setup EXTRAS=dev
	@[ -d /usr/share/games/fortunes ] || apt-get install -y -q fortunes || \
	  (echo "the recipe needs Debian's fortunes package: apt-get install fortunes" && false)
	$(BIN)/diffusiongemma train --recipe shipped --out models/diffusiongemma-tiny

eval:
	$(MAKE) setup EXTRAS=dev
	$(BIN)/diffusiongemma eval --model models/diffusiongemma-tiny --n 100

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
