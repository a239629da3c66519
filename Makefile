# t2i: two commands on a fresh machine.
#   make demo   creates .venv, installs, generates shapes-bench, trains, samples, scores (< 20 min on 2 CPU cores)
#   make test   creates .venv, installs with the PyTorch references, runs the test suite
#   make bench  benchmarks against the PyTorch references
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/sd_shapes
DATA_DIR ?= data
CONFIG ?= experiments/sd_shapes.py
DEMO_PROMPTS_PER_FAMILY ?= 20

.PHONY: demo test bench install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m launch.main --config=$(CONFIG) --workdir=$(WORKDIR) --config.data.data_dir=$(DATA_DIR)
	$(PY) -m data_pipelines.shapes.prompts --num_per_family=$(DEMO_PROMPTS_PER_FAMILY) --seed=1234 \
	  --size=$$($(PY) -c "import json;print(json.load(open('$(WORKDIR)/config.json'))['image_size'])") \
	  --out=$(WORKDIR)/eval_prompts.txt
	$(PY) -m t2i.sample --workdir=$(WORKDIR) --prompts_file=$(WORKDIR)/eval_prompts.txt --out=$(WORKDIR)/eval_samples
	$(PY) -m t2i.evaluate --samples=$(WORKDIR)/eval_samples | tee $(WORKDIR)/eval_scores.json
	@echo "sample grids: $(WORKDIR)/samples/  scores: $(WORKDIR)/eval_scores.json"

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --durations=15 tests

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.train_step

clean:
	rm -rf $(VENV) workdirs
