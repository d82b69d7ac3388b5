"""Issue 24: the transformer with its classifier tied to the token table (``model.tied=true``).

One weight with two uses is the case per-layer clipping gets wrong: a layer rule (ours, or an
Opacus hook) sees only the use inside its layer, so the per-example norm would be too small and
a clipped example could count for more than C. Here the engines that differentiate the whole
network agree with the float64 oracle; ghost refuses unless it materialises the tied table;
Opacus refuses (and the test shows why: its per-example gradients miss the second use); the
frameworks that differentiate each example whole (PyVacy's loop, jax_privacy, TF Privacy) agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import clipped_grad_sum, get_engine
from ablation.core.engines import GHOST_MODES
from ablation.core.taps import GhostUnsupported
from ablation.report import records as results
from models import get_model
from models.attention import TIED_CLASS_ROWS
from models.registry import count_params
from tests.cli import QUICK, run_cli
from tests.conftest import (expected_clipped_sum, flatten, reference_clipped_sum,
                            reference_per_example_grads)

# The class rows' gradient is the sum of two uses that nearly cancel (the classifier's and the
# input's), so float32 leaves ~1e-7 there where the largest entry is ~0.05: ATOL is 5e-6 of
# it. A missed use would be off by the whole of one term, 1e-3 of it or more.
RTOL, ATOL = 1e-4, 5e-6
#: Across frameworks (two float32 computations, each rounding the near-cancelling sum).
FRAMEWORK_RTOL, FRAMEWORK_ATOL = 2e-4, 2e-5
TIED = get_model("transformer", tied=True)


def _case(batch: int = 4, tokens: int = 8):
    """A small batch whose sequences also feed in the class rows (so both uses of a row have a
    gradient), the median per-example norm as C (about half the examples clipped)."""
    params = TIED.init(jax.random.key(1))
    kx, ky = jax.random.split(jax.random.key(2))
    x = jax.random.randint(kx, (batch, tokens), 0, TIED.dataset.vocab_size, jnp.int32)
    x = x.at[:, 0].set(TIED_CLASS_ROWS[0]).at[::2, 1].set(TIED_CLASS_ROWS[1])
    y = jax.random.randint(ky, (batch,), 0, 2, jnp.int32)
    per_example = reference_per_example_grads(TIED.loss, params, x, y)
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    return params, x, y, per_example, clip


def test_the_tied_transformer_has_no_head_and_one_table():
    params = TIED.init(jax.random.key(0))
    untied = get_model("transformer").init(jax.random.key(0))
    assert "head" not in params and "head" in untied
    assert count_params(params) == count_params(untied) - (64 * 2 + 2) == 706_752
    with pytest.raises(ValueError, match="tied applies to the transformer only"):
        get_model("vit", tied=True)


ENGINES = [get_engine("jit", loop) for loop in ("dispatch", "scan")] + [
    get_engine(name) for name in ("both", "vmap", "none")]


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name + (f"-{e.loop}" if e.uses_loop
                                                                     else ""))
def test_every_whole_network_engine_matches_the_oracle(engine, masked):
    params, x, y, per_example, clip = _case()
    mask = jnp.array([1.0, 0.0, 1.0, 1.0]) if masked else None
    expected = expected_clipped_sum(engine, TIED.loss, params, x, y, per_example, clip,
                                    mask=None if mask is None else np.asarray(mask))
    got = flatten(clipped_grad_sum(engine, TIED.loss, params, x, y, clip, mask=mask))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())


@pytest.mark.parametrize("mode", GHOST_MODES)
def test_ghost_refuses_the_tied_table_by_default(mode):
    params, x, y, _, clip = _case()
    with pytest.raises(GhostUnsupported, match=r"tokens/embeddings .*tied or reused"):
        clipped_grad_sum(get_engine("ghost", mode=mode), TIED.loss, params, x, y, clip)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("mode", GHOST_MODES)
def test_ghost_materialising_the_tied_table_is_exact(mode, masked):
    """The fallback computes the table's per-example gradients whole (both uses), the other
    layers by their rules: the clipped sum is the oracle's, and so is every example's norm."""
    from ablation.core.clipping import per_example_sq_norms
    params, x, y, per_example, clip = _case()
    norms = np.sqrt(np.asarray(per_example_sq_norms(TIED.loss, params, x, y, "materialise"),
                               np.float64))
    np.testing.assert_allclose(norms, [np.linalg.norm(g) for g in per_example], rtol=1e-4)
    mask = np.array([1.0, 1.0, 0.0, 1.0]) if masked else None
    expected = reference_clipped_sum(per_example, clip, mask=mask, norms=norms)
    engine = get_engine("ghost", mode=mode, fallback="materialise")
    got = flatten(clipped_grad_sum(engine, TIED.loss, params, x, y, clip,
                                   mask=None if mask is None else jnp.asarray(mask)))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())


def test_ghost_check_reports_the_fallback():
    from ablation.core.clipping import layer_rules
    params, x, y, _, _ = _case()
    rules = layer_rules(TIED.loss, params, x[0], y[0], fallback="materialise")
    assert rules["tokens"].startswith("fallback: materialised")
    assert not any(r.startswith("fallback") for s, r in rules.items() if s != "tokens")


# -- the frameworks ----------------------------------------------------------------------------


def _torch_twin(params):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (make torch)")
    from ablation.reference import torch_nets
    module = torch_nets.build("transformer", tied=True)
    torch_nets.load_haiku_params(module, params, "transformer")
    return torch, torch_nets, module


def test_the_torch_twin_computes_the_same_logits():
    params, x, _, _, _ = _case()
    torch, torch_nets, module = _torch_twin(params)
    assert torch_nets.count_params(module) == 706_752
    with torch.no_grad():
        got = module(torch.from_numpy(np.array(x)).long()).numpy()
    np.testing.assert_allclose(got, np.asarray(TIED.logits(params, x)), rtol=1e-4, atol=1e-6)


def test_opacus_refuses_the_tied_table_because_its_per_example_gradients_miss_a_use():
    pytest.importorskip("opacus", reason="Opacus is not installed (make torch)")
    from opacus import GradSampleModule

    from ablation.reference import opacus as rows
    params, x, y, per_example, clip = _case()
    torch, torch_nets, module = _torch_twin(params)
    xt, yt = torch.from_numpy(np.array(x)).long(), torch.from_numpy(np.array(y)).long()
    # Why: Opacus' per-example gradient of the table is not the example's gradient.
    probe = GradSampleModule(torch_nets.build("transformer", tied=True), batch_first=True,
                             loss_reduction="sum")
    torch_nets.load_haiku_params(probe._module, params, "transformer")
    (torch.nn.functional.cross_entropy(probe(xt), yt, reduction="sum")).backward()
    opacus_table = probe._module.tokens.weight.grad_sample.detach().numpy().astype(np.float64)
    size = int(np.prod(params["tokens"]["embeddings"].shape))
    offset = sum(int(np.prod(leaf.shape)) for scope in sorted(params) if scope < "tokens"
                 for leaf in params[scope].values())
    true_table = np.stack([g[offset:offset + size] for g in per_example])
    gap = np.linalg.norm(opacus_table.reshape(len(x), -1) - true_table) / np.linalg.norm(true_table)
    assert gap > 0.01, "Opacus' per-example gradients now see the tied use: lift the refusal"
    for mode in ("hooks", "ghost", "functorch"):
        with pytest.raises(rows.OpacusUnsupported, match=r"tokens\.weight .*tied weights"):
            rows.clipped_grad_sum(module, "transformer", xt, yt, clip, mode=mode)
    # ... and the untied transformer passes the same check.
    untied = torch_nets.build("transformer")
    rows.check_per_example_gradients(untied, "transformer", xt[:2], yt[:2])


def test_pyvacy_and_jax_privacy_clipped_sums_equal_ours():
    params, x, y, _, clip = _case()
    torch, torch_nets, module = _torch_twin(params)
    from ablation.reference import pyvacy
    expected = clipped_grad_sum("both", TIED.loss, params, x, y, clip)
    got = pyvacy.microbatch_clipped_sum(module, "transformer", torch.from_numpy(np.array(x)).long(),
                                        torch_nets.targets_for("transformer",
                                                               torch.from_numpy(np.array(y))),
                                        clip)
    _close(got, torch_nets.haiku_to_torch("transformer", expected, gradient=True), "pyvacy")
    pytest.importorskip("jax_privacy", reason="jax-privacy is not installed (make torch)")
    from ablation.reference import jax_privacy as rows
    _close(jax.tree.leaves(rows.clipped_sum(TIED.loss, params, x, y, clip)),
           jax.tree.leaves(expected), "jax_privacy")


def _close(got, wanted, what: str) -> None:
    """Leaf by leaf, the absolute tolerance relative to the largest entry of any leaf (the key
    bias's true gradient is 0: its entries are rounding)."""
    got = [np.asarray(g.detach().numpy() if hasattr(g, "detach") else g) for g in got]
    wanted = [np.asarray(w) for w in wanted]
    assert len(got) == len(wanted), what
    scale = max(float(np.abs(w).max()) for w in wanted)
    for g, w in zip(got, wanted):
        np.testing.assert_allclose(g.reshape(w.shape), w, rtol=FRAMEWORK_RTOL,
                                   atol=FRAMEWORK_ATOL * scale, err_msg=what)


def test_tf_privacy_clipped_sum_equals_ours(tmp_path):
    """The Keras twin reads the class vectors from its Embedding layer's own variable."""
    from tests.test_frameworks import NEEDS_TF, TF_ENCODER_SCRIPT, _run_in_tf
    if NEEDS_TF.args[0]:
        pytest.skip(NEEDS_TF.kwargs["reason"])
    params, x, y, _, clip = _case(tokens=256)  # the Keras twin's input is 256 tokens
    expected = clipped_grad_sum("both", TIED.loss, params, x, y, clip)
    script = TF_ENCODER_SCRIPT.replace('mode=mode)', 'mode=mode, tied=True)').replace(
        'tfp.build(str(case["name"]))', 'tfp.build(str(case["name"]), True)')
    out = _run_in_tf(script, tmp_path, "transformer", params, np.asarray(x), np.asarray(y), clip,
                     timeout=900)
    names = [str(n).rsplit("/", 1) for n in out["names"]]
    assert ["tokens", "embeddings"] in names and not any(s == "head" for s, _ in names)
    wanted = [np.asarray(expected[scope][leaf]) for scope, leaf in names]
    for mode in ("vectorized", "loop"):
        _close([out[f"{mode}_{i}"] for i in range(len(wanted))], wanted, f"tfp[{mode}]")


# -- the command line --------------------------------------------------------------------------


def test_model_tied_is_a_transformer_option():
    from ablation.sweep.config import ConfigError, cell_from_dict
    cell = cell_from_dict({"model": {"name": "transformer", "tied": True}})
    assert cell.tied is True
    assert cell_from_dict({"model": {"name": "transformer"}}).tied is False
    with pytest.raises(ConfigError, match="model.tied applies to model=transformer only"):
        cell_from_dict({"model": {"name": "vit", "tied": True}})


def test_one_sweep_on_the_tied_transformer(tmp_path):
    """Whole-network engines run it; ghost is a refusal record unless it materialises the table
    (then it is its own row, ``ghost[materialise]``); Opacus is a refusal record that says why;
    the model is labelled ``transformer[tied]`` and never pairs with the untied one."""
    engines = "both,ghost,ghost_materialise,opacus"
    proc = run_cli("ablation.run", "-m", f"engine={engines}", "model=transformer",
                   "model.tied=true", "batch_size=2", "data.limit=32", *QUICK,
                   output_dir=tmp_path)
    frame = results.load(tmp_path)
    assert proc.returncode == 0, proc.stderr  # refusals are records, not a failed sweep
    assert set(frame["tied"]) == {True}
    by = {(e, f): row for e, f, (_, row) in zip(
        frame["engine"], frame["ghost_fallback"].fillna(""), frame.iterrows())}
    assert by[("both", "")]["status"] == "ok"
    assert by[("ghost", "materialise")]["status"] == "ok"
    assert by[("ghost", "error")]["status"] == "error"
    assert "tokens/embeddings" in by[("ghost", "error")]["error"]
    opacus_row = by[("opacus", "")]
    if opacus_row["error"] and "torch extra" in opacus_row["error"]:
        pytest.skip("the torch extra is not installed")
    assert opacus_row["status"] == "error" and "tied weights" in opacus_row["error"]
    from ablation.report.analysis import timing_frame
    timing = timing_frame(frame)
    assert set(timing["model"]) == {"transformer[tied]"}
    assert set(timing["engine_label"]) == {"both", "ghost[materialise]"}
