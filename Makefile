# Two set-up commands: `make demo` and `make test` (each installs first, into .venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test

.PHONY: install demo lint test test-all clean bench-digits rehearse-xl

install: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (it lies on this machine's disk); the CUDA build is ~5 GB.
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.5,<2.15"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/flowmap convert builtin:digits-sit --out demo-out/digits-dmf5
	$(BIN)/flowmap sample builtin:digits-dmf --nfe 1 --num-samples 100 --out demo-out/samples
	$(BIN)/python -m flowmap_convert.demo --out demo-out/compare.png
	@echo "1-step samples of builtin:digits-dmf: demo-out/samples/grid.png; base vs flow maps: demo-out/compare.png"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

bench-digits: install
	$(BIN)/python benchmarks/digits/bench.py

# The real job at real size on the CPU (not part of `make test`; ~14 GB of RAM for SiT-XL/2, see docs/memory.md):
# random SiT-XL/2 weights in REPA's format -> convert, dry run, search-depth, finetune + SIGKILL + resume + export,
# sample through the SD-VAE architecture, score; report in benchmarks/results/rehearse-xl.{json,md}.
# REHEARSE_ARGS="--hidden 384" rehearses a smaller model where the memory is not there.
REHEARSE_ARGS ?=
rehearse-xl: install
	$(BIN)/python benchmarks/rehearsal/rehearse_xl.py --work rehearse-xl-work $(REHEARSE_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
