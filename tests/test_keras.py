"""doconv.keras: DOConv2D against the NumPy oracle of doconv.core, on the backend named by KERAS_BACKEND."""

import pytest

keras = pytest.importorskip("keras")

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from keras_support import BACKEND, assert_close32, needs_tensorflow, randomize, run, tensorflow_only, to_numpy  # noqa: E402

import doconv  # noqa: E402
from doconv import core  # noqa: E402
from doconv.keras import DOConv2D, convert_model, fuse_model, get_params, set_params  # noqa: E402

REPO = str(Path(doconv.__file__).resolve().parents[1])


# Not 9x8: XLA on CPU (TF 2.21) adds a channels_first bias along the wrong axis when the output is
# (N, C, C, C), which a (5, 3) kernel at stride 2 gives there; keras' own Conv2D shows it too.
def input_shape(data_format, C_in, size=(11, 9), batch=2):
    return (batch,) + size + (C_in,) if data_format == "channels_last" else (batch, C_in) + size


def random_layer(rng, C_in, C_out, kernel_size, data_format="channels_last", groups=1, D_mul=None, **kwargs):
    """A built layer with random W, D (a non-zero offset) and bias, and its canonical parameters."""
    layer = DOConv2D(C_out, kernel_size, data_format=data_format, groups=groups, D_mul=D_mul, **kwargs)
    layer.build(input_shape(data_format, C_in))
    return layer, randomize(layer, rng)


# groups, C_in, C_out, kernel_size, D_mul (None: K; "+2": K+2; "2K"), strides, dilation, padding, data_format, bias
CASES = [
    (1, 3, 5, (3, 3), None, 1, 1, "valid", "channels_last", True),
    (1, 3, 5, (3, 3), "+2", 1, 1, "same", "channels_first", False),
    (1, 4, 4, (1, 1), None, 1, 1, "valid", "channels_last", True),
    (1, 4, 6, (1, 1), None, 2, 1, "same", "channels_first", True),
    (2, 4, 6, (3, 3), "2K", 2, 1, "same", "channels_last", True),
    (2, 4, 6, (1, 3), None, 1, 2, "same", "channels_first", True),
    (2, 6, 4, (5, 3), "+2", 1, 1, "valid", "channels_last", False),
    (4, 4, 4, (3, 3), None, 1, 2, "valid", "channels_last", True),  # depthwise
    (4, 4, 8, (3, 3), "2K", 2, 1, "same", "channels_first", True),  # depthwise, multiplier 2
    (4, 4, 8, (1, 3), "+2", 1, 1, "same", "channels_last", False),  # depthwise, multiplier 2
    (3, 6, 3, (5, 3), "2K", 2, 1, "valid", "channels_first", True),
    (1, 2, 3, (1, 3), "2K", 2, 1, "valid", "channels_last", True),
]


def resolve(rule, kernel_size):
    K = core.kernel_volume(kernel_size)
    return {None: None, "+2": K + 2, "2K": 2 * K}[rule] if K > 1 else None


@pytest.mark.parametrize("groups, C_in, C_out, kernel_size, rule, stride, dilation, padding, data_format, bias", CASES)
def test_outputs_match_the_numpy_oracle(
    groups, C_in, C_out, kernel_size, rule, stride, dilation, padding, data_format, bias
):
    rng = np.random.default_rng(0)
    layer, p = random_layer(
        rng,
        C_in,
        C_out,
        kernel_size,
        data_format,
        groups,
        resolve(rule, kernel_size),
        strides=stride,
        dilation_rate=dilation,
        padding=padding,
        use_bias=bias,
    )
    x = rng.standard_normal(input_shape(data_format, C_in)).astype("float32")
    expected = core.doconv_reference(
        x.astype(np.float64),
        p["W"].astype(np.float64),
        None if p["D"] is None else p["D"].astype(np.float64),
        p["bias"],
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        data_format=data_format,
    )
    y = run(layer, x)
    assert y.shape == expected.shape == layer.compute_output_shape(x.shape)
    assert_close32(y, expected)
    # The kernel property is the folded kernel, and the fused Conv2D gives the same outputs.
    assert_close32(core.kernel_from_keras(to_numpy(layer.kernel)), core.fold(p["W"], p["D"], groups, kernel_size))
    conv = layer.fuse()
    assert type(conv) is keras.layers.Conv2D
    assert_close32(run(conv, x), expected)


def test_weights_layout_init_and_1x1():
    layer = DOConv2D(8, 3, groups=2)
    layer.build((None, 5, 5, 4))
    assert [v.name for v in layer.trainable_weights] == ["W", "D", "bias"]
    assert tuple(layer.W.shape) == (9, 2, 8) and tuple(layer.D.shape) == (9, 9, 4)
    assert not np.any(to_numpy(layer.D)) and np.any(to_numpy(layer.W))
    # glorot_uniform on W's own shape: limit sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (9*2 + 9*8)).
    assert np.max(np.abs(to_numpy(layer.W))) <= np.sqrt(6 / 90)
    one = DOConv2D(3, 1, D_mul=7, use_bias=False)
    one.build((None, 4, 4, 2))
    assert one.D_mul == 1 and one.D is None and [v.name for v in one.weights] == ["W"]
    assert get_params(one)["D"] is None and get_params(one)["bias"] is None


def test_kernel_regularizer_and_constraint_apply_to_W_and_D():
    rng = np.random.default_rng(1)
    layer, p = random_layer(rng, 2, 3, 3, kernel_regularizer=keras.regularizers.L2(0.5), bias_regularizer="l2")
    losses = sorted(float(to_numpy(v)) for v in layer.losses)
    expected = sorted(
        [0.5 * float(np.sum(p["W"] ** 2)), 0.5 * float(np.sum(p["D"] ** 2)), 0.01 * float(np.sum(p["bias"] ** 2))]
    )
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    layer = DOConv2D(3, 3, kernel_constraint="non_neg")
    assert layer.get_config()["kernel_constraint"]["class_name"] == "NonNeg"


def test_from_conv_gives_exactly_the_conv_outputs():
    rng = np.random.default_rng(2)
    conv = keras.layers.Conv2D(6, (3, 3), padding="same", groups=2, activation="relu", name="c1")
    x = rng.standard_normal((2, 7, 7, 4)).astype("float32")
    y = run(conv, x)
    layer = DOConv2D.from_conv(conv, D_mul=2 * 9 + 3)
    assert layer.name == "c1" and layer.groups == 2 and layer.D_mul == 21 and layer.padding == "same"
    assert_close32(run(layer, x), y)
    p = get_params(layer)
    kernel = core.kernel_from_keras(to_numpy(conv.kernel))
    assert not np.any(p["D"])
    np.testing.assert_array_equal(p["W"][:, :, :9], kernel.reshape(6, 2, 9))
    assert not np.any(p["W"][:, :, 9:18])  # the second identity tile
    assert np.all(np.abs(p["W"][:, :, 18:]) > 0)  # past the last tile: the random init is kept
    np.testing.assert_array_equal(p["bias"], to_numpy(conv.bias))
    default = DOConv2D.from_conv(conv)
    assert default.D_mul == 9
    assert_close32(run(default, x), y)


def test_from_conv_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match="conv must be a keras.layers.Conv2D"):
        DOConv2D.from_conv(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="conv must be built"):
        DOConv2D.from_conv(keras.layers.Conv2D(3, 3))
    conv = keras.layers.Conv2D(3, 3)
    conv.build((None, 5, 5, 2))
    with pytest.raises(ValueError, match=r"D_mul must be at least .* Received: D_mul=4"):
        DOConv2D.from_conv(conv, D_mul=4)


def test_params_round_trip_exactly_and_validate_shapes():
    rng = np.random.default_rng(3)
    layer, p = random_layer(rng, 4, 6, (1, 3), groups=2, D_mul=5)
    q = get_params(layer)
    assert q.keys() == p.keys()
    for name in p:
        np.testing.assert_array_equal(q[name], p[name])
    with pytest.raises(ValueError, match=r"params\['D'\] must have shape \(4, 3, 5\) .* Received: shape \(4, 3, 6\)"):
        set_params(layer, {**p, "D": np.zeros((4, 3, 6))})
    with pytest.raises(ValueError, match=r"params\['bias'\] must have shape \(6,\) .* Received: shape None"):
        set_params(layer, {**p, "bias": None})
    with pytest.raises(ValueError, match="unknown entries"):
        set_params(layer, {**p, "kernel": p["W"]})
    with pytest.raises(ValueError, match="not built"):
        get_params(DOConv2D(2, 3))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_params_of_a_low_precision_layer_round_trip(dtype):
    """get_params of a bfloat16 layer gives ml_dtypes arrays (NumPy kind 'V'): set_params takes them back."""
    layer = DOConv2D(4, 3, dtype=dtype)
    layer.build((1, 6, 6, 3))
    rng = np.random.default_rng(4)
    p = {name: rng.standard_normal(value.shape).astype(value.dtype) for name, value in get_params(layer).items()}
    set_params(layer, p)
    for name, value in get_params(layer).items():
        assert value.dtype == p[name].dtype, name
        np.testing.assert_array_equal(value.astype(np.float32), p[name].astype(np.float32))
    with pytest.raises(TypeError, match=r"params\['W'\] must hold real numbers .* Received: dtype complex64"):
        set_params(layer, {**p, "W": p["W"].astype(np.float32).astype(np.complex64)})


def test_arguments_in_the_forms_conv2d_takes():
    """NumPy arrays for kernel_size/strides/dilation_rate and a data_format in any case, as Conv2D takes them."""
    layer = DOConv2D(4, np.array([3, 3]), strides=np.array([2, 1]), data_format="Channels_Last")
    native = keras.layers.Conv2D(4, np.array([3, 3]), strides=np.array([2, 1]), data_format="Channels_Last")
    x = np.random.default_rng(5).standard_normal((1, 7, 7, 2)).astype("float32")
    assert tuple(layer(x).shape) == tuple(native(x).shape)
    config = layer.get_config()
    assert (config["kernel_size"], config["strides"], config["data_format"]) == ((3, 3), (2, 1), "channels_last")
    json.dumps(config)  # Python ints, not NumPy's


def test_config_round_trip():
    layer = DOConv2D(
        6,
        (1, 3),
        strides=2,
        padding="same",
        data_format="channels_first",
        groups=3,
        activation="relu",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer="l2",
        activity_regularizer="l1",
        D_mul=5,
        name="doc",
    )
    config = layer.get_config()
    assert config["D_mul"] == 5 and config["strides"] == (2, 2) and config["name"] == "doc"
    clone = DOConv2D.from_config(config)
    assert clone.get_config() == config
    assert keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == config


def test_keras_file_round_trip_without_custom_objects(tmp_path):
    rng = np.random.default_rng(4)
    model = keras.Sequential([keras.Input((6, 6, 3)), DOConv2D(4, 3, D_mul=11, name="doc"), DOConv2D(2, 1)])
    layer = model.get_layer("doc")
    set_params(layer, {**get_params(layer), "D": rng.standard_normal((3, 9, 11)).astype("float32")})
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("doc")) is DOConv2D
    for a, b in zip(model.layers, loaded.layers):
        for name, value in get_params(a).items():
            np.testing.assert_array_equal(get_params(b)[name], value)
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def test_fit_trains_W_and_D():
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6, 6, 4)), DOConv2D(4, 3, groups=2, name="doc"), keras.layers.Flatten()])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = get_params(model.get_layer("doc"))
    x = rng.standard_normal((8, 6, 6, 4)).astype("float32")
    history = model.fit(x, np.zeros((8, 64), "float32"), batch_size=4, epochs=2, verbose=0)
    after = get_params(model.get_layer("doc"))
    assert history.history["loss"][-1] < history.history["loss"][0]
    for name in ("W", "D", "bias"):
        assert np.all(np.isfinite(after[name])) and np.any(after[name] != before[name]), name
    assert np.any(after["D"])  # D (zero at init) received a non-zero gradient


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_folds_in_float32_and_convolves_in_the_compute_dtype(policy):
    if BACKEND == "torch" and policy == "mixed_float16":
        pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    layer, p = random_layer(rng, 3, 4, 3, padding="same", dtype=policy)
    assert keras.backend.standardize_dtype(layer.W.dtype) == "float32"
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    expected = core.doconv_reference(
        x, p["W"], p["D"], p["bias"], kernel_size=3, padding="same", data_format="channels_last"
    )
    tol = 0.02 if policy == "mixed_float16" else 0.1
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(y, "float32")), expected, rtol=tol, atol=tol * np.max(np.abs(expected))
    )
    assert keras.backend.standardize_dtype(layer.fuse().kernel.dtype) == "float32"


def small_functional():
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="c3")(inputs)
    b = keras.layers.Conv2D(4, 1, name="c1")(inputs)
    x = keras.layers.Add()([a, b])
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(6, (1, 3), strides=2, groups=2, name="c13")(x)
    inner = keras.Sequential(
        [keras.Input((4, 3, 6)), keras.layers.Conv2D(2, 3, padding="same", name="inner")], name="sub"
    )
    x = inner(x)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


def conv_names(model):
    names = {}
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.Conv2D, DOConv2D)):
            names[layer.name] = (type(layer).__name__, getattr(layer, "D_mul", None))
    return names


def test_convert_and_fuse_functional_and_nested_models():
    keras.utils.set_random_seed(7)
    model = small_functional()
    x = np.random.default_rng(7).standard_normal((2, 8, 8, 3)).astype("float32")
    y = to_numpy(model(x))
    original = [w.copy() for w in model.get_weights()]
    converted = convert_model(model)
    assert conv_names(converted) == {
        "c3": ("DOConv2D", 9),
        "c1": ("DOConv2D", 1),
        "c13": ("DOConv2D", 3),
        "inner": ("DOConv2D", 9),
    }
    assert_close32(to_numpy(converted(x)), y)
    fused = fuse_model(converted)
    assert {v[0] for v in conv_names(fused).values()} == {"Conv2D"}
    assert_close32(to_numpy(fused(x)), y)
    assert fused.count_params() == model.count_params()
    # Neither call touched its input.
    assert {v[0] for v in conv_names(model).values()} == {"Conv2D"}
    assert {v[0] for v in conv_names(converted).values()} == {"DOConv2D"}
    for a, b in zip(model.get_weights(), original):
        np.testing.assert_array_equal(a, b)


def test_convert_model_D_mul_int_callable_and_nothing_to_convert():
    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(3, 3, name="a"),
            keras.layers.Conv2D(3, (1, 2), name="b"),
            keras.layers.Conv2D(3, 1, name="c"),
        ]
    )
    x = np.random.default_rng(8).standard_normal((1, 8, 8, 2)).astype("float32")
    with pytest.warns(UserWarning, match=r"D_mul=4 is smaller than K .* 1 layer\(s\).*: a$"):
        converted = convert_model(model, D_mul=4)
    assert conv_names(converted) == {"a": ("DOConv2D", 9), "b": ("DOConv2D", 4), "c": ("DOConv2D", 1)}
    assert_close32(to_numpy(converted(x)), to_numpy(model(x)))
    with pytest.warns(
        UserWarning, match=r"converted 2 of 3 .* left 1 as they are: b \(keras.layers.Conv2D: D_mul returned None\)"
    ):
        picked = convert_model(
            model, D_mul=lambda name, conv: None if name == "b" else 2 * conv.kernel_size[0] * conv.kernel_size[1]
        )
    assert conv_names(picked) == {"a": ("DOConv2D", 18), "b": ("Conv2D", None), "c": ("DOConv2D", 1)}
    assert_close32(to_numpy(picked(x)), to_numpy(model(x)))
    with pytest.raises(ValueError, match="Received: D_mul=2"):
        convert_model(model, D_mul=lambda name, conv: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        convert_model(model, D_mul=9)  # no layer has K > 9: no warning
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="no Conv2D, DepthwiseConv2D or SeparableConv2D layer to convert"):
        copy = convert_model(plain)
    assert copy is not plain
    np.testing.assert_array_equal(copy.get_weights()[0], plain.get_weights()[0])
    with pytest.warns(UserWarning, match="no DO-Conv layer to fuse"):
        fuse_model(plain)


def test_subclassed_models_are_refused():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed model cannot be cloned"):
        convert_model(Net())


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: DOConv2D(4, 3, D_mul=5), ValueError, r"D_mul must be at least .* K .* = 9.* Received: D_mul=5"),
        (
            lambda: DOConv2D(4, 3, strides=2, dilation_rate=2),
            ValueError,
            r"strides > 1 together with dilation_rate > 1.*strides=\(2, 2\), dilation_rate=\(2, 2\)",
        ),
        (
            lambda: DOConv2D(6, 3, groups=4),
            ValueError,
            r"output channels must be divisible by groups. Received: out_channels=6, groups=4",
        ),
        (lambda: DOConv2D(4, (3, 3, 3)), ValueError, r"kernel_size must have 2 entries.*kernel_size=\(3, 3, 3\)"),
        (lambda: DOConv2D(0, 3), ValueError, r"filters must be positive. Received: filters=0"),
        (lambda: DOConv2D(4, 3, padding="causal"), ValueError, r"padding must be .* Received: padding='causal'"),
        (lambda: DOConv2D(4, 3, padding=1), ValueError, r"padding must be 'same' or 'valid'.* Received: padding=1"),
        (lambda: DOConv2D(4, 3, data_format="NHWC"), ValueError, r"Received: data_format='NHWC'"),
        (lambda: DOConv2D(4, 3, groups=2.0), TypeError, r"Received: groups=2.0"),
        (
            lambda: DOConv2D(4, 3, groups=2).build((None, 8, 8, 5)),
            ValueError,
            r"input channels must be divisible by groups. Received: in_channels=5, groups=2, input_shape=\(None, 8, 8, 5\)",
        ),
        (
            lambda: DOConv2D(4, 3, data_format="channels_first").build((None, None, 8, 8)),
            ValueError,
            r"channel dimension .* input_shape=\(None, None, 8, 8\)",
        ),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(make, error, message):
    with pytest.raises(error, match=message):
        make()


@tensorflow_only
@needs_tensorflow
def test_saved_model_export_serves_the_same_outputs(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(9)
    model = keras.Sequential([keras.Input((6, 6, 3)), DOConv2D(4, 3, D_mul=10, name="doc", activation="relu")])
    layer = model.get_layer("doc")
    set_params(layer, {**get_params(layer), "D": rng.standard_normal((3, 9, 10)).astype("float32")})
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    model.export(str(tmp_path / "sm"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))  # kept alive: serve() refers to its variables
    served = reloaded.serve(tf.constant(x))
    assert_close32(served.numpy(), to_numpy(model(x)))


MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from doconv.keras import DOConv2D, get_params

    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6, 6, 3)), DOConv2D(4, 3, D_mul=11, name="doc", activation="relu"),
                                  keras.layers.Flatten(), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        return model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 6, 6, 3)).astype("float32")
    y = rng.standard_normal((24, 2)).astype("float32")
    single = make()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make()
    mirrored.set_weights(single.get_weights())
    start = get_params(single.get_layer("doc"))
    single.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    mirrored.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    a, b = get_params(single.get_layer("doc")), get_params(mirrored.get_layer("doc"))
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "diff": max(float(np.max(np.abs(a[k] - b[k]))) for k in a),
        "scale": max(float(np.max(np.abs(a[k]))) for k in a),
        "moved": min(float(np.max(np.abs(a[k] - start[k]))) for k in a),
        "weights": max(float(np.max(np.abs(u - v))) for u, v in zip(single.get_weights(), mirrored.get_weights())),
    }))
    """
)


@tensorflow_only
@needs_tensorflow
@pytest.mark.slow
def test_mirrored_strategy_on_two_cpus_equals_single_device_training():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["moved"] > 1e-4  # W, D and the bias all trained
    assert result["diff"] <= 1e-5 * result["scale"] and result["weights"] <= 1e-5


def check_convert_then_fuse(model, x):
    y = to_numpy(model.predict_on_batch(x))
    converted = convert_model(model)
    assert any(isinstance(layer, DOConv2D) for layer in converted.layers)
    assert_close32(to_numpy(converted.predict_on_batch(x)), y)
    fused = fuse_model(converted)
    assert not any(isinstance(layer, DOConv2D) for layer in fused.layers)
    assert fused.count_params() == model.count_params()
    assert_close32(to_numpy(fused.predict_on_batch(x)), y)


@pytest.mark.slow
@tensorflow_only
@needs_tensorflow
def test_resnet50_convert_then_fuse_gives_the_original():
    keras.utils.set_random_seed(10)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    x = np.random.default_rng(10).standard_normal((2, 32, 32, 3)).astype("float32")
    check_convert_then_fuse(model, x)


@pytest.mark.slow
@tensorflow_only
@needs_tensorflow
def test_mobilenetv2_convert_then_fuse_gives_the_original():
    keras.utils.set_random_seed(11)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )
    x = np.random.default_rng(11).standard_normal((2, 32, 32, 3)).astype("float32")
    check_convert_then_fuse(model, x)


@tensorflow_only
@needs_tensorflow
@pytest.mark.slow
def test_benchmark_quick_run_prints_a_table(capsys):
    from doconv.benchmarks import bench_keras

    assert bench_keras.main(["--quick", "--without-fold"]) == 0
    out = capsys.readouterr().out
    assert "train step          DO-Conv / Conv2D" in out and "predict, fused" in out
    assert out.count(bench_keras.WITHOUT_FOLD) == 2  # one row per compile mode


@tensorflow_only
@needs_tensorflow
def test_benchmark_without_fold_replaces_only_the_folding_layers_kernels():
    """The --without-fold variant convolves with W's first identity tile, keeps D in the graph, and
    leaves 1x1 layers (no fold) and every other model alone."""
    import keras

    from doconv.benchmarks import bench_keras
    from doconv.keras import DOConv2D, convert_model

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(4, 1)(keras.layers.Conv2D(6, 3, padding="same")(inputs))
    native = keras.Model(inputs, outputs)
    plain, variant = convert_model(native), bench_keras._without_fold(keras, convert_model(native))
    conv3, conv1 = [layer for layer in variant.layers if isinstance(layer, DOConv2D)]
    rng = np.random.default_rng(0)
    conv3.D.assign(rng.standard_normal(conv3.D.shape).astype("float32"))  # the real fold would now differ
    W = np.asarray(conv3.W)
    np.testing.assert_array_equal(np.asarray(conv3.kernel), W[: conv3.K].reshape(3, 3, 3, 6))
    np.testing.assert_array_equal(np.asarray(conv1.kernel), np.asarray(conv1.W).reshape(1, 1, 6, 4))
    assert "_fold" not in vars([layer for layer in plain.layers if isinstance(layer, DOConv2D)][0])
