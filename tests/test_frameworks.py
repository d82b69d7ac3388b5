"""Every framework of the paper beside ours: each one's clipped per-example gradient sum equals
JAX's on the same weights and data, refusals become error records, and one sweep holds them all.

Each framework's tests skip with a reason where its extra is not installed; ``make test``
installs them all (TF Privacy in ``.venv-tf``), so CI runs every one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ablation import clipped_grad_sum
from ablation.report import records as results
from models import get_model
from tests.cli import QUICK, REPO, run_cli
from tests.conftest import reference_per_example_grads, small_batch

RTOL, ATOL = 2e-4, 1e-6
CASES = ("ffnn", "cnn")
TF_PYTHON = Path(os.environ.get("DPSGD_TF_PYTHON", REPO / ".venv-tf" / "bin" / "python"))


def _case(name: str):
    model = get_model(name)
    params = model.init(jax.random.key(0))
    x, y = small_batch(model, 6, seed=4)
    norms = [np.linalg.norm(g) for g in reference_per_example_grads(model.loss, params, x, y)]
    clip = float(np.median(norms))  # half the examples clipped
    expected = clipped_grad_sum("both", model.loss, params, x, y, clip)
    return model, params, np.asarray(x), np.asarray(y), clip, expected


def _close(got, expected, what):
    assert len(got) == len(expected), what
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL * max(1.0, np.abs(e).max()),
                                   err_msg=what)


# -- PyTorch-based: BackPACK and PyVacy's algorithm -------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_backpack_clipped_sum_equals_jax(name):
    pytest.importorskip("backpack", reason="BackPACK is not installed (make torch)")
    import torch

    from ablation.reference import backpack as rows
    from ablation.reference import torch_nets
    _, params, x, y, clip, expected = _case(name)
    module = torch_nets.build(name, dp_lstm=False)
    torch_nets.load_haiku_params(module, params, name)
    got = rows.clipped_sum(rows.extend(module), rows.extend(rows.summed_loss(name)),
                           torch.from_numpy(x), torch_nets.targets_for(name, torch.from_numpy(y)),
                           clip)
    _close([g.detach().numpy() for g in got],
           torch_nets.haiku_to_torch(name, expected, gradient=True), f"backpack {name}")


@pytest.mark.parametrize("name", CASES)
def test_pyvacy_microbatch_sum_equals_jax(name):
    pytest.importorskip("torch", reason="the torch extra is not installed (make torch)")
    import torch

    from ablation.reference import pyvacy, torch_nets
    _, params, x, y, clip, expected = _case(name)
    module = torch_nets.build(name, dp_lstm=False)
    torch_nets.load_haiku_params(module, params, name)
    got = pyvacy.microbatch_clipped_sum(module, name, torch.from_numpy(x),
                                        torch_nets.targets_for(name, torch.from_numpy(y)), clip)
    _close([g.detach().numpy() for g in got],
           torch_nets.haiku_to_torch(name, expected, gradient=True), f"pyvacy {name}")


def test_a_layer_backpack_cannot_extend_becomes_an_error_record(tmp_path, monkeypatch):
    pytest.importorskip("backpack", reason="BackPACK is not installed (make torch)")
    import torch

    from ablation.measure.settings import CellConfig, TimingConfig
    from ablation.reference import torch_nets
    from ablation.report.records import read_json, write_json
    from ablation.sweep import worker

    class GRUNet(torch.nn.Module):  # BackPACK has no extension for a GRU
        def __init__(self):
            super().__init__()
            self.gru, self.head = torch.nn.GRU(104, 8, batch_first=True), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.gru(x[:, None])[0][:, 0])

    monkeypatch.setattr(torch_nets, "build", lambda name, **kw: GRUNet())
    cell = CellConfig(engine="backpack", model="ffnn", batch_size=8, data_limit=64,
                      timing=TimingConfig(max_steps=2, progress=False))
    spec = write_json(tmp_path / "spec.json", {"task": "timing", "cell": cell.to_dict(),
                                               "noise_multiplier": 1.0})
    assert worker.main([str(spec), str(tmp_path / "out.json")]) == 0
    record = read_json(tmp_path / "out.json")
    assert record["status"] == "error" and "no per-example gradient for gru" in record["error"]


# -- jax_privacy -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("microbatch", [None, 2])
def test_jax_privacy_clipped_sum_equals_jax(name, microbatch):
    pytest.importorskip("jax_privacy", reason="jax-privacy is not installed")
    import jax.numpy as jnp

    from ablation.reference import jax_privacy as rows
    model, params, x, y, clip, expected = _case(name)
    got = rows.clipped_sum(model.loss, params, x, y, clip, microbatch_size=microbatch)
    _close(jax.tree.leaves(got), jax.tree.leaves(expected), f"jax_privacy {name}")
    mask = jnp.array([1.0, 0, 1, 1, 0, 1])
    masked = rows.clipped_sum(model.loss, params, x, y, clip, mask, microbatch_size=microbatch)
    _close(jax.tree.leaves(masked),
           jax.tree.leaves(clipped_grad_sum("both", model.loss, params, x, y, clip, mask=mask)),
           f"jax_privacy {name} masked")


def test_jax_privacy_refuses_microbatches_that_do_not_divide():
    pytest.importorskip("jax_privacy", reason="jax-privacy is not installed")
    from ablation.reference import jax_privacy as rows
    model, params, x, y, clip, _ = _case("ffnn")
    with pytest.raises(ValueError, match="micro-batches of 4 do not divide a batch of 6"):
        rows.clipped_sum(model.loss, params, x, y, clip, microbatch_size=4)


# -- TensorFlow Privacy (in .venv-tf) ---------------------------------------------------------

TF_SCRIPT = r"""
import json, sys
import numpy as np
from ablation.reference import tfp
case = np.load(sys.argv[1], allow_pickle=False)
params = json.loads(str(case["params"]))
params = {k: {n: np.asarray(v, np.float32) for n, v in g.items()} for k, g in params.items()}
out = {}
for mode in tfp.MODES:
    try:
        sums = tfp.clipped_grad_sum(str(case["name"]), params, case["x"], case["y"],
                                    float(case["clip"]), mode=mode)
    except ValueError as error:  # fast: a layer its registry has no rule for
        out[f"{mode}_refused"] = np.array(str(error))
        continue
    out.update({f"{mode}_{i}": s for i, s in enumerate(sums)})
np.savez(sys.argv[2], **out)
"""


#: The TF Privacy rows run in their own environment (make tf; make test makes it).
NEEDS_TF = pytest.mark.skipif(not TF_PYTHON.exists(),
                              reason=f"no TF Privacy environment at {TF_PYTHON} "
                                     "(make tf; make test makes it)")


def _run_in_tf(script: str, tmp_path, name, params, x, y, clip, *, timeout: int):
    """Run ``script`` in the TF Privacy environment on one case (weights as JSON, the batch,
    C) and return the arrays it saved."""
    as_json = json.dumps({k: {n: np.asarray(v).tolist() for n, v in g.items()}
                          for k, g in params.items()})
    np.savez(tmp_path / "case.npz", name=name, params=as_json, x=x, y=y, clip=clip)
    proc = subprocess.run([str(TF_PYTHON), "-c", script, str(tmp_path / "case.npz"),
                           str(tmp_path / "out.npz")], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(tmp_path / "out.npz")


@NEEDS_TF
@pytest.mark.parametrize("name", CASES)
def test_tf_privacy_clipped_sum_equals_jax(name, tmp_path):
    _, params, x, y, clip, expected = _case(name)
    out = _run_in_tf(TF_SCRIPT, tmp_path, name, params, x, y, clip, timeout=600)
    # Keras orders each layer's kernel before its bias; Haiku's leaves put b before w.
    wanted = []
    for group in expected.values():
        wanted += [np.asarray(group["w"]), np.asarray(group["b"])]
    for mode in ("vectorized", "loop"):
        got = [out[f"{mode}_{i}"] for i in range(len(wanted))]
        _close(got, wanted, f"tfp[{mode}] {name}")
    _check_fast(out, wanted, name)


#: The layers of each twin TF Privacy's fast clipping has no rule for (None: all covered).
FAST_REFUSES = {"logreg": None, "ffnn": None, "embed": None, "cnn": "Conv2D",
                "cifar10": "Conv2D", "lstm": "LSTM", "transformer": "PositionEmbedding",
                "vit": "Conv2D"}


def _check_fast(out, wanted, name: str) -> None:
    """engine.mode=fast: TF Privacy's fast clipping equals ours where its registry covers the
    model, and names the layer it cannot clip where it does not."""
    refused = FAST_REFUSES.get(name, "")
    if refused is None:
        got = [out[f"fast_{i}"].reshape(w.shape) for i, w in enumerate(wanted)]
        _close(got, wanted, f"tfp[fast] {name}")
    else:
        assert "fast_refused" in out.files, f"tfp[fast] {name} should be refused"
        message = str(out["fast_refused"])
        assert "no rule for" in message and refused in message, message


# -- all of them in one sweep ------------------------------------------------------------------


def test_one_sweep_holds_every_framework(tmp_path):
    proc = run_cli("ablation.run", "-m", "engine=both,tfp,backpack,pyvacy,jax_privacy",
                   "model=ffnn", "batch_size=16", "data.limit=256", *QUICK, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(tmp_path)
    assert sorted(frame["engine"]) == ["backpack", "both", "jax_privacy", "pyvacy", "tfp"]
    ok = frame[frame["status"] == "ok"]
    expected_ok = {"both", "jax_privacy", "pyvacy"}
    for engine, module in (("backpack", "backpack"),):
        if _installed(module):
            expected_ok.add(engine)
    if TF_PYTHON.exists():
        expected_ok.add("tfp")
    assert set(ok["engine"]) >= expected_ok, frame[["engine", "status", "error"]]
    env = frame.set_index("engine")["env"]
    if "tfp" in set(ok["engine"]):
        assert env["tfp"]["tensorflow"].startswith("2.15") and env["tfp"]["tensorflow_privacy"]
    assert env["jax_privacy"]["jax_privacy"]
    assert "microbatch" in frame.set_index("engine").loc["pyvacy", "implementation"]


@pytest.mark.slow  # ~2 min; every framework on a paper model stays in the default suite
def test_one_sweep_holds_every_row_on_the_vit(tmp_path):
    """Issue 24: every engine and every framework row on an encoder in one tiny sweep; BackPACK,
    which has no extension for LayerNorm, is an error record that quotes it."""
    engines = "both,ghost,jit,vmap,none,opacus,opacus_ghost,opacus_functorch,jax_privacy,pyvacy"
    engines += ",backpack" + (",tfp" if TF_PYTHON.exists() else "")
    proc = run_cli("ablation.run", "-m", f"engine={engines}", "model=vit", "batch_size=2",
                   "data.limit=64", *QUICK, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(tmp_path)
    status = dict(zip(frame["engine"] + frame["engine_mode"].fillna("").map(
        lambda m: f"[{m}]" if m else ""), frame["status"]))
    failed = {k: v for k, v in status.items() if v != "ok" and not k.startswith("backpack")}
    assert not failed, frame[["engine", "engine_mode", "status", "error"]]
    assert len(status) == len(engines.split(","))
    if _installed("backpack"):
        error = frame.set_index("engine").loc["backpack", "error"]
        assert "no per-example gradient" in error and "norm" in error


def _installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_a_missing_framework_environment_is_an_error_record(tmp_path):
    proc = run_cli("ablation.run", "engine=tfp", "model=logreg", "batch_size=16",
                   "data.limit=256", *QUICK, output_dir=tmp_path,
                   env={"DPSGD_TF_PYTHON": str(tmp_path / "absent" / "python")})
    assert proc.returncode == 1
    (_, record), = list(results.iter_records(tmp_path))
    assert record["status"] == "error" and "make tf" in record["error"]


@NEEDS_TF
def test_a_tf_cell_that_fails_in_its_worker_names_its_code_and_framework(tmp_path):
    """Issue 32: an error inside the TF worker (here the real dataset, absent offline; in the
    committed reference once a ResourceExhaustedError) writes the identity every record
    carries: the code's sha, the machine and TensorFlow's versions, from the TF environment,
    which has no JAX."""
    proc = run_cli("ablation.run", "engine=tfp", "model=logreg", "batch_size=16", "data=real",
                   f"data.cache_dir={tmp_path / 'empty'}", "data.download=false", *QUICK,
                   output_dir=tmp_path / "runs")
    assert proc.returncode == 1
    (_, record), = list(results.iter_records(tmp_path / "runs"))
    assert record["status"] == "error" and "DatasetUnavailable" in record["error"]
    env = record["env"]
    assert env["git_sha"] and env["tensorflow"] and env["tensorflow_privacy"], env
    assert env["cpu_model"] and env["platform"] == "cpu" and "error" not in env


def test_engines_without_poisson_refuse_it():
    from ablation.sweep.config import ConfigError, cell_from_dict
    for engine in ("tfp", "backpack", "pyvacy", "opacus"):
        with pytest.raises(ConfigError, match=f"engine={engine} trains on shuffled fixed-size"):
            cell_from_dict({"engine": {"name": engine}, "dp": {"sampling": "poisson"}})
    cell_from_dict({"engine": {"name": "jax_privacy"}, "dp": {"sampling": "poisson"}})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# -- the transformer and the vit, in every framework --------------------------------------------

ENCODERS = ("transformer", "vit")


def _encoder_case(name: str):
    """A full-size input (the Keras twin's input is fixed at 256 tokens) of 4 examples."""
    model = get_model(name)
    params = model.init(jax.random.key(0))
    spec = model.dataset
    key = jax.random.key(4)
    x = (jax.random.randint(key, (4, *spec.input_shape), 0, spec.vocab_size)
         if spec.input_dtype == "int32" else jax.random.uniform(key, (4, *spec.input_shape)))
    y = jax.random.randint(jax.random.key(5), (4,), 0, spec.num_classes)
    norms = [np.linalg.norm(g) for g in reference_per_example_grads(model.loss, params, x, y)]
    clip = float(np.median(norms))
    expected = clipped_grad_sum("both", model.loss, params, x, y, clip)
    return model, params, np.asarray(x), np.asarray(y), clip, expected


TF_ENCODER_SCRIPT = TF_SCRIPT.replace("np.savez(sys.argv[2], **out)", """\
model = tfp.build(str(case["name"]))
out["names"] = np.array(["/".join(tfp.haiku_path(w.name)) for w in model.weights])
np.savez(sys.argv[2], **out)""")


@NEEDS_TF
@pytest.mark.parametrize("name", ENCODERS)
def test_tf_privacy_clipped_sum_equals_jax_on_the_encoders(name, tmp_path):
    """Keras' MultiHeadAttention and LayerNormalization twins, weights mapped by name."""
    _, params, x, y, clip, expected = _encoder_case(name)
    out = _run_in_tf(TF_ENCODER_SCRIPT, tmp_path, name, params, x, y, clip, timeout=900)
    names = [str(n).rsplit("/", 1) for n in out["names"]]
    wanted = [np.asarray(expected[scope][leaf]) for scope, leaf in names]
    for mode in ("vectorized", "loop"):
        got = [out[f"{mode}_{i}"].reshape(w.shape) for i, w in enumerate(wanted)]
        _close(got, wanted, f"tfp[{mode}] {name}")
    _check_fast(out, wanted, name)


@pytest.mark.parametrize("name", ENCODERS)
def test_pyvacy_and_jax_privacy_clipped_sums_equal_ours_on_the_encoders(name):
    pytest.importorskip("torch", reason="PyTorch is not installed (make torch)")
    import torch

    from ablation.reference import pyvacy, torch_nets
    _, params, x, y, clip, expected = _encoder_case(name)
    module = torch_nets.build(name)
    torch_nets.load_haiku_params(module, params, name)
    x_torch = torch.from_numpy(x).long() if x.dtype.kind == "i" else torch.from_numpy(x)
    got = pyvacy.microbatch_clipped_sum(module, name, x_torch,
                                        torch_nets.targets_for(name, torch.from_numpy(y)), clip)
    _close([g.detach().numpy() for g in got],
           torch_nets.haiku_to_torch(name, expected, gradient=True), f"pyvacy {name}")
    pytest.importorskip("jax_privacy", reason="jax-privacy is not installed (make torch)")
    from ablation.reference import jax_privacy as rows
    model = get_model(name)
    ours = rows.clipped_sum(model.loss, params, x, y, clip)
    _close([np.asarray(a) for a in jax.tree.leaves(ours)],
           [np.asarray(a) for a in jax.tree.leaves(expected)], f"jax_privacy {name}")
