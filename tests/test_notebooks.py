"""The notebooks run end to end against a small results fixture."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.records import write_fixture

ALL = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
#: The notebooks that read records (the committed reference, or DPSGD_RESULTS).
NOTEBOOKS = [p for p in ALL if p.name != "04_own_model.ipynb"]


def test_the_four_notebooks_exist():
    assert [p.name for p in ALL] == ["01_runtimes.ipynb", "02_ablation.ipynb", "03_memory.ipynb",
                                     "04_own_model.ipynb"]


@pytest.mark.slow  # ~1 min; the own-model sweep itself is test_own_model's
def test_the_own_model_notebook_runs_its_sweep_and_draws_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DPSGD_OWN_MODEL_RUNS", str(tmp_path / "runs"))
    path = ALL[-1]
    notebook = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code")
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert "ghost: max |difference from both|" in text and "small_transformer" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    root = write_fixture(tmp_path / "results")
    monkeypatch.setenv("DPSGD_RESULTS", str(root))
    notebook = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), \
        "commit notebooks without outputs"
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    text = "".join(o.get("text", "") for o in outputs)
    assert f"from {root}" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_over_all_of_the_committed_reference_from_any_folder(path, tmp_path,
                                                                          monkeypatch):
    """Issue 15.2: the default results path is the repository's, not the working directory's;
    issue 22.1: every family of outputs/reference (cpu-4-devices included) draws."""
    monkeypatch.delenv("DPSGD_RESULTS", raising=False)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    reference = Path(__file__).resolve().parent.parent / "outputs" / "reference"
    assert f"from {reference}" in "".join(o.get("text", "") for o in outputs)
