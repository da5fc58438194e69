"""doconv.keras: DODepthwiseConv2D and DOSeparableConv2D, Keras's own conv test cases, an atomic set_params."""

import pytest

keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
from keras_support import assert_close32, randomize, run, to_numpy  # noqa: E402

from doconv import core  # noqa: E402
from doconv.keras import DOConv2D, DODepthwiseConv2D, DOSeparableConv2D, get_params, set_params  # noqa: E402


def oracle(x, p, kernel_size, groups, strides=1, padding="valid", dilation_rate=1, data_format="channels_last"):
    """The NumPy DO-Conv of doconv.core (float64) for canonical parameters p."""
    return core.doconv_reference(
        x.astype(np.float64),
        p["W"].astype(np.float64),
        None if p["D"] is None else p["D"].astype(np.float64),
        p["bias"],
        kernel_size=core.normalize_tuple(kernel_size, 2, "kernel_size"),
        stride=core.normalize_tuple(strides, 2, "strides"),
        padding=padding,
        dilation=core.normalize_tuple(dilation_rate, 2, "dilation_rate"),
        groups=groups,
        data_format=data_format,
    )


def check_layer(layer, x, expected_shape=None, expected_trainable=3):
    """Keras's run_layer_test essentials for a built layer: shape, weight counts, no losses, and fuse exactness."""
    y = run(layer, x)
    if expected_shape is not None:
        assert y.shape == tuple(expected_shape)
    assert tuple(layer.compute_output_shape(x.shape)) == y.shape
    assert len(layer.trainable_weights) == expected_trainable and not layer.non_trainable_weights
    assert not layer.losses
    assert_close32(run(layer.fuse(), x), y)
    return y


# Keras's conv_test.py, ConvBasicTest.test_conv2d_basic (filters, kernel_size, strides, padding, data_format,
# dilation_rate, groups, input_shape, output_shape) and ConvCorrectnessTest.test_conv2d (inputs (2, 8, 8, 4)).
CONV_BASIC = [
    (5, 2, 1, "valid", "channels_last", 1, 1, (3, 5, 5, 4), (3, 4, 4, 5)),
    (6, 2, 1, "same", "channels_last", (2, 2), 2, (3, 4, 4, 4), (3, 4, 4, 6)),
    (6, (2, 2), (2, 1), "valid", "channels_last", (1, 1), 2, (3, 5, 5, 4), (3, 2, 4, 6)),
]
CONV_CORRECTNESS = [
    (5, 2, 1, "valid", "channels_last", 1, 1),
    (4, 3, 2, "same", "channels_last", 1, 1),
    (6, 2, 1, "same", "channels_last", (2, 2), 2),
    (6, 2, 1, "same", "channels_last", (2, 3), 2),
    (6, (4, 3), (2, 1), "valid", "channels_last", (1, 1), 2),
    (6, (4, 3), (2, 1), "valid", "channels_first", (1, 1), 2),
]


@pytest.mark.parametrize(
    "filters, kernel_size, strides, padding, data_format, dilation_rate, groups, in_shape, out_shape",
    CONV_BASIC + [case + ((2, 8, 8, 4), None) for case in CONV_CORRECTNESS],
)
def test_keras_conv2d_cases(
    filters, kernel_size, strides, padding, data_format, dilation_rate, groups, in_shape, out_shape
):
    rng = np.random.default_rng(20)
    layer = DOConv2D(filters, kernel_size, strides, padding, data_format, dilation_rate, groups)
    layer.build(in_shape)
    p = randomize(layer, rng)
    x = rng.standard_normal(in_shape).astype("float32")
    y = check_layer(layer, x, out_shape)
    C_in = in_shape[-1] if data_format == "channels_last" else in_shape[1]
    assert_close32(y, oracle(x, p, kernel_size, groups, strides, padding, dilation_rate, data_format))
    assert C_in == layer.in_channels


# Keras's depthwise_conv_test.py: test_depthwise_conv2d_basic, then test_depthwise_conv2d (inputs (2, 8, 8, 4)).
DEPTHWISE_CASES = [
    (5, 2, 1, "valid", "channels_last", 1, (3, 5, 5, 4), (3, 4, 4, 20)),
    (6, 2, 1, "same", "channels_last", (2, 2), (3, 4, 4, 4), (3, 4, 4, 24)),
    (6, (2, 2), (2, 2), "valid", "channels_last", (1, 1), (3, 5, 5, 4), (3, 2, 2, 24)),
    (5, 2, 1, "valid", "channels_last", 1, (2, 8, 8, 4), None),
    (6, 2, 1, "same", "channels_last", (2, 2), (2, 8, 8, 4), None),
    (6, (2, 2), (2, 2), "valid", "channels_last", (1, 1), (2, 8, 8, 4), None),
    # ours: channels_first, a 1x1 kernel (no D), D_mul above K
    # (not C_out == W: XLA on TF's CPU adds a channels_first bias along the wrong axis then, see test_keras.py)
    (2, (3, 1), 1, "same", "channels_first", 1, (2, 3, 7, 5), (2, 6, 7, 5)),
    (3, 1, 2, "valid", "channels_last", 1, (2, 5, 5, 2), (2, 3, 3, 6)),
]


@pytest.mark.parametrize(
    "depth_multiplier, kernel_size, strides, padding, data_format, dilation_rate, in_shape, out_shape", DEPTHWISE_CASES
)
def test_depthwise_matches_the_grouped_oracle_and_fuses_exactly(
    depth_multiplier, kernel_size, strides, padding, data_format, dilation_rate, in_shape, out_shape
):
    rng = np.random.default_rng(21)
    K = core.kernel_volume(core.normalize_tuple(kernel_size, 2, "kernel_size"))
    layer = DODepthwiseConv2D(
        kernel_size,
        strides,
        padding,
        depth_multiplier,
        data_format,
        dilation_rate,
        D_mul=K + 1 if K > 1 and depth_multiplier == 2 else None,
    )
    layer.build(in_shape)
    C_in = layer.in_channels
    p = randomize(layer, rng)
    assert p["W"].shape == (C_in * depth_multiplier, 1, layer.D_mul)
    x = rng.standard_normal(in_shape).astype("float32")
    y = check_layer(layer, x, out_shape, expected_trainable=3 if K > 1 else 2)
    # The depthwise layer is the grouped DO-Conv with groups = C_in for the same canonical parameters.
    assert_close32(y, oracle(x, p, kernel_size, C_in, strides, padding, dilation_rate, data_format))
    kernel = to_numpy(layer.fuse().kernel)
    assert type(layer.fuse()) is keras.layers.DepthwiseConv2D
    assert_close32(
        core.kernel_from_keras(kernel.reshape(kernel.shape[:2] + (1, -1))),
        core.fold(p["W"], p["D"], C_in, layer.kernel_size),
    )
    grouped = DOConv2D(
        C_in * depth_multiplier, kernel_size, strides, padding, data_format, dilation_rate, C_in, D_mul=layer.D_mul
    )
    grouped.build(in_shape)
    set_params(grouped, p)
    assert_close32(run(grouped, x), y)


def test_depthwise_weights_config_and_from_conv():
    layer = DODepthwiseConv2D(3, depth_multiplier=2, depthwise_regularizer="l2", name="dw", D_mul=10)
    layer.build((None, 6, 6, 3))
    assert [(v.name, tuple(v.shape)) for v in layer.weights] == [("W", (10, 3, 2)), ("D", (9, 10, 3)), ("bias", (6,))]
    assert not np.any(to_numpy(layer.D)) and len(layer.losses) == 2  # the regulariser on W and D
    config = layer.get_config()
    assert config["D_mul"] == 10 and config["depth_multiplier"] == 2
    assert DODepthwiseConv2D.from_config(config).get_config() == config
    conv = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu", name="n")
    x = np.random.default_rng(22).standard_normal((2, 5, 5, 3)).astype("float32")
    y = to_numpy(conv(x))
    do = DODepthwiseConv2D.from_conv(conv, D_mul=12)
    assert do.name == "n" and do.D_mul == 12 and do.padding == "same"
    assert_close32(to_numpy(do(x)), y)
    p = get_params(do)
    assert not np.any(p["D"])
    # Output channel c * 2 + m of the depthwise conv is canonical row c * 2 + m; columns past the tile stay random.
    np.testing.assert_array_equal(p["W"][:, 0, :9], to_numpy(conv.kernel).reshape(9, 6).T)
    assert np.all(np.abs(p["W"][:, :, 9:]) > 0)
    with pytest.raises(TypeError, match="conv must be a keras.layers.DepthwiseConv2D"):
        DODepthwiseConv2D.from_conv(keras.layers.Conv2D(2, 3))


def test_separable_equals_the_native_layer_and_fuses_exactly():
    rng = np.random.default_rng(23)
    layer = DOSeparableConv2D(5, 3, padding="same", depth_multiplier=2, activation="relu", D_mul=11)
    layer.build((None, 6, 6, 3))
    p = randomize(layer, rng)
    assert {k: v.shape for k, v in p.items()} == {
        "W": (6, 1, 11),
        "D": (3, 9, 11),
        "pointwise": (5, 6, 1, 1),
        "bias": (5,),
    }
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    y = check_layer(layer, x, (2, 6, 6, 5), expected_trainable=4)
    depthwise = oracle(x, {**p, "bias": None}, 3, 3, padding="same")
    expected = np.maximum(np.einsum("nhwc,oc->nhwo", depthwise, p["pointwise"][:, :, 0, 0]) + p["bias"], 0)
    assert_close32(y, expected)
    assert type(layer.fuse()) is keras.layers.SeparableConv2D
    conv = keras.layers.SeparableConv2D(4, (1, 3), strides=2, depth_multiplier=1, name="s")
    y = to_numpy(conv(x))
    do = DOSeparableConv2D.from_conv(conv)
    assert do.name == "s" and do.D_mul == 3
    assert_close32(to_numpy(do(x)), y)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: DOConv2D(0, 1), ValueError, r"filters must be positive. Received: filters=0"),
        (lambda: DOConv2D(2, (1, 0)), ValueError, r"kernel_size.*\(1, 0\)"),
        (lambda: DOConv2D(2, (2, 2), strides=(1, 0)), ValueError, r"strides.*\(1, 0\)"),
        (
            lambda: DOConv2D(2, (2, 2), strides=2, dilation_rate=(2, 1)),
            ValueError,
            r"strides > 1 .* dilation_rate > 1.*strides=\(2, 2\), dilation_rate=\(2, 1\)",
        ),
        (lambda: DOConv2D(5, (2, 2), groups=0), ValueError, r"groups must be positive. Received: groups=0"),
        (lambda: DOConv2D(5, (2, 2), groups=2), ValueError, r"divisible by groups. Received: out_channels=5, groups=2"),
        (
            lambda: DODepthwiseConv2D(1, depth_multiplier=0),
            ValueError,
            r"Invalid value for argument `depth_multiplier`. Expected a strictly positive value. "
            r"Received depth_multiplier=0.",
        ),
        (lambda: DODepthwiseConv2D((1, 0), depth_multiplier=2), ValueError, r"kernel_size.*\(1, 0\)"),
        (lambda: DODepthwiseConv2D((2, 2), (1, 0)), ValueError, r"strides.*\(1, 0\)"),
        (lambda: DODepthwiseConv2D(3, D_mul=4), ValueError, r"D_mul must be at least .* Received: D_mul=4"),
        (lambda: DOSeparableConv2D(0, 3), ValueError, r"filters must be positive. Received: filters=0"),
        # Keras's test_invalid_output_shape_raises and test_conv_symbolic_invalid_configuration
        (
            lambda: DODepthwiseConv2D(5, strides=2, data_format="channels_last")(np.zeros((2, 4, 4, 3), "float32")),
            ValueError,
            r"Computed output size would be zero or negative.",
        ),
        (
            lambda: DOConv2D(1, (2, 2), dilation_rate=(10, 10))(keras.Input((10, 10, 3))),
            ValueError,
            r"Computed output size would be zero or negative.",
        ),
    ],
)
def test_bad_arguments_raise_in_keras_terms(make, error, message):
    with pytest.raises(error, match=message):
        make()


def layer_states(layer):
    return [to_numpy(v).copy() for v in layer.weights]


@pytest.mark.parametrize("kind", ["conv", "depthwise", "separable"])
def test_set_params_is_atomic_and_strict(kind):
    rng = np.random.default_rng(24)
    layer = {
        "conv": lambda: DOConv2D(4, 3, groups=2),
        "depthwise": lambda: DODepthwiseConv2D(3, depth_multiplier=2),
        "separable": lambda: DOSeparableConv2D(3, 3),
    }[kind]()
    layer.build((None, 5, 5, 2))
    good = randomize(layer, rng)
    before = layer_states(layer)
    new_W = good["W"] + 1
    bad = [
        ({**good, "W": new_W, "D": np.full(good["D"].shape, "x")}, TypeError, r"params\['D'\] must hold real numbers"),
        ({**good, "W": new_W, "D": np.empty(good["D"].shape, object)}, TypeError, r"params\['D'\].*dtype object"),
        ({**good, "W": new_W, "D": good["D"] * 1j}, TypeError, r"params\['D'\].*complex"),
        ({**good, "W": new_W, "bias": None}, ValueError, r"params\['bias'\] must have shape .* Received: shape None"),
        ({**good, "W": new_W, "Bias": good["bias"]}, ValueError, r"unknown entries \['Bias'\]"),
        ({**good, "W": new_W, "D": [[1.0], [2.0, 3.0]]}, TypeError, r"params\['D'\] cannot be read as an array"),
        ({**good, "W": new_W, "D": good["D"][:-1]}, ValueError, r"params\['D'\] must have shape"),
        ([("W", new_W)], TypeError, "params must be a dict"),
    ]
    for params, error, message in bad:
        with pytest.raises(error, match=message):
            set_params(layer, params)
        for a, b in zip(layer_states(layer), before):
            np.testing.assert_array_equal(a, b)
    # Integers are numbers: converted to the weight's dtype.
    set_params(layer, {**good, "W": np.ones(good["W"].shape, "int64")})
    assert get_params(layer)["W"].dtype == np.float32 and np.all(get_params(layer)["W"] == 1)


def test_depthwise_and_separable_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(25)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            DODepthwiseConv2D(3, depth_multiplier=2, padding="same", D_mul=10, name="dw"),
            DOSeparableConv2D(3, 3, name="sep"),
        ]
    )
    for layer in model.layers:
        randomize(layer, rng)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [type(layer) for layer in loaded.layers] == [DODepthwiseConv2D, DOSeparableConv2D]
    for a, b in zip(model.layers, loaded.layers):
        assert a.get_config() == b.get_config()
        for name, value in get_params(a).items():
            np.testing.assert_array_equal(get_params(b)[name], value)
    x = rng.standard_normal((1, 5, 5, 2)).astype("float32")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))
