"""The conv rule's forms (issue 25): patches written out or kept as views, Gram or materialised,
each exact against the float64 oracle; the measured choice among them; and the Gram form on
views under inputs chosen to make it cancel."""

from __future__ import annotations

import itertools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablation import clipped_grad_sum
from ablation.core import autotune, clipping
from ablation.core.rules import conv, dense
from ablation.core.rules.patches import patch_views
from ablation.core.taps import LayeredLoss
from models.registry import softmax_cross_entropy
from tests.conftest import flatten, reference_clipped_sum, reference_per_example_grads

FORMS = list(itertools.product(conv.LAYOUTS, dense.FORMS))


def _conv_net(kind: str):
    def net(x):
        if kind == "1d":
            h = jax.nn.relu(hk.Conv1D(4, 3, stride=2, padding="SAME")(x))
            h = hk.Conv1D(5, 2, padding="VALID")(h)
        else:  # stride 2 SAME with an even kernel (uneven padding), then VALID
            h = jax.nn.relu(hk.Conv2D(4, 4, stride=2, padding="SAME")(x))
            h = hk.Conv2D(5, 3, padding="VALID", with_bias=False)(h)
        return hk.Linear(3)(h.reshape(h.shape[0], -1))
    return LayeredLoss(network=net, output_loss=softmax_cross_entropy)


def _case(kind: str, offset: float = 0.0, batch: int = 5):
    loss = _conv_net(kind)
    shape = (batch, 11, 3) if kind == "1d" else (batch, 9, 9, 2)
    x = offset + jax.random.normal(jax.random.key(4), shape)
    y = jax.random.randint(jax.random.key(5), (batch,), 0, 3)
    params = loss.transformed.init(jax.random.key(0), x[:1])
    return loss, params, x, y


def test_views_hold_exactly_the_written_patches():
    x = jax.random.normal(jax.random.key(0), (3, 7, 6, 2))
    for strides, padding in [((1, 1), "SAME"), ((2, 1), "VALID"), ((2, 2), ((1, 2), (0, 1)))]:
        patches = patch_views(x, (3, 2), strides, padding, 3)
        a = np.asarray(patches.dense(), np.float64)
        g = np.asarray(jax.random.normal(jax.random.key(1), (*a.shape[:2], 4)), np.float64)
        np.testing.assert_allclose(patches.gram(), np.einsum("btd,bsd->bts", a, a), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(patches.outer(jnp.asarray(g, jnp.float32)),
                                   np.einsum("btd,btp->bdp", a, g), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(patches.sq_rows(), np.sum(a * a, axis=(1, 2)), rtol=1e-5)
        # the windows are those of lax's own patch operator (features reordered (C, k) -> (k, C))
        lax_patches = jax.lax.conv_general_dilated_patches(
            x, (3, 2), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        lax_patches = np.moveaxis(np.asarray(lax_patches).reshape(*lax_patches.shape[:3], 2, 3, 2),
                                  3, -1).reshape(3, -1, 12)
        np.testing.assert_allclose(a, lax_patches, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("layout, form", FORMS)
def test_every_conv_form_matches_the_float64_oracle(kind, layout, form, monkeypatch):
    loss, params, x, y = _case(kind)
    monkeypatch.setattr(conv, "conv_form", lambda *_: (layout, form, True))
    per_example = reference_per_example_grads(loss, params, x, y)
    np.testing.assert_allclose(
        np.sqrt(np.asarray(clipping.per_example_sq_norms(loss, params, x, y), np.float64)),
        [np.linalg.norm(g) for g in per_example], rtol=2e-4)  # the Gram bound adds ≤ 1e-3/2
    clip = float(np.median([np.linalg.norm(g) for g in per_example]))
    expected = reference_clipped_sum(per_example, clip)
    got = flatten(clipped_grad_sum("ghost", loss, params, x, y, clip))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_the_gram_form_on_views_never_under_clips_a_large_shared_offset(offset, monkeypatch):
    """A shared offset makes ⟨AAᵀ, GGᵀ⟩ cancel in float32; summed view by view it must still
    bound the true norm, and what one example adds must stay within C."""
    def net(x):  # one conv; a loss linear in its output, so G is exact whatever the offset
        return hk.Conv2D(6, 3, padding="VALID")(x).reshape(x.shape[0], -1)

    def linear(out, label):
        return jnp.mean(out * jnp.cos(jnp.arange(out.shape[-1], dtype=out.dtype)))

    loss = LayeredLoss(network=net, output_loss=linear)
    x = offset + jax.random.normal(jax.random.key(4), (3, 6, 6, 8))
    y = jnp.zeros(3, jnp.int32)
    params = loss.transformed.init(jax.random.key(0), x[:1])
    monkeypatch.setattr(conv, "conv_form", lambda *_: ("views", "gram", True))
    per_example = reference_per_example_grads(loss, params, x, y)
    true = np.array([np.linalg.norm(g) for g in per_example])
    ghost = np.sqrt(np.asarray(clipping.per_example_sq_norms(loss, params, x, y), np.float64))
    assert np.all(ghost >= true * (1 - 1e-6)), (ghost / true)
    clip = float(np.min(true)) / 2
    for i in range(3):  # each example alone: its release is its own clipped gradient
        alone = flatten(clipped_grad_sum("ghost", loss, params, x[i:i + 1], y[i:i + 1], clip))
        assert np.linalg.norm(alone) <= clip * (1 + 1e-6)
        np.testing.assert_allclose(alone, per_example[i] * clip / true[i], rtol=2e-3,
                                   atol=2e-3 * clip / np.sqrt(alone.size))


def test_the_measured_choice_is_cached_recorded_and_what_the_step_used(monkeypatch):
    monkeypatch.setenv(conv.CONV_FORMS_ENV, "measured")
    autotune.forget()
    loss, params, x, y = _case("2d", batch=4)
    jax.jit(lambda p: clipping.ghost_clipped_sum(loss, p, x, y, 1.0))(params)
    chosen = autotune.choices()
    assert len(chosen) == 2  # both conv layers, each measured once
    for name, seconds in chosen.values():
        assert name in seconds and seconds[name] == min(seconds.values())
    rules = clipping.layer_rules(loss, params, x[0], y[0], batch_size=4)
    assert autotune.choices() == chosen  # the description reads the step's own choice
    conv_rules = [r for scope, r in rules.items() if scope.startswith("conv")]
    assert len(conv_rules) == 2 and all(r.endswith("; measured)") for r in conv_rules)


def test_the_flop_model_is_what_the_environment_can_ask_for(monkeypatch):
    monkeypatch.setenv(conv.CONV_FORMS_ENV, "model")
    autotune.forget()
    loss, params, x, y = _case("2d", batch=4)
    rules = clipping.layer_rules(loss, params, x[0], y[0], batch_size=4)
    assert autotune.choices() == {}
    assert not any("measured" in r for r in rules.values())
    monkeypatch.setenv(conv.CONV_FORMS_ENV, "fastest")
    with pytest.raises(ValueError, match="ABLATION_CONV_FORMS='fastest'"):
        clipping.layer_rules(loss, params, x[0], y[0], batch_size=4)


def test_autotune_keeps_the_faster_candidate_and_skips_one_that_fails():
    autotune.forget()
    spec = jax.ShapeDtypeStruct((256, 256), jnp.float32)

    def slow(a):
        for _ in range(20):
            a = jnp.tanh(a @ a)
        return a

    def broken(a):
        raise RuntimeError("does not compile")

    assert autotune.fastest("pick", {"slow": slow, "fast": jnp.tanh, "broken": broken}, [spec],
                            default="slow") == "fast"
    assert autotune.fastest("pick", {"slow": slow}, [spec], default="slow") == "fast"  # cached
    assert "broken" not in autotune.choices()["pick"][1]
    assert autotune.fastest("none", {"broken": broken}, [spec], default="fallback") == "fallback"
    autotune.forget()
