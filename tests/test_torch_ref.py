"""Reference rows: Opacus agrees with the JAX engines, and runs in sweeps beside them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed (make torch)")
pytest.importorskip("opacus", reason="the torch extra is not installed (make torch)")

import jax  # noqa: E402

from ablation import (
    clipped_grad_sum,  # noqa: E402
    results,  # noqa: E402
)
from ablation.reference import opacus as opacus_rows  # noqa: E402
from ablation.reference import torch_nets  # noqa: E402
from models import PAPER_MODEL_NAMES as MODEL_NAMES, count_params, get_model  # noqa: E402
from tests.cli import QUICK, run_cli  # noqa: E402
from tests.conftest import reference_per_example_grads, small_batch  # noqa: E402

pytestmark = pytest.mark.torch


# Both sides compute in float32, and Opacus adds 1e-6 to each per-example norm before dividing.
RTOL, ATOL = 2e-4, 1e-6


def _expected_torch_sums(name, params, x, y, clip):
    """The clipped sum PyTorch's parameters should hold, from JAX per-example gradients laid
    out as the twin's parameters (the lstm's bias counted twice, as PyTorch's norm does)."""
    model = get_model(name)
    per_example = jax.vmap(jax.grad(model.loss), in_axes=(None, 0, 0))(params, x, y)
    total = None
    for i in range(x.shape[0]):
        g = torch_nets.haiku_to_torch(name, jax.tree.map(lambda a: a[i], per_example),
                                      gradient=True)
        norm = np.sqrt(sum(np.sum(a * a) for a in g))
        scale = min(1.0, clip / (norm + 1e-6))
        total = [scale * a for a in g] if total is None else [t + scale * a
                                                              for t, a in zip(total, g)]
    return total, norm


def _opacus_sums(name, params, x, y, clip, mode):
    module = torch_nets.build(name)
    torch_nets.load_haiku_params(module, params, name)
    return opacus_rows.clipped_grad_sum(module, name, torch.from_numpy(np.array(x)),
                                        torch.from_numpy(np.array(y)), clip, mode=mode)


@pytest.mark.parametrize("name, mode", [(n, "hooks") for n in MODEL_NAMES]
                         + [(n, m) for n in ("ffnn", "cnn") for m in ("functorch", "ghost")]
                         + [(n, m) for n in ("transformer", "vit")
                            for m in ("hooks", "ghost", "functorch")])
def test_opacus_clipped_sum_equals_jax(name, mode):
    """Issue 12.22: every model with a reference row, the lstm (default, scanned) included."""
    model = get_model(name)
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 6, seed=4)
    norms = [np.linalg.norm(g) for g in reference_per_example_grads(model.loss, params, x, y)]
    clip = float(np.median(norms))  # half the examples clipped
    expected, _ = _expected_torch_sums(name, params, x, y, clip)
    got = _opacus_sums(name, params, x, y, clip, mode)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL * max(1.0, np.abs(e).max()))


def test_the_jax_clipped_sum_is_what_the_twins_compute():
    """The layout map is right both ways: JAX's own clipped sum, mapped to PyTorch's layout,
    equals Opacus' where the two norms agree (all models but the lstm)."""
    model = get_model("cnn")
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 6, seed=4)
    ours = torch_nets.haiku_to_torch("cnn", clipped_grad_sum("both", model.loss, params, x, y,
                                                             0.5), gradient=True)
    for g, e in zip(_opacus_sums("cnn", params, x, y, 0.5, "hooks"), ours):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL * max(1.0, np.abs(e).max()))


@pytest.mark.parametrize("name", [*MODEL_NAMES, "transformer", "vit"])
def test_parameter_counts_match_jax_but_lstm_biases(name):
    jax_count = count_params(get_model(name).init(jax.random.key(0)))
    torch_count = torch_nets.count_params(torch_nets.build(name))
    # PyTorch's LSTM keeps two bias vectors (input and hidden) per gate: 4·100 more.
    assert torch_count == jax_count + (400 if name == "lstm" else 0)


def test_same_weights_same_logits():
    for name in (*MODEL_NAMES, "transformer", "vit"):
        model = get_model(name)
        params = model.init(jax.random.key(1))
        x, _ = small_batch(model, 3, seed=5)
        module = torch_nets.build(name)
        torch_nets.load_haiku_params(module, params, name)
        with torch.no_grad():
            got = module(torch.from_numpy(np.array(x))).numpy()
        np.testing.assert_allclose(got, np.asarray(model.logits(params, x)), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


@pytest.mark.slow  # ~20 s; test_frameworks sweeps every framework
def test_sweep_with_opacus_beside_jax(tmp_path):
    proc = run_cli("ablation.run", "-m", "engine=both,opacus", "model=ffnn", "batch_size=16",
                   "private=true,false", "data.limit=512", *QUICK, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(tmp_path)
    assert len(frame) == 4 and set(frame["status"]) == {"ok"}
    opacus = frame[frame["engine"] == "opacus"]
    assert opacus["compile_s"].isna().all()
    for env in opacus["env"]:
        assert env["torch"] and env["opacus"] and env["platform"] == "cpu"
    assert (opacus["n_params"] == 5352).all()
    summary = proc.stdout.split("=== summary")[1]
    assert "opacus" in summary and "both" in summary


def test_opacus_refusal_becomes_an_error_record_with_its_message(tmp_path, monkeypatch):
    """Every mode runs every model of the paper (see the closing note), so a refusal is made
    real: a BatchNorm layer, which Opacus' validator rejects for private training."""
    from ablation.measure.settings import CellConfig, TimingConfig
    from ablation.report.records import read_json, write_json
    from ablation.sweep import worker

    original = torch_nets.build
    monkeypatch.setattr(torch_nets, "build", lambda name, **kw: torch.nn.Sequential(
        torch.nn.BatchNorm1d(104), original(name, **kw)))
    cell = CellConfig(engine="opacus", engine_mode="hooks", model="ffnn", batch_size=8,
                      data_limit=64, timing=TimingConfig(max_steps=2, progress=False))
    spec = write_json(tmp_path / "spec.json", {"task": "timing", "cell": cell.to_dict(),
                                               "noise_multiplier": 1.0})
    assert worker.main([str(spec), str(tmp_path / "out.json")]) == 0
    record = read_json(tmp_path / "out.json")
    assert record["status"] == "error"
    assert "BatchNorm" in record["error"] and "\n" not in record["error"]
