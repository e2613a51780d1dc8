# The two set-up commands: `make demo` and `make test`. Each creates .venv and installs the pinned
# dependencies (constraints.txt) when they are missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The extras installed with the package: `make test EXTRAS=test,bench` also installs torch and transformers, so that
# the comparisons with Hugging Face transformers run instead of skipping (CI does this).
EXTRAS ?= test
# Every test runs on 8 simulated CPU devices; the flag must be set before jax is imported.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu

.PHONY: install demo test bench clean

$(VENV)/.installed-$(EXTRAS): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

test: install
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist=loadfile -q tests

# The built-in experiment: pre-train, fine-tune and evaluate on the synthetic knowledge base (runs/demo/).
demo: install
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m t5x_lite.experiment --gin_file=gin/experiments/bios_demo.gin --verbosity=-1

# Extra flags, e.g. make bench BENCH_ARGS="--against hf --data_throughput" (--against hf needs the bench extra:
# $(PY) -m pip install -c constraints.txt -e '.[bench]').
BENCH_ARGS ?=
bench: install
	$(PY) scripts/benchmark.py --gin_file=gin/models/t5_1_1/small.gin --batch_size=8 --inputs_length=512 --targets_length=114 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
