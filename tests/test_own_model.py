"""Ablate your own model (issue 23): the public model contract, ``model=custom``, your own data
(``data=arrays``), and the ghost engine on today's layers (norms, N-D convolutions, attention,
tied weights through the fallback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import DatasetSpec, GhostUnsupported, Model, clipped_grad_sum, get_engine
from ablation.core.clipping import layer_rules, per_example_sq_norms
from ablation.report import records as results
from tests.cli import QUICK, REPO
from tests.conftest import flatten, reference_clipped_sum, reference_per_example_grads

EXAMPLE = REPO / "examples" / "my_model.py"
TINY_EXAMPLE = ["model=custom", "model.factory=my_model:small_transformer",
                "model.kwargs={width:8,heads:1}", "batch_size=4", "data.limit=64"]


def test_the_model_contract_is_public():
    spec = DatasetSpec("toy", n_train=10, input_shape=(3,), input_dtype="float32", num_classes=2)
    model = Model("toy", lambda x: hk.Linear(2)(x), spec)
    assert model.paper_n_params is None and not model.binary_logit
    params = model.init(jax.random.key(0))
    assert model.logits(params, jnp.ones((4, 3))).shape == (4, 2)


# -- the ghost engine on today's layers -------------------------------------------------------


def _attention(x):
    mha = hk.MultiHeadAttention(2, 3, w_init=hk.initializers.VarianceScaling())
    return hk.Linear(3)(mha(x, x, x).mean(axis=1))


def _tied(ids):
    embed = hk.Embed(12, 5)
    h = hk.LayerNorm(-1, True, True)(embed(ids)).mean(axis=1)
    return jax.nn.relu(hk.Linear(5)(h)) @ embed.embeddings.T  # the output tied to the input


NETWORKS = {
    "layer_norm": (lambda x: hk.Linear(3)(hk.LayerNorm(-1, True, True)(
        jax.nn.gelu(hk.Linear(6)(x))).mean(axis=1)), (4, 5, 7), None),
    "layer_norm_two_axes": (lambda x: hk.Linear(3)(hk.LayerNorm((1, 2), True, True,
                                                                param_axis=-1)(x).mean(axis=1)),
                            (4, 5, 7), None),
    "rms_norm": (lambda x: hk.Linear(3)(hk.RMSNorm(-1)(hk.Linear(6)(x)).mean(axis=1)),
                 (4, 5, 7), None),
    "conv1d": (lambda x: hk.Linear(3)(jax.nn.relu(hk.Conv1D(4, 3, stride=2)(x)).mean(axis=1)),
               (4, 9, 3), None),
    "conv1d_dilated": (lambda x: hk.Linear(3)(hk.Conv1D(4, 3, rate=2)(x).mean(axis=1)),
                       (4, 9, 3), None),
    "conv3d": (lambda x: hk.Linear(3)(jax.nn.relu(hk.Conv3D(3, 2, padding="VALID")(x)).reshape(
        x.shape[0], -1)), (3, 4, 5, 4, 2), None),
    "attention": (_attention, (4, 6, 5), None),
    "tied_embedding": (_tied, (4, 6), 12),
}


def _case(name):
    net, shape, vocab = NETWORKS[name]
    loss = Model(name, net, DatasetSpec(name, 10, shape[1:], "int32" if vocab else "float32",
                                        vocab or 3, vocab)).loss
    key = jax.random.key(1)
    x = (jax.random.randint(key, shape, -2, vocab + 2) if vocab  # a few ids out of range
         else jax.random.normal(key, shape))
    y = jax.random.randint(jax.random.key(2), (shape[0],), 0, vocab or 3)
    return loss, loss.transformed.init(jax.random.key(0), x[:1]), x, y


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("mode", ["bookkeeping", "two_pass"])
def test_ghost_matches_the_oracle_on_todays_layers(name, mode):
    loss, params, x, y = _case(name)
    fallback = "materialise" if name == "tied_embedding" else "error"
    per_example = reference_per_example_grads(loss, params, x, y)
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    mask = np.ones(x.shape[0])
    mask[1] = 0.0
    expected = reference_clipped_sum(per_example, clip, mask=mask)
    engine = get_engine("ghost", mode=mode, fallback=fallback)
    got = flatten(clipped_grad_sum(engine, loss, params, x, y, clip, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6 * np.abs(expected).max())
    rules = layer_rules(loss, params, x[0], y[0], fallback)
    assert not any("fallback" in r for s, r in rules.items() if name != "tied_embedding"), rules


def test_tied_weights_are_refused_by_default_and_materialised_with_the_fallback():
    loss, params, x, y = _case("tied_embedding")
    with pytest.raises(GhostUnsupported, match="engine.fallback=materialise"):
        clipped_grad_sum("ghost", loss, params, x, y, 1.0)
    rules = layer_rules(loss, params, x[0], y[0], "materialise")
    assert rules["embed"].startswith("fallback: materialised (its weights are used outside")
    assert rules["layer_norm"] == "layer norm" and rules["linear"] == "dense"


def test_a_fallback_layers_per_example_norm_is_vmaps():
    """An unknown layer (a hand-written per-channel scale) under the fallback: each example's
    norm is exactly its materialised gradient's. (A depthwise convolution, the unknown layer
    here before issue 32, now has the per-example rule of its own.)"""
    def net(x):
        scale = hk.get_parameter("scale", (3,), init=jnp.ones)
        return hk.Linear(3)(jax.nn.relu(x * scale).mean(axis=1))

    loss = Model("scaled", net, DatasetSpec("scaled", 10, (7, 3), "float32", 3)).loss
    x = jax.random.normal(jax.random.key(1), (4, 7, 3))
    y = jnp.array([0, 1, 2, 1])
    params = loss.transformed.init(jax.random.key(0), x[:1])
    with pytest.raises(GhostUnsupported, match="no clipping rule covers the parameters of "
                                               "'~'"):
        clipped_grad_sum("ghost", loss, params, x, y, 1.0)
    true = [np.linalg.norm(g) for g in reference_per_example_grads(loss, params, x, y)]
    got = np.sqrt(np.asarray(per_example_sq_norms(loss, params, x, y, "materialise")))
    np.testing.assert_allclose(got, true, rtol=1e-5)
    assert layer_rules(loss, params, x[0], y[0], "materialise")["~"] == \
        "fallback: materialised (no rule covers this layer)"


# -- model=custom from the command line -------------------------------------------------------


@pytest.fixture
def workdir(tmp_path):
    """A folder of the user's own, outside the repository, holding a copy of the example."""
    folder = tmp_path / "mywork"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "my_model.py")
    return folder


def _run(workdir, *args):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"))


def test_the_example_runs_through_every_engine_from_another_folder(workdir):
    proc = _run(workdir, "ablation.run", "-m", *TINY_EXAMPLE, "engine=both,jit,vmap,none,ghost",
                *QUICK, "timing.budget_s=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = results.load(workdir / "outputs")
    assert sorted(frame["engine"]) == ["both", "ghost", "jit", "none", "vmap"]
    assert set(frame["status"]) == {"ok"} and set(frame["model"]) == {"small_transformer"}
    assert set(frame["model_factory"]) == {"my_model:small_transformer"}
    assert frame["model_source_sha"].str.len().eq(16).all()
    ghost = frame[frame["engine"] == "ghost"].iloc[0]
    assert ghost["ghost_rules"]["layer_norm"] == "layer norm"
    assert "small_transformer" in proc.stdout  # the summary names the model as its author did


@pytest.mark.slow  # ~20 s; resume is tested in the default suite
def test_a_change_to_the_users_module_makes_resume_run_again(workdir):
    cell = [*TINY_EXAMPLE, "engine=both", *QUICK, "resume=true"]
    first = _run(workdir, "ablation.run", *cell)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _run(workdir, "ablation.run", *cell)
    assert "[resume] skipped" in again.stdout
    source = workdir / "my_model.py"
    source.write_text(source.read_text() + "\n# an edit\n")
    changed = _run(workdir, "ablation.run", *cell)
    assert changed.returncode == 0 and "[resume] skipped" not in changed.stdout


@pytest.mark.parametrize("factory, message", [
    ("nowhere:make", "cannot import 'nowhere'"),
    ("my_model:missing", "module 'my_model' has no function 'missing'"),
    ("my_model", "model.factory must be MODULE:FUNCTION"),
    ("my_model:REVIEWS", "module 'my_model' has no function 'REVIEWS'"),
    ("bad_model:not_a_model", "returned dict, not an ablation.Model"),
    ("bad_model:wrong_shape", "to (2, 5), not logits (2, 2)"),
])
def test_a_bad_factory_is_one_line_before_any_cell_runs(workdir, factory, message):
    (workdir / "bad_model.py").write_text(
        "import haiku as hk\nfrom ablation import Model\nfrom my_model import REVIEWS\n"
        "def not_a_model():\n    return {}\n"
        "def wrong_shape():\n    return Model('w', lambda t: hk.Linear(5)(hk.Embed(2000, 4)(t)"
        ".mean(1)), REVIEWS)\n")
    proc = _run(workdir, "ablation.run", "-m", "model=custom", f"model.factory={factory}",
                "engine=both,vmap", *QUICK)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (workdir / "outputs").exists() or not list((workdir / "outputs").rglob(
        "result.json"))


def test_a_pytorch_row_of_a_custom_model_is_an_error_record_saying_why(workdir):
    pytest.importorskip("opacus")
    proc = _run(workdir, "ablation.run", *TINY_EXAMPLE, "engine=opacus", *QUICK)
    assert proc.returncode == 1
    (_, record), = list(results.iter_records(workdir / "outputs"))
    assert "runs a twin of the model written in its own framework" in record["error"]


# -- data=arrays ------------------------------------------------------------------------------


def _arrays(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_your_own_arrays_train_and_time(workdir):
    rng = np.random.default_rng(0)
    data = _arrays(workdir / "reviews.npz", x=rng.integers(0, 2000, (96, 64)),
                   y=rng.integers(0, 2, 96))
    proc = _run(workdir, "ablation.run", *TINY_EXAMPLE, "data=arrays", f"data.path={data}",
                "engine=ghost", *QUICK)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (_, record), = list(results.iter_records(workdir / "outputs"))
    assert record["n_train"] == 64 and record["data"] == "arrays"  # data.limit of the 96


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((8, 63), np.int64), y=np.zeros(8, np.int64)),
     "x has shape (8, 63); the model takes examples of shape (64,)"),
    (dict(x=np.full((8, 64), 2000), y=np.zeros(8, np.int64)),
     "x holds token ids 2000..2000; the vocabulary has 2000, so 0..1999"),
    (dict(x=np.zeros((8, 64), np.int64), y=np.full(8, 2)),
     "y holds labels 2..2; the model has 2 classes, so 0..1"),
    (dict(x=np.zeros((8, 64), np.float32), y=np.zeros(8, np.int64)),
     "x must hold integer token ids, not float32"),
    (dict(inputs=np.zeros((8, 64), np.int64)), "no array 'x' (it holds inputs)"),
])
def test_bad_arrays_are_one_line(workdir, arrays, message):
    data = _arrays(workdir / "bad.npz", **arrays)
    proc = _run(workdir, "ablation.run", *TINY_EXAMPLE, "data=arrays", f"data.path={data}",
                *QUICK)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_the_ghost_self_check_runs_on_your_model(workdir):
    proc = _run(workdir, "ablation.check_ghost", *TINY_EXAMPLE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "exact" and "rms_norm: rms norm" in proc.stdout
