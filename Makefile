# The two commands of eqrobust (see README.md):
#   make demo   set up .venv, get Fashion-MNIST, run the EP and DEQ studies at cpu scale -> runs/demo/
#   make test   set up .venv with the test extra, run pytest and ruff
# Extras: make deq-demo (the DEQ study with both DEQs), make bench (side-by-side PyTorch
# benchmarks), make bench-aa (AutoAttack against torchattacks, after make demo), make bench-gpu
# (the paper-scale GPU table; run it on a GPU machine), make clean.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo deq-demo test bench bench-aa bench-gpu data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package, when apt-get exists.
data:
	@if [ -d $(FMNIST_DIR) ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else echo "No apt-get: put the Fashion-MNIST IDX files in a folder and pass --data_dir" \
	  "(see README); tests that need the real data are skipped."; fi

# Every model family at cpu scale: the EP study (runs/demo/report.md), then the DEQ study of
# the PGD-AT DEQ with the demo's EP-CNN under the same intermediate attacks
# (runs/demo/deq/deq_report.md; the clean DEQ is in make deq-demo). BUILD_NOTES, "DEQ study".
demo: $(VENV)/.installed data
	$(PY) -m experiments.study --config=experiments/configs/study.py:cpu --workdir=runs/demo
	$(PY) -m experiments.deq_study --config=experiments/configs/deq_study.py:cpu,ep,pgd_at \
	  --workdir=runs/demo/deq --config.ep_workdir=runs/demo/ep_cnn

# The whole DEQ robustness study at cpu scale (issue 12), clean and PGD-AT DEQ ->
# runs/deq_demo/deq_report.md, with the demo's EP-CNN (trained here if it is missing).
deq-demo: $(VENV)/.installed data
	$(PY) -m experiments.deq_study --config=experiments/configs/deq_study.py:cpu,ep \
	  --workdir=runs/deq_demo --config.ep_workdir=runs/demo/ep_cnn

test: $(VENV)/.installed data
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.ep_free_phase
	$(PY) -m benchmarks.attacks
	$(PY) -m benchmarks.solvers_fevals

# Standard AutoAttack at its full budget on the demo's trained BP-CNN against torchattacks'
# components at the same budget (after make demo; ~10 min per norm on 2 cores).
bench-aa: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.autoattack_cpu --workdir=runs/demo/bp_cnn --norm=linf
	$(PY) -m benchmarks.autoattack_cpu --workdir=runs/demo/bp_cnn --norm=l2

bench-gpu: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.gpu --json=gpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
