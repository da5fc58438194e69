"""doconv.keras: convert_model and fuse_model on graphs that reproduce the zoo's structures.

Frozen stems, Conv2D subclasses with their own call, depthwise-separable blocks, raw ops (a
MobileNetV3-style hard-swish ``x * relu6(x + 3) / 6``, a split), nested models, a custom layer
owning a conv, a Lambda: each converts and fuses exactly, keeps what the user set up, and every
conv left as it is is named in one warning.
"""

import pytest

keras = pytest.importorskip("keras")

import re  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from keras_support import assert_close32, needs_tensorflow, tensorflow_only, to_numpy  # noqa: E402

from doconv.keras import (  # noqa: E402
    DOConv2D,
    DODepthwiseConv2D,
    DOSeparableConv2D,
    convert_model,
    fuse_model,
    get_params,
)

ops = keras.ops


@keras.saving.register_keras_serializable(package="doconv_tests")
class ConvBlock(keras.layers.Layer):
    """A custom layer owning a Conv2D (built lazily, on its first call)."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same")
        self.norm = keras.layers.BatchNormalization()

    def call(self, x):
        return self.norm(self.conv(x))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="doconv_tests")
class SameConv(keras.layers.Conv2D):
    """A Conv2D subclass with its own call (like timm's Conv2dSame): converting it would lose this."""

    def call(self, x):
        return super().call(x) * 2.0 + 1.0


def hard_swish(x):
    return x * keras.layers.ReLU(6.0)(x + 3.0) / 6.0


def zoo_like():
    """One small graph with every structure the zoo has and convert_model must carry."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = hard_swish(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    a, b = ops.split(x, 2, axis=-1)
    x = ops.concatenate([a, ops.abs(b)], axis=-1)
    x = keras.layers.SeparableConv2D(6, 3, padding="same", name="sep")(x)
    inner = keras.Sequential(
        [keras.Input((8, 8, 6)), keras.layers.Conv2D(4, 1, name="inner_pw"), keras.layers.ReLU()], name="nested"
    )
    x = inner(x)
    x = ConvBlock(4, name="block")(x)
    x = SameConv(4, 3, padding="same", name="same_conv")(x)
    x = keras.layers.Lambda(lambda t: t * 0.5, name="halve")(x)
    x = keras.layers.Conv2D(5, 3, strides=2, name="head", dtype="mixed_bfloat16")(x)
    return keras.Model(inputs, ops.cast(x, "float32"), name="zoo_like")


CONV_LIKE = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    DOConv2D,
    DODepthwiseConv2D,
    DOSeparableConv2D,
)


def conv_types(model):
    """Class names of the conv-like layers, nested models included (not those inside the custom block)."""
    return {
        layer.name: type(layer).__name__
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, CONV_LIKE) and not layer.name.startswith("conv2d")
    }


def predict(model, x):
    return to_numpy(model(x, training=False))


def test_zoo_like_graph_converts_and_fuses_exactly_keeping_what_the_user_set_up():
    keras.utils.set_random_seed(30)
    model = zoo_like()
    model.get_layer("stem").trainable = False  # a frozen stem
    model.get_layer("sep").pointwise_kernel.trainable = False  # one frozen variable
    x = np.random.default_rng(30).standard_normal((2, 8, 8, 3)).astype("float32")
    y = predict(model, x)
    original = [w.copy() for w in model.get_weights()]
    with pytest.warns(UserWarning) as record:
        converted = convert_model(model)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    message = messages[0]
    # stem, dw, sep, nested/inner_pw, head converted; block/conv and same_conv left, named with their class.
    assert "converted 5 of 7 convolution layers of 'zoo_like'" in message and "left 2 as they are" in message
    assert re.search(r"block/conv2d\S* \(keras.layers.Conv2D: inside block \(test_keras_convert.ConvBlock\)", message)
    assert "same_conv (test_keras_convert.SameConv: a subclass of keras.layers.Conv2D" in message
    assert conv_types(converted) == {
        "stem": "DOConv2D",
        "dw": "DODepthwiseConv2D",
        "sep": "DOSeparableConv2D",
        "inner_pw": "DOConv2D",
        "same_conv": "SameConv",
        "head": "DOConv2D",
    }
    assert_close32(predict(converted, x), y)
    stem = converted.get_layer("stem")
    assert not stem.trainable and not stem.trainable_weights
    sep = converted.get_layer("sep")
    assert sep.W.trainable and sep.D.trainable and not sep.pointwise_kernel.trainable
    assert converted.get_layer("head").dtype_policy.name == "mixed_bfloat16"
    # One D more for each trainable converted layer with K > 1 (dw, sep, head; the stem is frozen).
    assert len(converted.trainable_weights) == len(model.trainable_weights) + 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every DO-Conv layer fused: nothing to say
        fused = fuse_model(converted)
    types = conv_types(fused)
    assert types["stem"] == "Conv2D" and types["dw"] == "DepthwiseConv2D" and types["sep"] == "SeparableConv2D"
    assert types["same_conv"] == "SameConv"
    assert_close32(predict(fused, x), y)
    assert fused.count_params() == model.count_params()
    assert not fused.get_layer("stem").trainable and not fused.get_layer("sep").pointwise_kernel.trainable
    assert fused.get_layer("head").dtype_policy.name == "mixed_bfloat16"
    # Neither call touched its input, and the copies share no weight with it.
    for a, b in zip(model.get_weights(), original):
        np.testing.assert_array_equal(a, b)
    assert not {id(v) for v in model.weights} & {id(v) for v in fused.weights}


def test_trained_do_model_with_ops_fuses_to_its_outputs():
    rng = np.random.default_rng(31)
    inputs = keras.Input((6, 6, 2))
    x = DOConv2D(4, 3, padding="same", name="a")(inputs)
    x = hard_swish(x) + 3.0
    x = DODepthwiseConv2D(3, depth_multiplier=1, name="b", D_mul=11)(x)
    x = DOSeparableConv2D(3, (1, 3), name="c")(keras.ops.relu(x))
    model = keras.Model(inputs, x)
    for layer in model.layers:
        if isinstance(layer, (DOConv2D, DODepthwiseConv2D, DOSeparableConv2D)):
            params = get_params(layer)
            layer.D.assign(rng.standard_normal(tuple(layer.D.shape)).astype("float32"))
            assert np.any(get_params(layer)["D"] != params["D"])
    x = rng.standard_normal((2, 6, 6, 2)).astype("float32")
    fused = fuse_model(model)
    assert [type(layer).__name__ for layer in fused.layers if "Conv" in type(layer).__name__] == [
        "Conv2D",
        "DepthwiseConv2D",
        "SeparableConv2D",
    ]
    assert_close32(predict(fused, x), predict(model, x))


def test_depthwise_false_keeps_depthwise_and_separable_and_names_them():
    keras.utils.set_random_seed(32)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="c"),
            keras.layers.DepthwiseConv2D(3, name="d"),
            keras.layers.SeparableConv2D(2, 1, name="s"),
        ]
    )
    with pytest.warns(UserWarning, match=r"converted 1 of 3 .* d \(keras.layers.DepthwiseConv2D: depthwise=False\)"):
        converted = convert_model(model, depthwise=False)
    assert [type(layer).__name__ for layer in converted.layers] == ["DOConv2D", "DepthwiseConv2D", "SeparableConv2D"]
    model.trainable = False  # a frozen model stays frozen
    converted = convert_model(model)
    assert [type(layer).__name__ for layer in converted.layers] == [
        "DOConv2D",
        "DODepthwiseConv2D",
        "DOSeparableConv2D",
    ]
    assert not converted.trainable and not converted.trainable_weights
    assert not fuse_model(converted).trainable_weights


@pytest.mark.filterwarnings("error::UserWarning")  # no false "found nothing" warning
def test_bare_layers_convert_and_fuse():
    x = np.random.default_rng(33).standard_normal((1, 5, 5, 2)).astype("float32")
    for native, do in [
        (keras.layers.Conv2D(3, 3, name="c"), DOConv2D),
        (keras.layers.DepthwiseConv2D(3, name="d"), DODepthwiseConv2D),
        (keras.layers.SeparableConv2D(3, 3, name="s"), DOSeparableConv2D),
    ]:
        y = to_numpy(native(x))
        layer = convert_model(native)
        assert type(layer) is do and layer.name == native.name
        assert_close32(to_numpy(layer(x)), y)
        back = fuse_model(layer)
        assert type(back) is type(native)
        assert_close32(to_numpy(back(x)), y)
    mine = SameConv(3, 3, name="mine")
    mine.build((None, 5, 5, 2))
    with pytest.raises(TypeError, match=r"does not replace layer 'mine' .*SameConv.*subclass of keras.layers.Conv2D"):
        convert_model(mine)
    with pytest.raises(TypeError, match=r"conv must be a keras.layers.Conv2D \(that class exactly, not a subclass\)"):
        DOConv2D.from_conv(mine)
    with pytest.raises(TypeError, match="does not replace layer"):
        fuse_model(keras.layers.Dense(2))


def test_a_shared_layer_stays_shared_and_a_nested_functional_model_converts():
    keras.utils.set_random_seed(34)
    conv = keras.layers.Conv2D(2, 3, padding="same", name="shared")
    inner_in = keras.Input((5, 5, 2))
    inner = keras.Model(inner_in, keras.layers.Conv2D(2, 1, name="pw")(inner_in), name="inner")
    inputs = keras.Input((5, 5, 2))
    x = conv(inner(conv(inputs)))
    model = keras.Model(inputs, x)
    x = np.random.default_rng(34).standard_normal((1, 5, 5, 2)).astype("float32")
    converted = convert_model(model)
    assert type(converted.get_layer("shared")) is DOConv2D
    assert type(converted.get_layer("inner").get_layer("pw")) is DOConv2D
    assert len(converted.weights) == 2 + 1 + 1 + 1  # the shared layer's W, D, bias once
    assert_close32(predict(converted, x), predict(model, x))


@pytest.mark.slow
@tensorflow_only
@needs_tensorflow
def test_mobilenetv3small_converts_and_fuses_exactly():
    keras.utils.set_random_seed(35)
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=10)
    x = np.random.default_rng(35).standard_normal((2, 32, 32, 3)).astype("float32")
    y = predict(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # everything converted: no warning
        converted = convert_model(model)
    assert not any(type(layer) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D) for layer in converted.layers)
    assert_close32(predict(converted, x), y)
    fused = fuse_model(converted)
    assert_close32(predict(fused, x), y)
    assert fused.count_params() == model.count_params()


def test_the_copy_and_the_original_share_no_weight_memory():
    """On jax the copied layers held the original's very arrays: training one model donated (deleted) them
    under the other ("Array has been deleted"), and on any backend the copy must not move with the original."""
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(0).standard_normal((8, 6, 6, 2)).astype("float32")
    converted = convert_model(model)
    fused = fuse_model(converted)
    before = [to_numpy(converted.predict(data, verbose=0)), to_numpy(fused.predict(data, verbose=0))]
    model.compile(optimizer="sgd", loss="mse")
    model.fit(data, np.ones((8, 1), "float32"), epochs=1, batch_size=4, verbose=0)
    for copy, want in zip((converted, fused), before):
        np.testing.assert_array_equal(to_numpy(copy.predict(data, verbose=0)), want)
