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
from ablation.reference import opacus as torch_ref  # noqa: E402
from models import MODEL_NAMES, count_params, get_model  # noqa: E402
from tests.cli import QUICK, run_cli  # noqa: E402
from tests.conftest import reference_per_example_grads, small_batch  # noqa: E402

pytestmark = pytest.mark.torch


def _to_haiku_layout(grads, module):
    """Opacus' per-parameter sums, laid out like the Haiku parameters (w, b per module)."""
    layers = [m for m in module.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))]
    out, i = [], 0
    for layer in layers:
        w, b = grads[i], grads[i + 1]
        i += 2
        out.append(b)  # Haiku leaves sort b before w
        out.append(w.T if isinstance(layer, torch.nn.Linear) else w.transpose(2, 3, 1, 0))
    return np.concatenate([np.ravel(a) for a in out])


# Both sides compute in float32, and Opacus adds 1e-6 to each per-example norm before dividing.
RTOL, ATOL = 2e-4, 1e-6


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("name", ["ffnn", "cnn"])
def test_opacus_clipped_sum_equals_jax(name, mode):
    model = get_model(name)
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 8, seed=4)
    norms = [np.linalg.norm(g) for g in reference_per_example_grads(model.loss, params, x, y)]
    clip = float(np.median(norms))  # half the examples clipped
    module = torch_ref.build(name)
    torch_ref.load_haiku_params(module, params)
    grads = torch_ref.clipped_grad_sum(module, name, torch.from_numpy(np.array(x)),
                                       torch.from_numpy(np.array(y)), clip, mode=mode)
    got = _to_haiku_layout(grads, module)
    expected = np.concatenate([np.ravel(np.asarray(l)) for l in
                               jax.tree.leaves(clipped_grad_sum("both", model.loss, params, x, y,
                                                                clip))])
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_match_jax_but_lstm_biases(name):
    jax_count = count_params(get_model(name).init(jax.random.key(0)))
    torch_count = torch_ref.count_params(torch_ref.build(name))
    # PyTorch's LSTM keeps two bias vectors (input and hidden) per gate: 4·100 more.
    assert torch_count == jax_count + (400 if name == "lstm" else 0)


def test_same_weights_same_logits():
    for name in ("ffnn", "cnn", "embed", "cifar10"):
        model = get_model(name)
        params = model.init(jax.random.key(1))
        x, _ = small_batch(model, 3, seed=5)
        module = torch_ref.build(name)
        torch_ref.load_haiku_params(module, params)
        with torch.no_grad():
            got = module(torch.from_numpy(np.array(x))).numpy()
        np.testing.assert_allclose(got, np.asarray(model.logits(params, x)), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


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

    original = torch_ref.build
    monkeypatch.setattr(torch_ref, "build", lambda name: torch.nn.Sequential(
        torch.nn.BatchNorm1d(104), original(name)))
    cell = CellConfig(engine="opacus", engine_mode="hooks", model="ffnn", batch_size=8,
                      data_limit=64, timing=TimingConfig(max_steps=2, progress=False))
    spec = write_json(tmp_path / "spec.json", {"task": "timing", "cell": cell.to_dict(),
                                               "noise_multiplier": 1.0})
    assert worker.main([str(spec), str(tmp_path / "out.json")]) == 0
    record = read_json(tmp_path / "out.json")
    assert record["status"] == "error"
    assert "BatchNorm" in record["error"] and "\n" not in record["error"]
