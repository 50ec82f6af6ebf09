# Every target sets up what it needs: on a fresh clone `make index` and `make test` just work.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ART    ?= artifacts
# Local Beam runner: the default (Prism) runner downloads a binary, which an offline machine cannot.
RUNNER ?= apache_beam.runners.portability.fn_api_runner.FnApiRunner

.DEFAULT_GOAL := help
.PHONY: help setup data data-if-possible index train-baseline bench bench-index bench-throughput bench-hamming bench-hashing bench-hashing-ablation bench-gsn bench-incremental test test-gpu lint clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install the pinned set (re-runs only when setup.py or constraints.txt change)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

FMNIST_DIR := /usr/share/datasets/fashion-mnist
# Where the reader looks first (retrieval_core.data.paths): $RETRIEVAL_DATA_DIR, else ../shared/datasets.
FMNIST_LOCAL := $(or $(RETRIEVAL_DATA_DIR),$(abspath ../shared/datasets))/fashion-mnist

data:  ## install real Fashion-MNIST from Debian (dataset-fashion-mnist) if it is missing
	@if [ -f $(FMNIST_LOCAL)/train-images-idx3-ubyte.gz ]; then echo "fashion-mnist: present in $(FMNIST_LOCAL)"; \
	elif [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then echo "fashion-mnist: present in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist || \
	  { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	elif command -v sudo >/dev/null; then sudo apt-get install -y -q dataset-fashion-mnist; \
	else echo "fashion-mnist: run as root: apt-get install dataset-fashion-mnist"; exit 1; fi

# The benchmarks that read Fashion-MNIST try to get it first; without it (no root, no sudo) they skip its rows.
data-if-possible:
	-@$(MAKE) --no-print-directory data

index: $(STAMP)  ## generate the default catalog, train the baseline bundle if none is cached, index it, report recall
	$(PY) -m pipelines.run_default --artifacts $(ART) --runner $(RUNNER)

train-baseline: $(STAMP)  ## (re)train the baseline bundle on the synthetic training catalog
	$(PY) -m retrieval_core.train.baseline --out $(ART)/bundles/baseline --data $(ART)/train_catalog

BUNDLE := $(ART)/bundles/baseline/bundle.json

$(BUNDLE): | $(STAMP)
	$(PY) -m retrieval_core.train.baseline --out $(ART)/bundles/baseline --data $(ART)/train_catalog

bench: bench-index bench-throughput bench-hamming bench-incremental  ## every benchmark, then docs/benchmarks.md (BENCH_ARGS=--quick: CI sizes)
	$(PY) -m bench.report

bench-index: $(STAMP)  ## 1M x 128 index through BuildIndex vs plain faiss: build time, RSS, recall@10 vs nprobe, load
	$(PY) -m bench.index_build $(BENCH_ARGS)

bench-throughput: $(STAMP) $(BUNDLE)  ## Beam pipeline vs a plain PyTorch loop (images/s), and decoding alone
	$(PY) -m bench.throughput --artifacts $(ART) $(BENCH_ARGS)

bench-hamming: $(STAMP)  ## Hamming radius-2 and k-NN search, multi-index hashing vs a scan, 1M 64-bit codes
	$(PY) -m bench.hamming $(BENCH_ARGS)

bench-hashing: $(STAMP) data-if-possible  ## ADSH vs DCH, ITQ, LSH at 16-64 bits on Fashion-MNIST and the real photos (~2 h; --quick: minutes)
	$(PY) -m bench.hashing --artifacts $(ART) $(BENCH_ARGS)

bench-hashing-ablation: $(STAMP) data-if-possible  ## the ADSH adversary's variants vs DCH, 3 seeds, Fashion-MNIST slices (~25 min)
	$(PY) -m bench.hashing_ablation --artifacts $(ART) $(BENCH_ARGS)

bench-gsn: $(STAMP) data-if-possible  ## GSN vs triplet (+ the RL embedding transform), RL SVM kernels vs linear/RBF (~25 min; --quick: minutes)
	$(PY) -m bench.gsn --artifacts $(ART) $(BENCH_ARGS)

bench-incremental: $(STAMP) $(BUNDLE)  ## wall time of a 1%-changed nightly run vs a full run, 10,000 images
	$(PY) -m bench.incremental --artifacts $(ART) $(BENCH_ARGS)

test: $(STAMP)  ## run the test suite
	$(PY) -m pytest -q tests

test-gpu: $(STAMP)  ## on a machine with a GPU: the GPU tests against the CPU (refuses where torch or faiss sees no GPU)
	$(PY) -c "import sys, torch, faiss; t, f = torch.cuda.is_available(), faiss.get_num_gpus(); \
	  sys.exit(0 if t and f else f'no usable GPU: torch.cuda.is_available() is {t}, faiss.get_num_gpus() is {f}')"
	$(PY) -m pytest -q -rs tests/test_gpu.py

RUFF := $(VENV)/bin/ruff --config 'line-length = 120' --config 'target-version = "py311"'

lint: $(STAMP)  ## ruff check (pyflakes, pycodestyle, isort, bugbear, pyupgrade) + format check
	$(RUFF) check --select E,F,W,I,B,UP --ignore B905 .
	$(RUFF) format --check .

clean:  ## remove generated artifacts (keeps .venv)
	rm -rf $(ART) .pytest_cache
