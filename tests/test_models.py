"""The registry: the paper's parameter counts, dataset specs, output shapes and bad names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import DATASETS, MODEL_NAMES, MODELS, PAPER_MODEL_NAMES, count_params, get_model

PAPER_COUNTS = {"logreg": 105, "ffnn": 5_352, "cnn": 26_010, "embed": 160_370,
                "lstm": 1_081_002, "cifar10": 605_226}


@pytest.mark.parametrize("name", PAPER_MODEL_NAMES)
def test_parameter_count_equals_paper(name):
    params = MODELS[name].init(jax.random.key(0))
    assert count_params(params) == PAPER_COUNTS[name] == MODELS[name].paper_n_params


def _encoder_count(tokens_in: int, positions: int, classes: int, d: int = 64, blocks: int = 2):
    """Parameters of models/attention.py's encoders counted by hand: the input layer, the
    position table, per block two LayerNorms (scale, offset), four d×d attention projections
    with biases and the 4× MLP, the final LayerNorm and the classifier."""
    block = 2 * 2 * d + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return tokens_in + positions * d + blocks * block + 2 * d + d * classes + classes


@pytest.mark.parametrize("name, expected", [
    ("transformer", _encoder_count(10_004 * 64, 256, 2, blocks=1)),  # 706,882
    ("vit", _encoder_count(4 * 4 * 3 * 64 + 64, 64, 10)),  # 107,978
])
def test_parameter_counts_of_the_encoders(name, expected):
    params = MODELS[name].init(jax.random.key(0))
    assert count_params(params) == expected  # not the paper's: paper_n_params stays None
    assert MODELS[name].paper_n_params is None


def test_static_and_dynamic_lstm_are_the_same_model():
    static = get_model("lstm", unroll="static").init(jax.random.key(0))
    dynamic = get_model("lstm").init(jax.random.key(0))
    assert jax.tree.structure(static) == jax.tree.structure(dynamic)
    x = jax.random.randint(jax.random.key(1), (2, 256), 0, 10_000)
    a = get_model("lstm", unroll="static").logits(static, x)
    b = get_model("lstm").logits(static, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_lstm_computes_what_haiku_lstm_computes():
    """The tappable lstm keeps hk.LSTM's parameters and arithmetic (gate order, forget bias)."""
    import haiku as hk

    def reference(tokens):
        h = hk.Embed(10_004, 100, name="embed")(tokens)
        core = hk.LSTM(100, name="lstm")
        out, _ = hk.dynamic_unroll(core, h, core.initial_state(tokens.shape[0]), time_major=False)
        return hk.Linear(2, name="linear")(out.mean(axis=1))

    ref = hk.without_apply_rng(hk.transform(reference))
    x = jax.random.randint(jax.random.key(1), (2, 20), 0, 10_000)
    params = ref.init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(MODELS["lstm"].init(jax.random.key(0)))
    np.testing.assert_allclose(MODELS["lstm"].logits(params, x), ref.apply(params, x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_fast_max_pool_has_hk_max_pools_values_and_gradients(ties):
    """Issue 18: the same forward and the same gradient as hk.MaxPool, ties included (equal
    maxima in a window go to the first in row-major order, as select-and-scatter does)."""
    import haiku as hk

    from models.nets import max_pool_2x2_s1
    x = jax.random.normal(jax.random.key(0), (3, 9, 9, 4))
    if ties:  # zeros after a ReLU, and repeated positive values in windows
        x = jnp.round(jax.nn.relu(x) * 2) / 2
    xla = hk.without_apply_rng(hk.transform(
        lambda v: hk.MaxPool((1, 2, 2, 1), 1, padding="VALID")(v)))
    # Small integers: sums of routed gradients are exact whatever the order of summation.
    g = jax.random.randint(jax.random.key(1), (3, 8, 8, 4), 1, 9).astype(jnp.float32)
    ours, vjp_ours = jax.vjp(max_pool_2x2_s1, x)
    theirs, vjp_theirs = jax.vjp(lambda v: xla.apply({}, v), x)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(vjp_ours(g)[0], vjp_theirs(g)[0])
    if ties:
        assert int(jnp.sum(x[:, :-1, :-1] == x[:, 1:, 1:])) > 50  # the case really has ties


def test_fast_max_pool_routes_each_gradient_once_and_none_from_a_nan_window():
    """Each output's gradient reaches exactly one input (never two, even where all four tie),
    and a window holding a NaN routes nothing: no example's gradient is duplicated or lost to
    a position it did not come from."""
    from models.nets import max_pool_2x2_s1
    x = jnp.zeros((2, 5, 5, 3))  # every window a four-way tie
    x = x.at[1, 2, 2, 0].set(jnp.nan)  # poisons the four windows that hold it
    g = jax.random.uniform(jax.random.key(2), (2, 4, 4, 3), minval=1.0, maxval=2.0)
    grad = jax.vjp(max_pool_2x2_s1, x)[1](g)[0]
    poisoned = jnp.zeros(g.shape, bool).at[1, 1:3, 1:3, 0].set(True)
    np.testing.assert_allclose(jnp.sum(grad), jnp.sum(jnp.where(poisoned, 0.0, g)), rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(grad)))
    # ties go to the window's first position (row-major): the top-left of each window
    np.testing.assert_array_equal(grad[0, :4, :4], g[0])
    assert float(jnp.abs(grad[0, 4]).sum() + jnp.abs(grad[0, :, 4]).sum()) == 0.0


def test_cnn_pool_choices_are_the_same_model():
    fast, xla = get_model("cnn"), get_model("cnn", pool="xla")
    params = fast.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    y = jnp.array([0, 1, 2, 3])
    np.testing.assert_allclose(fast.logits(params, x), xla.logits(params, x), rtol=1e-6)
    g_fast = jax.grad(lambda p: fast.loss.batch_losses(p, x, y).sum())(params)
    g_xla = jax.grad(lambda p: xla.loss.batch_losses(p, x, y).sum())(params)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_size_forward_shapes_and_scalar_loss(name):
    model = MODELS[name]
    spec = model.dataset
    params = model.init(jax.random.key(0))
    x = jnp.zeros((3, *spec.input_shape), spec.input_dtype)
    logits = model.logits(params, x)
    assert logits.shape == (3, 1 if model.binary_logit else spec.num_classes)
    loss = model.loss(params, x[0], jnp.int32(1))
    assert loss.shape == () and np.isfinite(float(loss))
    assert model.predict(params, x).shape == (3,)


def test_dataset_specs():
    assert {d: DATASETS[d].n_train for d in DATASETS} == {
        "adult": 45_220, "mnist": 60_000, "imdb": 25_000, "cifar10": 50_000}
    assert DATASETS["adult"].input_shape == (104,)
    assert DATASETS["mnist"].input_shape == (28, 28, 1)
    assert DATASETS["imdb"].input_shape == (256,) and DATASETS["imdb"].input_dtype == "int32"
    assert DATASETS["cifar10"].input_shape == (32, 32, 3)
    assert MODELS["logreg"].binary_logit and not MODELS["ffnn"].binary_logit


def test_losses_match_textbook_cross_entropy():
    logits = jnp.array([[2.0, -1.0]])
    ffnn = MODELS["ffnn"]
    # Softmax CE of label 0: -log(e^2 / (e^2 + e^-1)).
    expected = -np.log(np.exp(2) / (np.exp(2) + np.exp(-1)))
    from models.registry import sigmoid_cross_entropy, softmax_cross_entropy
    assert float(softmax_cross_entropy(logits[0], jnp.int32(0))) == pytest.approx(expected, rel=1e-6)
    # Sigmoid CE of logit z with label 1: -log σ(z); label 0: -log(1 - σ(z)); stable at |z| = 100.
    for z, label in [(0.3, 1), (0.3, 0), (100.0, 0), (-100.0, 1)]:
        p = 1 / (1 + np.exp(-z))
        exact = -np.log(p) if label else -np.log1p(-p) if p < 1 else z
        got = float(sigmoid_cross_entropy(jnp.array([z]), jnp.int32(label)))
        assert got == pytest.approx(exact, rel=1e-5)
    assert ffnn.dataset.num_classes == 2


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="logreg, ffnn, cnn, embed, lstm, cifar10"):
        get_model("resnet")
    with pytest.raises(ValueError, match="dynamic, static"):
        get_model("lstm", unroll="sideways")
    with pytest.raises(ValueError, match="fast, xla"):
        get_model("cnn", pool="avg")
