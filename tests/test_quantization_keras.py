"""Keras: a fused DO-Conv model converts to int8 TFLite with a representative dataset and agrees with its float
model as the plain model's int8 TFLite does (TensorFlow backend)."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("TFLite conversion needs the tensorflow backend", allow_module_level=True)
tf = pytest.importorskip("tensorflow")
datasets = pytest.importorskip("sklearn.datasets", reason="the digits data come from scikit-learn")

from doconv.keras import DOConv2D, convert_model, fuse_model  # noqa: E402

pytestmark = pytest.mark.tensorflow_only


@pytest.fixture(scope="module")
def digits():
    data = datasets.load_digits()
    x = (data.images[..., None] / 16.0).astype("float32")  # NHWC, in [0, 1]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], data.target[order]
    return x[:1300], y[:1300], x[1300:], y[1300:]


def small_cnn():
    # momentum 0.9: the moving statistics settle within the few steps this test trains.
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.Conv2D(16, 3, strides=2, padding="same"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def trained(model, x, y):
    keras.utils.set_random_seed(1)  # the same shuffles for both models
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=6, verbose=0)
    return model


def int8_tflite(model, calibration):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def run_tflite(blob, x):
    """Top-1 classes from the TFLite interpreter, and (op name, input dtypes) of every op it runs."""
    resolver = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES  # the ops as converted
    interpreter = tf.lite.Interpreter(model_content=blob, experimental_op_resolver_type=resolver)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    tensors = interpreter.get_tensor_details()
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in tensors}
    # _get_ops_details is the interpreter's only listing of ops; a change in it fails here, loudly.
    ops = [(op["op_name"], [dtypes[i] for i in op["inputs"] if i >= 0]) for op in interpreter._get_ops_details()]
    return interpreter.get_tensor(out["index"]).argmax(1), ops


def test_fused_doconv_model_quantizes_to_int8_tflite_like_the_plain_model(digits):
    x_train, y_train, x_test, y_test = digits
    keras.utils.set_random_seed(0)
    plain = small_cnn()
    doconv = convert_model(plain)  # the same function at the start
    assert sum(isinstance(layer, DOConv2D) for layer in doconv.layers) == 2
    trained(plain, x_train, y_train)
    trained(doconv, x_train, y_train)
    fused = fuse_model(doconv)
    np.testing.assert_allclose(fused.predict(x_test, verbose=0), doconv.predict(x_test, verbose=0), atol=1e-4)
    agreements = {}
    for name, model in (("plain", plain), ("doconv", fused)):
        float_top1 = model.predict(x_test, verbose=0).argmax(1)
        assert (float_top1 == y_test).mean() >= 0.7, name  # trained enough for agreement to mean something
        int8_top1, ops = run_tflite(int8_tflite(model, x_train[:200]), x_test)
        convs = [inputs for op, inputs in ops if op == "CONV_2D"]
        assert len(convs) == 2, ops
        assert all(inputs[:2] == ["int8", "int8"] for inputs in convs), ops  # int8 activations and weights
        agreements[name] = 100.0 * (int8_top1 == float_top1).mean()
    assert agreements["doconv"] >= agreements["plain"] - 2.0, agreements
