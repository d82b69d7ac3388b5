# Two commands on a fresh machine: `make run` (the main job on synthetic data) and `make test`.
# The first use creates .venv and installs the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch that is on disk on the development machine (no multi-GB download).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: venv torch run sweep memory test test-all figures paper clean

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

run: venv  ## time one cell on the default config (ffnn, engine both, synthetic data)
	$(PY) -m ablation.run $(ARGS)

sweep: venv  ## the four-engine ablation on the default model
	$(PY) -m ablation.run -m engine=jit,vmap,both,none $(ARGS)

memory: venv  ## probe the largest batch that fits (default model and engine)
	$(PY) -m ablation.memory $(ARGS)

test: torch  ## the default suite (slow tests excluded)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: torch
	$(PY) -m pytest $(ARGS)

figures: venv  ## every figure from the results under outputs/ (runs no experiment)
	$(PY) -m ablation.figures outputs --out outputs/figures

paper: venv  ## the paper's experiments, trimmed for a CPU, then the figures
	$(PY) -m ablation.run -m +experiment=runtimes $(ARGS)
	$(PY) -m ablation.run -m +experiment=ablation $(ARGS)
	$(PY) -m ablation.memory -m +experiment=memory $(ARGS)
	$(MAKE) figures

clean:
	rm -rf $(VENV) .pytest_cache outputs/runs outputs/multirun outputs/figures
