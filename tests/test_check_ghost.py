"""``python -m ablation.check_ghost``: the ghost engine's self-check, on every registered model."""

from __future__ import annotations

import dataclasses

import pytest

from ablation.measure.ghost_check import check_ghost
from ablation.measure.settings import CellConfig
from models import MODEL_NAMES
from tests.cli import run_cli


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_checks_exact(name):
    """The rules' norms and clipped sum against materialised gradients, on the model's own
    (synthetic) data at full size: the lstm's 256 tokens, cifar10's 32×32 images."""
    cell = dataclasses.replace(CellConfig(), model=name, batch_size=4, data_limit=64)
    report = check_ghost(cell, batches=2)
    assert report.exact, "\n".join(report.lines())
    assert report.rules and all(rule for rule in report.rules.values())
    assert report.clipped["the median norm"] > 0  # the check exercised clipping


def test_the_two_pass_mode_checks_exact_too():
    cell = dataclasses.replace(CellConfig(), model="cnn", batch_size=4, data_limit=64,
                               engine="ghost", engine_mode="two_pass")
    assert check_ghost(cell, batches=1).exact


def test_the_command_says_exact_and_names_each_layers_rule(tmp_path):
    proc = run_cli("ablation.check_ghost", "model=cnn", "batch_size=8", "data.limit=64",
                   output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "exact"
    assert "  conv2_d_1: conv2d: gram over 25 positions" in lines
    assert "  conv2_d: conv2d: materialised over 196 positions" in lines
    # the data's batches and the same batches under large shared offsets, against both
    assert lines[0].endswith("each as data, offset 1e+03, offset 1e+04")
    assert any("over-clip factor 1.00000" in line for line in lines)
    assert sum(" vs both " in line for line in lines) == 2
    assert not list(tmp_path.iterdir())  # it writes nothing


def test_the_command_refuses_bad_overrides_in_one_line(tmp_path):
    proc = run_cli("ablation.check_ghost", "model=resnet", output_dir=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unknown model 'resnet'" in proc.stderr
