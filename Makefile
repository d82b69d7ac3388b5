# Two commands on a fresh machine: `make run` (the main job on synthetic data) and `make test`.
# The first use creates .venv and installs the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch that is on disk on the development machine (no multi-GB download).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# Folders of records that `make figures` draws (one run or sweep folder, or all of outputs/).
RUNS ?= outputs

.PHONY: venv torch run cell memory test test-all figures notebooks lab paper clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The optional Opacus/PyTorch extra (reference rows); `make test` installs it too.
torch: $(VENV)/.torch
$(VENV)/.torch: $(VENV)/.installed
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,torch]"
	touch $@

run: venv  ## the main job: the four-engine ablation on the default cell (ffnn, batch 64, synthetic)
	$(PY) -m ablation.run -m engine=jit,vmap,both,none $(ARGS)

cell: venv  ## time one cell (override with ARGS="model=cnn batch_size=128 ...")
	$(PY) -m ablation.run $(ARGS)

memory: venv  ## probe the largest batch that fits (default model and engine)
	$(PY) -m ablation.memory $(ARGS)

test: torch  ## the default suite (slow tests excluded)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: torch
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

paper: torch  ## the paper's experiments trimmed for a CPU (~2 h on 2 cores), then the figures
	$(PY) -m ablation.run -m experiment=reference_cpu $(ARGS)
	$(PY) -m ablation.memory -m experiment=memory $(ARGS)
	$(MAKE) figures

clean:  ## remove .venv, caches and every run under outputs/ (never outputs/reference)
	rm -rf $(VENV) .pytest_cache
	find outputs -mindepth 1 -maxdepth 1 ! -name reference -exec rm -rf {} +
