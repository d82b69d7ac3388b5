"""The ghost engine is exact or refused (issue 21): one test per way it once released a sum in
which an example counted for more than C, then a randomised and an adversarial search.

Each network is built here from stock Haiku layers. "Exact" means equal to the float64
per-example oracle (the vmap engine's semantics: the batch-of-one loss of every example);
"refused" means a ``GhostUnsupported`` naming the layer or parameter, in one line.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import clipped_grad_sum
from ablation.core.clipping import per_example_sq_norms
from ablation.core.rules.dense import GRAM_TOLERANCE, prefers_gram
from ablation.core.taps import GhostUnsupported, LayeredLoss, register_equivalent
from models.registry import softmax_cross_entropy
from tests.conftest import (contributions, flatten, reference_clipped_sum,
                            reference_per_example_grads)

GHOST = ("ghost", "ghost_two_pass")
#: Float32 rounding through a few layers is ~1e-6 of the sum's scale; a wrong rule moves the
#: sum by ≥ 1e-2 of it (a missing use, a wrong id group, an unclipped example).
RTOL, ATOL = 2e-5, 2e-6


def _engine(name):
    from ablation import get_engine
    return get_engine("ghost", mode="two_pass") if name == "ghost_two_pass" else name


def _loss(net, output_loss=softmax_cross_entropy) -> LayeredLoss:
    return LayeredLoss(network=net, output_loss=output_loss)


def _init(loss, x):
    return loss.transformed.init(jax.random.key(0), x[:1])


def _labels(n, k=2, seed=3):
    return jax.random.randint(jax.random.key(seed), (n,), 0, k)


def _assert_exact(loss, params, x, y, clip=None, mask=None, engines=GHOST):
    """Each ghost mode's clipped sum equals the float64 oracle's (true norms, or the rules'
    own where the Gram bound may over-clip, which test_engines holds to its tolerance)."""
    per_example = reference_per_example_grads(loss, params, x, y)
    kept = [np.linalg.norm(g) for i, g in enumerate(per_example) if mask is None or mask[i] > 0]
    clip = float(np.median(kept)) if clip is None else clip
    expected = reference_clipped_sum(per_example, clip, mask=mask)
    scale = max(1.0, np.abs(expected).max())
    for name in engines:
        got = flatten(clipped_grad_sum(_engine(name), loss, params, x, y, clip, mask=mask))
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * scale, err_msg=name)


def _assert_refused(loss, params, x, y, match):
    for name in GHOST:
        with pytest.raises(GhostUnsupported, match=match) as info:
            clipped_grad_sum(_engine(name), loss, params, x, y, 1.0)
        assert "\n" not in str(info.value).split("\n-----")[0]


# -- every parameter is accounted for ---------------------------------------------------------


def test_tied_embedding_reused_as_the_output_projection_is_refused():
    """Before: the second use was invisible (a clipped example reached 1.28–4.4·C)."""
    def net(ids):
        embed = hk.Embed(12, 5)
        h = jax.nn.relu(hk.Linear(5)(embed(ids).mean(axis=1)))
        return h @ embed.embeddings.T  # the usual tied-output idiom: [B, 12] logits

    loss = _loss(net)
    x = jax.random.randint(jax.random.key(1), (4, 6), 0, 12)
    _assert_refused(loss, _init(loss, x), x, _labels(4, 12),
                    r"parameter embed/embeddings is used by its layer 'embed' and also "
                    r"outside any tapped layer")


def test_a_layers_weights_reused_through_params_dict_are_refused():
    def net(x):
        first = hk.Linear(4)
        h = jax.nn.tanh(first(x))
        w = first.params_dict()["linear/w"]  # [3, 4], reused by hand
        return hk.Linear(2)(h + x @ w)

    loss = _loss(net)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    _assert_refused(loss, _init(loss, x), x, _labels(4), r"parameter linear/w is used")


def test_a_subclass_that_overrides_call_is_refused_unless_registered():
    """Before: isinstance accepted it and the rule differentiated hk.Linear, not the subclass
    (1.53·C)."""
    class Doubled(hk.Linear):
        def __call__(self, inputs, *, precision=None):
            return 2.0 * super().__call__(inputs, precision=precision)

    class Named(hk.Linear):  # adds nothing to the arithmetic
        def describe(self):
            return f"linear of {self.output_size}"

    def net_with(cls):
        return lambda x: hk.Linear(2)(jax.nn.relu(cls(4)(x)))

    x = jax.random.normal(jax.random.key(1), (4, 3))
    doubled = _loss(net_with(Doubled))
    _assert_refused(doubled, _init(doubled, x), x, _labels(4),
                    r"'doubled' is a Doubled, a subclass of hk.Linear")
    named = _loss(net_with(Named))
    params = _init(named, x)
    _assert_refused(named, params, x, _labels(4), r"'named' is a Named")
    register_equivalent(Named, hk.Linear)
    _assert_exact(named, params, x, _labels(4))


def test_a_custom_getter_is_refused():
    def scaled(next_getter, value, context):
        return next_getter(3.0 * value)

    def net(x):
        with hk.custom_getter(scaled):
            h = jax.nn.relu(hk.Linear(4)(x))
        return hk.Linear(2)(h)

    loss = _loss(net)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    _assert_refused(loss, _init(loss, x), x, _labels(4), r"'linear' runs under hk.custom_getter")


@pytest.mark.parametrize("wrapper", ["remat", "dynamic_unroll"])
def test_layers_inside_haiku_transformations_are_refused_by_name(wrapper):
    """Before: a raw UnexpectedTracerError."""
    if wrapper == "remat":
        def net(x):
            return hk.Linear(2)(hk.remat(lambda h: jax.nn.relu(hk.Linear(3)(h)))(x))
        x = jax.random.normal(jax.random.key(1), (4, 3))
    else:
        def net(x):
            core = hk.VanillaRNN(3)
            out, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0]))
            return hk.Linear(2)(out[-1])
        x = jax.random.normal(jax.random.key(1), (4, 5, 3))
    loss = _loss(net)
    _assert_refused(loss, _init(loss, x), x, _labels(4),
                    r"layer '[^']+' runs inside a Haiku transformation")


# -- examples cannot interact -----------------------------------------------------------------


@pytest.mark.parametrize("mixing", ["batch_mean", "pairwise"])
def test_a_network_that_mixes_examples_gets_each_examples_own_gradient(mixing):
    """Before: ghost differentiated the batched pass (replace-one sensitivity 4.94·C). Now each
    example's pass sees a batch of one, as under every other engine."""
    def net(x):
        h = jax.nn.tanh(hk.Linear(4)(x))
        if mixing == "batch_mean":
            h = h - h.mean(axis=0, keepdims=True)
        else:
            h = h + (h @ h.T) @ h / h.shape[0]
        return hk.Linear(2)(h)

    loss = _loss(net)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    _assert_exact(loss, _init(loss, x), x, _labels(5))


# -- bad inputs -------------------------------------------------------------------------------


def test_out_of_range_ids_map_as_the_lookup_maps_them():
    """Before: raw ids were grouped, so -3 and 7 (the same row of a 10-row table) were two
    groups (1.09·C, up to √2·C). Ids ≥ V and below -V get no gradient (as the lookup's)."""
    def net(ids):
        return hk.Linear(2)(jnp.tanh(hk.Embed(10, 4)(ids)).reshape(ids.shape[0], -1))

    loss = _loss(net)
    x = jnp.array([[7, -3, 7, 2], [12, 12, -15, 1], [-1, 9, 9, -10], [3, 3, 3, 3]])
    params = _init(loss, x)
    _assert_exact(loss, params, x, _labels(4))
    # A tiny clip norm clips every example: the released sum of one example is then C.
    clip = 1e-3
    for i in range(4):
        mask = jnp.zeros(4).at[i].set(1.0)
        total = flatten(clipped_grad_sum("ghost", loss, params, x, _labels(4), clip, mask=mask))
        assert np.linalg.norm(total) <= clip * (1 + 1e-6)


@pytest.mark.parametrize("mode", GHOST)
def test_a_padded_slot_where_the_network_is_nan_at_zero_contributes_nothing(mode):
    """Before: padded inputs were zeroed and then multiplied by 0 (0·NaN): 35 of 39
    coordinates of the sum were NaN. Padded slots now hold a copy of a kept example."""
    def net(x):
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # NaN at x = 0
        return hk.Linear(3)(jax.nn.relu(hk.Linear(6)(x)))

    loss = _loss(net)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    params = _init(loss, x)
    x = x.at[1].set(0.0).at[3].set(jnp.nan)
    y = _labels(5, 3)
    mask = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0])
    _assert_exact(loss, params, x, y, mask=np.asarray(mask), engines=(mode,))
    nothing = clipped_grad_sum(_engine(mode), loss, params, x, y, 1.0, mask=jnp.zeros(5))
    assert not np.any(flatten(nothing))  # every slot padded: exact zeros


def test_the_non_private_batched_gradient_also_skips_nan_padded_slots():
    from ablation.core.engines import batched_sum

    def net(x):
        return hk.Linear(2)(x / jnp.linalg.norm(x, axis=-1, keepdims=True))

    loss = _loss(net)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    params = _init(loss, x)
    y = _labels(4)
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    expected = np.sum(reference_per_example_grads(loss, params, x[jnp.array([0, 1, 3])],
                                                  y[jnp.array([0, 1, 3])]), axis=0)
    got = flatten(batched_sum(loss, params, x.at[2].set(0.0), y, mask=mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("classes", [3, 4])
def test_labels_of_shape_b_by_k_are_masked_along_the_batch(classes):
    """Before: ``where(keep, y, 0)`` broadcast the [B] mask along K (error 0.81 for K = B)."""
    def soft_cross_entropy(logits, target):
        return -jnp.sum(target * jax.nn.log_softmax(logits))

    def net(x):
        return hk.Linear(classes)(jax.nn.tanh(hk.Linear(5)(x)))

    loss = _loss(net, soft_cross_entropy)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jax.nn.softmax(jax.random.normal(jax.random.key(2), (4, classes)))
    _assert_exact(loss, _init(loss, x), x, y, mask=np.array([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("engine", ["both", "jit", "vmap", "none", "ghost"])
def test_a_clip_norm_below_float32s_normal_range_is_a_one_line_error(engine):
    """Before: 1e-40 became float32 0 and every entry 0/0 = NaN."""
    loss = _loss(lambda x: hk.Linear(2)(x))
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="clip_norm must be at least 1e-30") as info:
        clipped_grad_sum(engine, loss, _init(loss, x), x, _labels(2), 1e-40)
    assert "\n" not in str(info.value)


def test_dp_config_refuses_a_denormal_clip_norm():
    from ablation import DPConfig
    with pytest.raises(ValueError, match="at least 1e-30"):
        DPConfig(clip_norm=1e-40, noise_multiplier=1.0)


# -- norms are never under-estimated by rounding ----------------------------------------------

GRAM_SHAPE = dict(positions=4, features=64)


def _gram_net(x):
    h = jnp.tanh(hk.Linear(GRAM_SHAPE["features"])(x))  # over 4 positions: the Gram form
    return hk.Linear(2)(h.mean(axis=1))


def _gram_case(offset: float, scale: float = 1.0, seed: int = 1):
    t, d = GRAM_SHAPE["positions"], GRAM_SHAPE["features"]
    assert prefers_gram(t, d, d)
    loss = _loss(_gram_net)
    base = jax.random.normal(jax.random.key(seed), (6, t, d))
    params = _init(loss, base)
    return loss, params, offset + scale * base, _labels(6, seed=seed)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_a_gram_layer_with_a_large_shared_offset_never_under_clips(offset):
    """Before: the Gram form cancelled to 0.963 of the true norm at offset 1e3; at 1e4 two
    examples got norm 0 (C/√0 = ∞, "do not clip") and contributed 1.45·C and 1.46·C."""
    loss, params, x, y = _gram_case(offset)
    true = np.array([np.linalg.norm(g) for g in reference_per_example_grads(loss, params, x, y)])
    rules = np.sqrt(np.asarray(per_example_sq_norms(loss, params, x, y), np.float64))
    assert np.all(rules >= true * (1 - 1e-5)), rules / true
    clip = float(np.min(true)) / 2  # every example clipped
    assert np.all(contributions(loss, params, x, y, clip) <= clip * (1 + 1e-6))


def test_an_adversarial_search_over_offsets_and_scales_cannot_exceed_c():
    """For a Gram-form layer, search the inputs' shared offset and scale for the largest
    released contribution of one example ÷ C: it must stay ≤ 1 + 1e-6."""
    worst = 0.0
    rng = np.random.default_rng(0)
    for trial in range(12):
        offset = float(10 ** rng.uniform(0, 5)) * rng.choice([-1, 1])
        scale = float(10 ** rng.uniform(-4, 1))
        loss, params, x, y = _gram_case(offset, scale, seed=trial)
        true = [np.linalg.norm(g) for g in reference_per_example_grads(loss, params, x, y)]
        clip = float(np.min(true)) / 3
        worst = max(worst, float(np.max(contributions(loss, params, x, y, clip))) / clip)
    assert worst <= 1 + 1e-6, worst


def test_the_gram_bound_over_clips_ordinary_inputs_by_at_most_its_tolerance():
    loss, params, x, y = _gram_case(0.0)
    true = np.array([np.linalg.norm(g) for g in reference_per_example_grads(loss, params, x, y)])
    rules = np.sqrt(np.asarray(per_example_sq_norms(loss, params, x, y), np.float64))
    assert np.all(rules >= true * (1 - 1e-6))
    assert np.all(rules <= true * math.sqrt(1 + GRAM_TOLERANCE))


# -- random networks of the supported layers --------------------------------------------------


def _random_network(rng: np.random.Generator, batch: int):
    """A random network of the supported layers and a batch of input for it."""
    kind = str(rng.choice(["dense", "conv", "embed"]))
    width = int(rng.integers(2, 7))
    if kind == "dense":
        positions, features = int(rng.integers(1, 6)), int(rng.integers(2, 9))
        biases = [bool(b) for b in rng.integers(0, 2, size=int(rng.integers(1, 3)))]

        def net(x):
            h = x
            for bias in biases:
                h = jnp.tanh(hk.Linear(width, with_bias=bias)(h))
            return hk.Linear(3)(h.reshape(h.shape[0], -1))

        x = rng.normal(size=(batch, positions, features))
    elif kind == "conv":
        kernel, stride = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        padding = str(rng.choice(["SAME", "VALID"]))
        dilation = int(rng.integers(1, 3))
        size = int(rng.integers(kernel * dilation + 1, 9))

        def net(x):
            h = jax.nn.relu(hk.Conv2D(width, kernel, stride=stride, padding=padding,
                                      rate=dilation)(x))
            h = jax.nn.relu(hk.Conv2D(width, 2, padding="SAME")(h))
            return hk.Linear(3)(h.reshape(h.shape[0], -1))

        x = rng.normal(size=(batch, size, size, int(rng.integers(1, 4))))
    else:
        vocab, steps = int(rng.integers(3, 12)), int(rng.integers(2, 9))

        def net(ids):
            h = hk.Embed(vocab, width)(ids)
            h = jnp.tanh(hk.Linear(width)(h))  # dense over positions too
            return hk.Linear(3)(h.mean(axis=1))

        # Few distinct ids per example (repeats), some negative (they wrap), some ≥ V.
        x = rng.integers(-vocab, vocab + 2, size=(batch, steps)) // 2
        return kind, net, jnp.asarray(x, jnp.int32)
    return kind, net, jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("seed", range(10))
def test_random_networks_of_supported_layers_match_the_oracle(seed):
    """Random shapes, strides, paddings, dilations, repeated and negative ids, masks whose
    padded slots hold garbage, clip norms from 1e-6 to inf: ghost's sum and per-example norms
    against the float64 oracle."""
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(2, 6))
    kind, net, x = _random_network(rng, batch)
    loss = _loss(net)
    params = _init(loss, x)
    y = _labels(batch, 3, seed)
    true = np.array([np.linalg.norm(g) for g in reference_per_example_grads(loss, params, x, y)])
    rules = np.sqrt(np.asarray(per_example_sq_norms(loss, params, x, y), np.float64))
    assert np.all(rules >= true * (1 - 1e-5)), (kind, rules / true)
    assert np.all(rules <= true * math.sqrt(1 + GRAM_TOLERANCE)), (kind, rules / true)
    mask = np.ones(batch)
    padded = int(rng.integers(batch))
    mask[padded] = 0.0
    if x.dtype == jnp.float32:
        x = x.at[padded].set(jnp.nan)  # garbage in the padded slot
    for clip in (1e-6, float(np.median(true)), math.inf):
        _assert_exact(loss, params, x, y, clip=clip, mask=mask)
