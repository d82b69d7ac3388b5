# Two commands on a fresh machine: `make run` (the main job on synthetic data) and `make test`.
# The first use creates .venv and installs the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch for the reference rows: a CPU build by default (TORCH_SPEC picks another).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# Folders of records that `make figures` draws (one run or sweep folder, or all of outputs/).
RUNS ?= outputs

.PHONY: venv torch tf run cell memory check test test-slow test-all figures notebooks lab paper clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The optional reference rows and cluster launchers; `make test` installs them all.
# PyTorch first (a CPU build on disk here), then Opacus, jax-privacy and the submitit launcher;
# BackPACK without its dependencies (its torchvision would replace the CPU torch).
torch: $(VENV)/.torch
$(VENV)/.torch: $(VENV)/.installed
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,torch,jax_privacy,cluster]"
	$(PY) -m pip install --quiet --no-deps "backpack-for-pytorch==1.7.1" "unfoldNd==0.2.3" "einops>=0.6"
	touch $@

# TensorFlow Privacy in an environment of its own (it pins numpy 1.x, dp-accounting 0.4.3 and
# Python < 3.12): the engine=tfp worker runs with .venv-tf/bin/python.
TF_VENV ?= .venv-tf
tf: $(TF_VENV)/.installed
$(TF_VENV)/.installed:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info < (3, 12) else "make tf: TensorFlow Privacy 0.9 needs Python < 3.12 (PYTHON=python3.11 make tf)")'
	$(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TF_VENV)/bin/python -m pip install --quiet "tensorflow==2.15.1" "tensorflow-privacy==0.9.0"
	touch $@

run: venv  ## the main job: the four-engine ablation on the default cell (ffnn, batch 64, synthetic)
	$(PY) -m ablation.run -m engine=jit,vmap,both,none $(ARGS)

cell: venv  ## time one cell (override with ARGS="model=cnn batch_size=128 ...")
	$(PY) -m ablation.run $(ARGS)

memory: venv  ## probe the largest batch that fits (default model and engine)
	$(PY) -m ablation.memory $(ARGS)

check: venv  ## the quick loop (< 3 min): imports, layout, core oracle tests, a one-cell sweep
	$(PY) -m pytest -q -m check $(ARGS)

test: torch tf  ## the default suite (slow tests excluded), every extra installed
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: torch tf  ## the slow tests but the heavy one (.ci/run runs them after `make test`)
	$(PY) -m pytest -m "slow and not heavy" $(ARGS)

test-all: torch tf
	$(PY) -m pytest $(ARGS)

figures: venv  ## every figure from the records under $(RUNS) (runs no experiment)
	$(PY) -m ablation.figures $(RUNS) --out outputs/figures

notebooks: venv  ## execute the notebooks headless into outputs/notebooks (with their outputs)
	mkdir -p outputs/notebooks
	cp notebooks/*.ipynb outputs/notebooks/
	cd outputs/notebooks && ../../$(VENV)/bin/jupyter execute --inplace *.ipynb

lab: venv  ## open the notebooks in JupyterLab (installed into .venv on first use)
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	$(VENV)/bin/jupyter lab notebooks/

# Where `make paper` writes (OUTDIR=outputs/reference/cpu regenerates the committed reference).
OUTDIR ?= outputs/paper
paper: torch tf  ## the CPU reference: runtimes, ablation, frameworks, memory (~2 h), then figures
	OUTDIR=$(OUTDIR) PYTHON=$(PY) scripts/reference_cpu.sh
	$(MAKE) figures RUNS=$(OUTDIR)

clean:  ## remove .venv, caches and every run under outputs/ (never outputs/reference)
	rm -rf $(VENV) $(TF_VENV) .pytest_cache
	find outputs -mindepth 1 -maxdepth 1 ! -name reference -exec rm -rf {} +
