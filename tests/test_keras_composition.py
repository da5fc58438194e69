"""Keras feature composition: the same outputs and gradients as folding, chosen only where the rule says."""

import keras
import numpy as np
import pytest
from keras_support import BACKEND, assert_close32, randomize, to_numpy

import doconv.keras
from doconv import core
from doconv.keras import DOConv2D, composition, fuse_model


@pytest.fixture(autouse=True)
def _composition_on():
    yield
    doconv.keras.use_feature_composition(True)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of compose_features (at trace time under tf.function / jax.jit)."""
    calls = []
    original = composition.compose_features

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(composition, "compose_features", counting)
    return calls


def _loss_and_grads(layer, x, r, jit=False):
    """Output and gradients of sum(layer(x, training=True) * r) w.r.t. x and the trainable weights (W, D, bias)."""
    names = [v.path.split("/")[-1] for v in layer.trainable_variables]
    values = [to_numpy(v) for v in layer.trainable_variables]

    def forward(vals, x):
        return layer.stateless_call(vals, [], x, training=True)[0]

    if BACKEND == "tensorflow":
        import tensorflow as tf

        def step(vals, x):
            with tf.GradientTape() as tape:
                tape.watch(vals)
                tape.watch(x)
                y = forward(vals, x)
                loss = tf.reduce_sum(y * r)
            return y, tape.gradient(loss, [x] + vals)

        step = tf.function(step, jit_compile=True) if jit else step
        y, grads = step([tf.constant(v) for v in values], tf.constant(x))
    elif BACKEND == "jax":
        import jax

        def loss(vals, x):
            y = forward(vals, x)
            return (y * r).sum(), y

        (_, y), (g_vals, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(values, x)
        grads = [g_x] + list(g_vals)
    else:
        import torch

        vals = [torch.tensor(v, requires_grad=True) for v in values]
        xt = torch.tensor(x, requires_grad=True)
        y = forward(vals, xt)
        grads = torch.autograd.grad((y * torch.tensor(r)).sum(), [xt] + vals)
    return to_numpy(y), dict(zip(["x"] + names, (to_numpy(g) for g in grads)))


# (filters, C_in, kernel, groups, strides, dilation, padding, D_mul, batch, size): each composes features.
CASES = {
    "plain": (64, 64, 3, 1, 1, 1, "same", None, 2, 2),
    "groups": (64, 64, 3, 2, 1, 1, "same", 12, 2, 2),
    "strides-valid": (48, 64, 3, 1, 2, 1, "valid", None, 2, 5),
    "dilation-same": (64, 48, 3, 1, 1, 2, "same", 11, 1, 3),
    "rectangular": (64, 64, (1, 3), 4, 1, 1, "valid", None, 1, 3),
}


def _case_layer(case, data_format="channels_last", seed=0):
    filters, C_in, kernel, groups, strides, dilation, padding, D_mul, batch, size = CASES[case]
    layer = DOConv2D(
        filters,
        kernel,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        groups=groups,
        data_format=data_format,
        D_mul=D_mul,
    )
    rng = np.random.default_rng(seed)
    shape = (batch, size, size, C_in) if data_format == "channels_last" else (batch, C_in, size, size)
    x = rng.standard_normal(shape).astype("float32")
    layer.build(shape)
    randomize(layer, rng)
    y_shape = layer.compute_output_shape(shape)
    return layer, x, rng.standard_normal(y_shape).astype("float32")


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_gradients_equal_folding(case, spy):
    layer, x, r = _case_layer(case)
    assert layer._composes_features(x, True), "the case must be on the feature side of the rule"
    y_feature, g_feature = _loss_and_grads(layer, x, r)
    assert spy, "feature composition was not used"
    doconv.keras.use_feature_composition(False)
    calls = len(spy)
    y_fold, g_fold = _loss_and_grads(layer, x, r)
    assert len(spy) == calls, "the switch did not turn feature composition off"
    assert_close32(y_feature, y_fold)
    assert sorted(g_feature) == ["D", "W", "bias", "x"]
    for name in g_fold:
        assert_close32(g_feature[name], g_fold[name])


def _random_layer(rng):
    """A DOConv2D of random shape (groups, rectangular kernel, strides or dilation, padding, D_mul >= K)."""
    groups = int(rng.choice([1, 1, 2, 3]))
    C_in, filters = groups * int(rng.integers(1, 5)), groups * int(rng.integers(1, 5))
    kernel = tuple(int(k) for k in rng.integers(1, 4, 2))
    kernel = (1, 2) if kernel == (1, 1) else kernel  # K = 1 has no D: nothing to compose
    strides = tuple(int(s) for s in rng.integers(1, 3, 2))
    dilation = tuple(int(d) for d in rng.integers(1, 3, 2)) if strides == (1, 1) else (1, 1)
    padding = str(rng.choice(["same", "valid"]))
    K = kernel[0] * kernel[1]
    layer = DOConv2D(
        filters, kernel, strides=strides, dilation_rate=dilation, padding=padding, groups=groups,
        D_mul=K + int(rng.integers(0, 3)),
    )  # fmt: skip
    reach = max((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    shape = (int(rng.integers(1, 4)), reach + int(rng.integers(0, 4)), reach + int(rng.integers(0, 4)), C_in)
    x = rng.standard_normal(shape).astype("float32")
    layer.build(shape)
    randomize(layer, rng)
    return layer, x, rng.standard_normal(layer.compute_output_shape(shape)).astype("float32")


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes_equal_folding(seed, spy, monkeypatch):
    # The rule picks features only for large layers on small inputs; here it is told to, so that
    # small random shapes take both paths.
    monkeypatch.setattr(core, "training_composition", lambda *args: "feature")
    layer, x, r = _random_layer(np.random.default_rng(1000 + seed))
    assert layer._composes_features(x, True)
    y_feature, g_feature = _loss_and_grads(layer, x, r)
    assert spy, "feature composition was not used"
    doconv.keras.use_feature_composition(False)
    y_fold, g_fold = _loss_and_grads(layer, x, r)
    assert_close32(y_feature, y_fold)
    for name in g_fold:
        assert_close32(g_feature[name], g_fold[name])


def test_channels_first_equal_folding():
    # TF has no NCHW convolution kernel on CPU: its channels_first runs under XLA.
    layer, x, r = _case_layer("groups", data_format="channels_first")
    assert layer._composes_features(x, True)
    y_feature, g_feature = _loss_and_grads(layer, x, r, jit=True)
    doconv.keras.use_feature_composition(False)
    y_fold, g_fold = _loss_and_grads(layer, x, r, jit=True)
    assert_close32(y_feature, y_fold)
    for name in g_fold:
        assert_close32(g_feature[name], g_fold[name])


def test_choice_follows_the_rule_only_in_training(spy):
    layer = DOConv2D(64, 3, padding="same", D_mul=9)
    rng = np.random.default_rng(1)
    small = rng.standard_normal((2, 2, 2, 64)).astype("float32")
    large = rng.standard_normal((4, 16, 16, 64)).astype("float32")
    layer(small)
    for x in (small, large):
        expected = core.training_composition(x.shape[0] * x.shape[1] * x.shape[2], 64, 64, 1, 9, 9) == "feature"
        assert layer._composes_features(x, True) is expected
    assert layer._composes_features(small, True) and not layer._composes_features(large, True)
    for training in (None, False):
        assert not layer._composes_features(small, training)
    del spy[:]
    layer(small)  # inference folds
    layer(large, training=True)  # the rule says fold
    assert not spy
    layer(small, training=True)
    assert len(spy) == 1
    # An unknown batch (a Functional model's Input) folds.
    assert not layer._composes_features(keras.KerasTensor((None, 2, 2, 64)), True)
    # Frozen weights: nothing to differentiate, nothing to save.
    layer.W.trainable = layer.D.trainable = False
    assert not layer._composes_features(small, True)


def test_switch():
    assert doconv.keras.feature_composition_in_use() is True
    assert doconv.keras.use_feature_composition(False) is False
    assert doconv.keras.feature_composition_in_use() is False
    with pytest.raises(TypeError, match="enabled=1"):
        doconv.keras.use_feature_composition(1)
    assert doconv.keras.feature_composition_in_use() is False


def _model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((2, 2, 64))
    x = DOConv2D(64, 3, padding="same", D_mul=9)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_model_trains_saves_loads_and_fuses(tmp_path, spy):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 2, 2, 64)).astype("float32")
    y = rng.integers(0, 3, 4)
    trained = {}
    for features in (True, False):
        doconv.keras.use_feature_composition(features)
        model = _model(seed=3)
        conv = model.layers[1]
        conv.D.assign(np.full(conv.D.shape, 0.05, "float32"))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
        calls = len(spy)
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
        assert (len(spy) > calls) is features
        trained[features] = model
    for a, b in zip(trained[True].get_weights(), trained[False].get_weights()):
        assert_close32(a, b)
    doconv.keras.use_feature_composition(True)
    model = trained[True]
    expected = to_numpy(model.predict_on_batch(x))
    path = str(tmp_path / "composed.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_close32(to_numpy(loaded.predict_on_batch(x)), expected)
    fused = fuse_model(loaded)
    assert not any(isinstance(layer, DOConv2D) for layer in fused.layers)
    assert_close32(to_numpy(fused.predict_on_batch(x)), expected)
