"""Every engine computes the same clipped gradient sum as a naive float64 reference."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import ENGINES, LOOPS, Engine, clipped_grad_sum, get_engine
from ablation.core.clipping import per_example_sq_norms
from ablation.core.engines import GHOST_MODES, clipped_grad, global_norm
from ablation.core.taps import GhostUnsupported, LayeredLoss
from tests.conftest import (expected_clipped_sum, flatten, reference_clipped_sum,
                            reference_per_example_grads)

PAPER_VARIANTS = [get_engine("jit", loop) for loop in LOOPS] + [
    ENGINES[name] for name in ("both", "vmap", "none")]
GHOST_VARIANTS = [get_engine("ghost", mode=mode) for mode in GHOST_MODES]
ENGINE_VARIANTS = PAPER_VARIANTS + GHOST_VARIANTS
ENGINE_IDS = [f"{e.name}-{e.loop}" if e.uses_loop else
              f"ghost-{e.ghost}" if e.ghost else e.name for e in ENGINE_VARIANTS]

# Engines run in float32 and the oracle in float64: float32 rounding through up to ~10 layers
# (cifar10) stays well inside these.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def oracle(model_case):
    model, params, x, y = model_case
    per_example = reference_per_example_grads(model.loss, params, x, y)
    norms = [np.linalg.norm(g) for g in per_example]
    # C between the smallest and largest per-example norm: some examples are clipped, some not.
    clip = float(np.median(norms))
    return per_example, norms, clip


@pytest.mark.parametrize("engine", ENGINE_VARIANTS, ids=ENGINE_IDS)
def test_engine_matches_float64_reference(engine, model_case, oracle):
    model, params, x, y = model_case
    per_example, norms, clip = oracle
    assert min(norms) < clip < max(norms) or len(set(norms)) == 1
    expected = expected_clipped_sum(engine, model.loss, params, x, y, per_example, clip)
    got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("engine", ENGINE_VARIANTS, ids=ENGINE_IDS)
def test_masked_slots_contribute_nothing(engine, model_case, oracle):
    model, params, x, y = model_case
    per_example, _, clip = oracle
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])
    expected = expected_clipped_sum(engine, model.loss, params, x, y, per_example, clip,
                                    mask=np.asarray(mask))
    got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip, mask=mask))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(1.0, np.abs(expected).max()))


def _assert_matches_the_oracle(engine, model, *, batch: int) -> None:
    """The engine's clipped sum on a small batch of ``model`` equals the float64 oracle's, at a
    clip norm (the median per-example norm) that clips about half the examples."""
    from tests.conftest import small_batch
    params = model.init(jax.random.key(1))
    x, y = small_batch(model, batch, seed=2)
    per_example = reference_per_example_grads(model.loss, params, x, y)
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    expected = expected_clipped_sum(engine, model.loss, params, x, y, per_example, clip)
    got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())


@pytest.mark.parametrize("engine", ENGINE_VARIANTS, ids=ENGINE_IDS)
def test_every_engine_matches_the_oracle_with_the_papers_max_pool(engine):
    """Issue 18: the cnn with hk.MaxPool (model.pool=xla) agrees too, in every engine."""
    from models import get_model
    _assert_matches_the_oracle(engine, get_model("cnn", pool="xla"), batch=4)


def _small_encoder_case(name: str):
    """A small instance of the transformer (8 tokens) or the vit (8×8 images: 4 patches):
    the same parameters, fewer positions (the position table's first rows)."""
    from models import MODELS
    model = MODELS[name]
    params = model.init(jax.random.key(1))
    kx, ky = jax.random.split(jax.random.key(2))
    x = (jax.random.randint(kx, (4, 8), 0, model.dataset.vocab_size, jnp.int32)
         if name == "transformer" else jax.random.uniform(kx, (4, 8, 8, 3), jnp.float32))
    y = jax.random.randint(ky, (4,), 0, model.dataset.num_classes, jnp.int32)
    return model, params, x, y


# The eager engines' masked runs (10-15 s each) only in the slow suite: the mask's handling
# there is the compiled engines' code run op by op, and test_masked_slots_contribute_nothing
# covers it on every paper model.
_ENCODER_CASES = [pytest.param(engine, masked, id=f"{label}-{'masked' if masked else 'all'}",
                               marks=[pytest.mark.slow] if masked and not engine.jit else [])
                  for engine, label in zip(ENGINE_VARIANTS, ENGINE_IDS) for masked in (False, True)]


@pytest.mark.parametrize("name", ["transformer", "vit"])
@pytest.mark.parametrize("engine, masked", _ENCODER_CASES)
def test_every_engine_matches_the_oracle_on_the_encoders(engine, masked, name):
    """Issue 24: every engine (ghost by its rules alone: embeddings, dense layers over
    positions, layer norms, the patches convolution) equals the float64 oracle."""
    model, params, x, y = _small_encoder_case(name)
    per_example = reference_per_example_grads(model.loss, params, x, y)
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    mask = jnp.array([1.0, 0.0, 1.0, 1.0]) if masked else None
    expected = expected_clipped_sum(engine, model.loss, params, x, y, per_example, clip,
                                    mask=None if mask is None else np.asarray(mask))
    got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip, mask=mask))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())


def test_infinite_clip_norm_is_plain_gradient_sum(model_case, oracle):
    model, params, x, y = model_case
    per_example, _, _ = oracle
    got = flatten(clipped_grad_sum("both", model.loss, params, x, y, math.inf))
    expected = np.sum(per_example, axis=0)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(1.0, np.abs(expected).max()))


def _quadratic_loss(params, x1, y1):
    """loss = ½‖w − x‖²: its gradient w − x has an exactly known norm."""
    return 0.5 * jnp.sum(jnp.square(params["w"] - x1)) + 0.0 * y1


@pytest.mark.parametrize("norm, clip", [(5.0, 1.0), (0.5, 1.0), (3.0, 3.0), (0.0, 1.0)])
def test_clipped_gradient_norm_is_at_most_c(norm, clip):
    params = {"w": jnp.zeros(4)}
    direction = jnp.array([1.0, -2.0, 2.0, 4.0]) / 5.0  # unit vector
    x1 = -norm * direction  # gradient w - x = norm * direction
    g = clipped_grad(_quadratic_loss, params, x1, jnp.int32(0), clip)
    got = float(global_norm(g))
    assert got <= clip * (1 + 1e-6)
    if norm <= clip:  # a gradient already below C is unchanged
        np.testing.assert_array_equal(np.asarray(g["w"]), np.asarray(params["w"] - x1))
    else:
        assert got == pytest.approx(clip, rel=1e-6)


def test_each_engine_clips_each_example():
    """Examples with norms 0.5, 2, 10: summed clipped norms equal 0.5 + 1 + 1 along one axis."""
    params = {"w": jnp.zeros(3)}
    x = -jnp.array([[0.5, 0, 0], [2.0, 0, 0], [10.0, 0, 0]])
    y = jnp.zeros(3, jnp.int32)
    for engine in PAPER_VARIANTS:  # (the ghost engine needs a network's layers)
        total = clipped_grad_sum(engine, _quadratic_loss, params, x, y, 1.0)
        np.testing.assert_allclose(np.asarray(total["w"]), [2.5, 0, 0], rtol=1e-6)


# -- the ghost engine's own guarantees (issue 14) ---------------------------------------------


def test_ghost_norms_bound_the_true_norms(model_case, oracle):
    """The rules' norms are never below the true ones (beyond float32 rounding, 1e-6), and
    above them by at most the Gram form's documented over-clipping (√(1 + tolerance) − 1 in
    the norm); models without a Gram-form layer agree to rounding."""
    from ablation.core.rules.dense import GRAM_TOLERANCE
    model, params, x, y = model_case
    _, norms, _ = oracle
    got = np.sqrt(np.asarray(per_example_sq_norms(model.loss, params, x, y), np.float64))
    ratio = got / np.asarray(norms)
    assert ratio.min() >= 1 - 1e-6, ratio
    gram = model.name in ("cnn", "cifar10")  # the layers where the cost rule picks Gram
    assert ratio.max() <= 1 + (np.sqrt(1 + GRAM_TOLERANCE) - 1 if gram else 1e-5), ratio


def test_ghost_handles_non_finite_padded_slots(model_case, oracle):
    """A padded slot holding inf (or a garbage label) contributes exactly nothing."""
    model, params, x, y = model_case
    per_example, _, clip = oracle
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = x.at[1].set(jnp.inf)
    mask = jnp.array([1.0, 0.0, 1.0, 1.0])
    expected = expected_clipped_sum("ghost", model.loss, params, x, y, per_example, clip,
                                    mask=np.asarray(mask))
    for engine in GHOST_VARIANTS:
        got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip, mask=mask))
        np.testing.assert_allclose(got, expected, rtol=RTOL,
                                   atol=ATOL * max(1.0, np.abs(expected).max()))


def test_ghost_static_lstm_matches_the_oracle():
    """The paper's unrolled lstm is tapped the same way as the scanned one."""
    from models import get_model
    _assert_matches_the_oracle("ghost", get_model("lstm", unroll="static"), batch=3)


def _layered(fn, binary=False):
    from models.registry import softmax_cross_entropy
    return LayeredLoss(network=fn, output_loss=softmax_cross_entropy)


def test_ghost_refuses_a_layer_no_rule_covers():
    import haiku as hk

    class Scale(hk.Module):  # a hand-written parameter: no rule knows it
        def __call__(self, x):
            return x * hk.get_parameter("s", x.shape[-1:], init=jnp.ones)

    def net(x):
        return hk.Linear(2)(Scale()(x))

    loss = _layered(net)
    params = loss.transformed.init(jax.random.key(0), jnp.zeros((1, 3)))
    x, y = jnp.ones((2, 3)), jnp.zeros(2, jnp.int32)
    with pytest.raises(GhostUnsupported, match="no clipping rule covers the parameters of "
                                               "'scale' \\(s\\).*engine.fallback=materialise"):
        clipped_grad_sum("ghost", loss, params, x, y, 1.0)


def test_ghost_refuses_a_layer_applied_twice():
    import haiku as hk

    def net(x):
        layer = hk.Linear(3)
        return layer(jax.nn.relu(layer(x)))[:, :2]

    loss = _layered(net)
    params = loss.transformed.init(jax.random.key(0), jnp.zeros((1, 3)))
    with pytest.raises(GhostUnsupported, match="'linear' is applied more than once"):
        clipped_grad_sum("ghost", loss, params, jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), 1.0)


def test_ghost_is_exact_for_a_layer_fed_reshaped_rows():
    """A layer fed an example's rows reshaped ([2, d] per example, [B·2, d] in a batch) is
    exact: each example's pass sees a batch of one, so the rows it gives the layer are its own
    (the old engine, which tapped the batched pass, had to refuse this network)."""
    import haiku as hk

    def net(x):
        b = x.shape[0]
        return hk.Linear(2)(hk.Linear(3)(x.reshape(b * 2, 2)).reshape(b, 6))

    loss = _layered(net)
    params = loss.transformed.init(jax.random.key(0), jnp.zeros((1, 4)))
    x = jax.random.normal(jax.random.key(1), (3, 4))
    y = jnp.array([0, 1, 1])
    per_example = reference_per_example_grads(loss, params, x, y)
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    got = flatten(clipped_grad_sum("ghost", loss, params, x, y, clip))
    np.testing.assert_allclose(got, reference_clipped_sum(per_example, clip), rtol=1e-5,
                               atol=1e-7)


def test_ghost_refuses_a_plain_function_loss():
    with pytest.raises(GhostUnsupported, match="LayeredLoss"):
        clipped_grad_sum("ghost", _quadratic_loss, {"w": jnp.zeros(3)}, jnp.zeros((2, 3)),
                         jnp.zeros(2, jnp.int32), 1.0)


@pytest.mark.parametrize("positions, d, p, gram", [(1, 5, 5, None), (256, 200, 400, False),
                                                   (16, 1152, 256, True)])
def test_dense_rule_picks_the_cheaper_form_and_both_are_exact(positions, d, p, gram):
    from ablation.core.rules import dense
    if gram is not None:
        assert dense.prefers_gram(positions, d, p) is gram
    a = jax.random.normal(jax.random.key(0), (2, min(positions, 8), 6))
    g = jax.random.normal(jax.random.key(1), (2, min(positions, 8), 4))
    expected = np.sum(np.square(np.einsum("btd,btp->bdp", a, g)), axis=(1, 2)) + \
        np.sum(np.square(np.sum(np.asarray(g), axis=1)), axis=-1)
    for prefer in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dense, "prefers_gram", lambda *_: prefer)
            got = dense.dense_sq_norms(a, g, ("w", "b"))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_embed_rule_sums_repeated_ids_first():
    from ablation.core.rules.embed import embed_sq_norms
    ids = jnp.array([[3, 1, 3, 3], [0, 1, 2, 2]])
    g = jax.random.normal(jax.random.key(0), (2, 4, 5))
    gn = np.asarray(g)
    first = np.sum((gn[0, 0] + gn[0, 2] + gn[0, 3]) ** 2) + np.sum(gn[0, 1] ** 2)
    second = np.sum(gn[1, 0] ** 2) + np.sum(gn[1, 1] ** 2) + np.sum((gn[1, 2] + gn[1, 3]) ** 2)
    for vocab in (10, 2 ** 30):  # packed keys, and the argsort path for a huge vocabulary
        np.testing.assert_allclose(np.asarray(embed_sq_norms(ids, g, vocab)), [first, second],
                                   rtol=1e-5)


def _embed_reference(ids, g, vocab):
    """Float64 per-example norms and the weighted table, row by row, as hk.Embed's gradient
    lands: an id below 0 wraps once, one still outside [0, V) adds nothing."""
    ids, g = np.asarray(ids), np.asarray(g, np.float64)
    c = np.linspace(0.25, 1.0, len(ids))
    norms, table = [], np.zeros((vocab, g.shape[-1]))
    for i, (row_ids, row_g) in enumerate(zip(ids, g)):
        rows = {}
        for v, gt in zip(row_ids, row_g):
            v = v + vocab if v < 0 else v
            if 0 <= v < vocab:
                rows[v] = rows.get(v, 0) + gt
        norms.append(sum(np.sum(r ** 2) for r in rows.values()))
        for v, r in rows.items():
            table[v] += c[i] * r
    return np.array(norms), table, c


@pytest.mark.parametrize("grouping", ["buckets", "sort", "argsort"])
def test_every_embed_grouping_is_exact_on_adversarial_ids(grouping, monkeypatch):
    """Issue 25: the sort-free grouping (a table of first positions) and the sorts agree with
    the float64 reference on ids built to break them: all equal, all distinct, the table's
    ends, negative ids that wrap (and one that does not), ids past the table."""
    from ablation.core.rules import embed as clipping
    vocab, steps = 11, 9
    ids = jnp.array([[4] * steps, list(range(steps)), [0, 10, 0, 10, 10, 0, 5, 5, 0],
                     [-1, 10, -11, 0, -12, 11, 99, -1, 3], [2, 2, 11, 2, -5, 6, 6, 2, 2]],
                    jnp.int32)
    g = jax.random.normal(jax.random.key(3), (*ids.shape, 5))
    monkeypatch.setattr(clipping, "prefers_buckets", lambda *_: grouping == "buckets")
    if grouping == "argsort":  # ids too large to pack beside a position
        monkeypatch.setattr(clipping, "_group_by_sorting", functools.partial(
            clipping._group_by_sorting, pack=False))
    rule = clipping.embed_norms(ids, g, vocab)
    norms, table, c = _embed_reference(ids, g, vocab)
    np.testing.assert_allclose(np.asarray(rule.sq), norms, rtol=1e-5)
    got = rule.exact_sum(jnp.asarray(c, jnp.float32))["embeddings"]
    np.testing.assert_allclose(np.asarray(got), table, rtol=1e-5, atol=1e-6)


def test_the_embed_grouping_is_chosen_by_cost():
    from ablation.core.rules.embed import prefers_buckets
    assert prefers_buckets(256, 10_004)  # IMDb: the table of first positions
    assert not prefers_buckets(16, 10_004)  # a short sequence: the sort
    assert not prefers_buckets(256, 10 ** 7)  # a huge vocabulary: the sort


# -- bad input ---------------------------------------------------------------------------------


def test_unknown_engine_lists_valid_names():
    with pytest.raises(ValueError, match="both, jit, vmap, none"):
        get_engine("fast")
    with pytest.raises(ValueError, match="dispatch, unrolled, scan"):
        Engine("jit", True, False, loop="while")


@pytest.mark.parametrize("x_len, y_len, clip, message", [
    (0, 0, 1.0, "empty"),
    (3, 2, 1.0, "different numbers of examples: 3 vs 2"),
    (3, 3, float("nan"), "clip_norm must be a positive number or inf, got nan"),
    (3, 3, 0.0, "clip_norm must be a positive number"),
    (3, 3, -1.0, "clip_norm must be a positive number"),
])
def test_bad_batch_or_clip_is_a_one_line_error(x_len, y_len, clip, message):
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match=message) as info:
        clipped_grad_sum("both", _quadratic_loss, params, jnp.zeros((x_len, 3)),
                         jnp.zeros((y_len,), jnp.int32), clip)
    assert "\n" not in str(info.value)


def _memory_gib() -> float:
    """This machine's memory (``inf`` where /proc/meminfo cannot say)."""
    try:
        with open("/proc/meminfo") as info:
            kib = next(int(line.split()[1]) for line in info if line.startswith("MemTotal"))
        return kib / 2**20
    except (OSError, StopIteration, ValueError):
        return math.inf


#: The static unroll's compile holds ~20 GB at its peak and takes over 15 minutes.
_STATIC_LSTM = pytest.param("static", marks=[
    pytest.mark.slow, pytest.mark.heavy,
    pytest.mark.skipif(_memory_gib() < 22, reason="needs ~20 GB of memory")])


@pytest.mark.parametrize("unroll", [_STATIC_LSTM, "dynamic"])
def test_full_length_lstm_engines_agree(unroll):
    """The lstm at its real 256 tokens (the other tests shorten sequences to keep compiles
    short): compiled, scanned and eager per-example sums agree with the oracle. The default
    (dynamic) unroll runs in the default suite; the paper's static unroll, minutes to
    compile, is a slow test."""
    from models import get_model
    model = get_model("lstm", unroll=unroll)
    params = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (3, 256), 0, 10_000)
    y = jnp.array([0, 1, 1])
    per_example = reference_per_example_grads(model.loss, params, x, y)
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    expected = reference_clipped_sum(per_example, clip)
    engines = [ENGINES["both"], get_engine("jit", "scan")]
    if unroll == "static":  # the slow test also runs the eager vmap step (a minute)
        engines.append(ENGINES["vmap"])
    for engine in engines:
        got = flatten(clipped_grad_sum(engine, model.loss, params, x, y, clip))
        np.testing.assert_allclose(got, expected, rtol=RTOL,
                                   atol=ATOL * max(1.0, np.abs(expected).max()), err_msg=engine.name)
