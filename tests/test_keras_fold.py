"""doconv.keras.fold: the batched-matmul fold against doconv.core.fold and the plain einsum, values and gradients."""

import contextlib

import pytest

keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
from keras_support import BACKEND, assert_close32, needs_tensorflow, randomize, to_numpy  # noqa: E402

from doconv import core  # noqa: E402
from doconv.keras import DOConv2D, DODepthwiseConv2D, DOSeparableConv2D, get_params  # noqa: E402
from doconv.keras.fold import fold_kernel  # noqa: E402

ops = keras.ops

# (kernel_size, D_mul, C_in, C_out, groups): D_mul = K, D_mul > K, rectangular and 1-wide kernels, groups > 1
# (one with C_in/g = 1, one with C_out/g = 1), and shapes where D_mul == C_in/g (a transposed axis would fit).
CASES = [
    ((3, 3), None, 5, 7, 1),
    ((3, 3), 13, 4, 6, 1),
    ((2, 3), None, 6, 4, 2),
    ((1, 3), 5, 6, 9, 3),
    ((3, 3), 11, 8, 4, 4),
    ((2, 2), None, 4, 8, 4),
    ((3, 1), None, 6, 3, 3),
    ((3, 3), 9, 9, 9, 1),
]


def _reference_einsum(D_hat, W, groups):
    """The einsum fold the layers used before (Keras layout): the plain path fold_kernel must equal."""
    K, D_mul, C_in = D_hat.shape
    _, C_in_g, C_out = W.shape
    if groups == 1:
        return ops.einsum("ksc,sco->kco", D_hat, W)
    D_hat = ops.reshape(D_hat, (K, D_mul, groups, C_in_g))
    Wg = ops.reshape(W, (D_mul, C_in_g, groups, C_out // groups))
    return ops.reshape(ops.einsum("ksgc,scgo->kcgo", D_hat, Wg), (K, C_in_g, C_out))


def _random(rng, kernel_size, D_mul, C_in, C_out, groups, dtype):
    K = int(np.prod(kernel_size))
    D_mul = K if D_mul is None else D_mul
    W = rng.standard_normal((C_out, C_in // groups, D_mul)).astype(dtype)  # canonical
    D = rng.standard_normal((C_in, K, D_mul)).astype(dtype)
    return W, D, K, D_mul


def _keras_args(W, D, K, D_mul, dtype):
    D_hat = core.D_to_keras(D) + core.identity(K, D_mul, dtype=dtype)[:, :, None]
    return ops.convert_to_tensor(D_hat, dtype=dtype), ops.convert_to_tensor(core.W_to_keras(W), dtype=dtype)


def _precision(dtype):
    """jax computes in float64 only with x64 enabled; the other backends need nothing."""
    if BACKEND == "jax" and dtype == "float64":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _vjp(fn, D_hat, W, G):
    """The gradients of sum(fn(D_hat, W) * G) w.r.t. D_hat and W, on the current backend, as NumPy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch([D_hat, W])
            y = fn(D_hat, W)
        grads = tape.gradient(y, [D_hat, W], output_gradients=tf.constant(G, dtype=W.dtype))
    elif BACKEND == "jax":
        import jax

        _, pullback = jax.vjp(fn, D_hat, W)
        grads = pullback(ops.convert_to_tensor(G, dtype=D_hat.dtype))
    else:
        import torch

        D_hat = D_hat.detach().clone().requires_grad_(True)
        W = W.detach().clone().requires_grad_(True)
        grads = torch.autograd.grad(fn(D_hat, W), (D_hat, W), torch.as_tensor(G, dtype=W.dtype, device=W.device))
    return [to_numpy(g) for g in grads]


def _assert_close(actual, expected, dtype):
    if dtype == "float64":
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(expected))))
    else:
        assert_close32(actual, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel_size, D_mul, C_in, C_out, groups", CASES)
def test_fold_kernel_equals_core_fold_and_the_einsum(kernel_size, D_mul, C_in, C_out, groups, dtype):
    with _precision(dtype):
        _check_values(kernel_size, D_mul, C_in, C_out, groups, dtype)


def _check_values(kernel_size, D_mul, C_in, C_out, groups, dtype):
    rng = np.random.default_rng(sum(kernel_size) * 100 + C_in * 10 + groups)
    W, D, K, D_mul = _random(rng, kernel_size, D_mul, C_in, C_out, groups, dtype)
    D_hat, Wk = _keras_args(W, D, K, D_mul, dtype)
    folded = fold_kernel(D_hat, Wk, groups)
    assert keras.backend.standardize_dtype(folded.dtype) == dtype
    assert tuple(folded.shape) == (K, C_in // groups, C_out)
    expected = core.kernel_to_keras(core.fold(W.astype(np.float64), D.astype(np.float64), groups, kernel_size))
    _assert_close(to_numpy(ops.reshape(folded, kernel_size + (C_in // groups, C_out))), expected, dtype)
    _assert_close(to_numpy(folded), to_numpy(_reference_einsum(D_hat, Wk, groups)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel_size, D_mul, C_in, C_out, groups", CASES)
def test_fold_kernel_gradients_equal_the_einsum_and_numpy(kernel_size, D_mul, C_in, C_out, groups, dtype):
    with _precision(dtype):
        _check_gradients(kernel_size, D_mul, C_in, C_out, groups, dtype)


def _check_gradients(kernel_size, D_mul, C_in, C_out, groups, dtype):
    rng = np.random.default_rng(7 + C_out * 10 + groups)
    W, D, K, D_mul = _random(rng, kernel_size, D_mul, C_in, C_out, groups, dtype)
    D_hat, Wk = _keras_args(W, D, K, D_mul, dtype)
    G = rng.standard_normal((K, C_in // groups, C_out)).astype(dtype)
    g_new = _vjp(lambda a, b: fold_kernel(a, b, groups), D_hat, Wk, G)
    g_ref = _vjp(lambda a, b: _reference_einsum(a, b, groups), D_hat, Wk, G)
    # By hand in NumPy: kernel[k, c, gi·Og + o] = sum_s D_hat[k, s, gi·Cg + c] W[s, c, gi·Og + o].
    Cg, Og = C_in // groups, C_out // groups
    Dg = to_numpy(D_hat).astype(np.float64).reshape(K, D_mul, groups, Cg)
    Wg = to_numpy(Wk).astype(np.float64).reshape(D_mul, Cg, groups, Og)
    Gg = G.astype(np.float64).reshape(K, Cg, groups, Og)
    g_D = np.einsum("kcgo,scgo->ksgc", Gg, Wg).reshape(K, D_mul, C_in)
    g_W = np.einsum("ksgc,kcgo->scgo", Dg, Gg).reshape(D_mul, Cg, C_out)
    for new, ref, hand in zip(g_new, g_ref, (g_D, g_W)):
        _assert_close(new, ref, dtype)
        _assert_close(new, hand, dtype)


@needs_tensorflow
@pytest.mark.parametrize("kernel_size, D_mul, C_in, C_out, groups", CASES[:5])
def test_fold_kernel_under_xla_equals_the_graph(kernel_size, D_mul, C_in, C_out, groups):
    import tensorflow as tf

    rng = np.random.default_rng(3)
    W, D, K, D_mul = _random(rng, kernel_size, D_mul, C_in, C_out, groups, "float32")
    D_hat, Wk = _keras_args(W, D, K, D_mul, "float32")
    G = tf.constant(rng.standard_normal((K, C_in // groups, C_out)).astype("float32"))

    def step(D_hat, W):
        with tf.GradientTape() as tape:
            tape.watch([D_hat, W])
            y = fold_kernel(D_hat, W, groups)
        return [y] + tape.gradient(y, [D_hat, W], output_gradients=G)

    for xla, graph in zip(tf.function(step, jit_compile=True)(D_hat, Wk), tf.function(step)(D_hat, Wk)):
        assert_close32(to_numpy(xla), to_numpy(graph))


def _w_sized_transposes(graph, size: int) -> list:
    """The graph's Transpose ops whose input has ``size`` elements."""
    transposes = [op for op in graph.get_operations() if op.type == "Transpose"]
    return [op for op in transposes if op.inputs[0].shape.num_elements() == size]


@needs_tensorflow
@pytest.mark.parametrize("groups", [1, 4])
def test_the_fold_graph_transposes_w_sized_tensors_only_where_the_layouts_force_it(groups):
    """Two W-sized copies forward (W to batch-first, the product to HWIO), two backward, no Einsum kernel.

    TF's Einsum op transposes inside its kernel, invisible in the graph, so the test also refuses it.
    Shapes where D and the kernel's sizes differ from W's, so that only W-sized tensors are counted.
    """
    import tensorflow as tf

    K, D_mul, C_in, C_out = 9, 10, 16, 12
    D_hat = tf.zeros((K, D_mul, C_in))
    W = tf.zeros((D_mul, C_in // groups, C_out))
    G = tf.zeros((K, C_in // groups, C_out))
    size_W, size_kernel = D_mul * C_in // groups * C_out, K * C_in // groups * C_out

    def forward(D_hat, W):
        return fold_kernel(D_hat, W, groups)

    def both(D_hat, W):
        with tf.GradientTape() as tape:
            tape.watch([D_hat, W])
            y = fold_kernel(D_hat, W, groups)
        return tape.gradient(y, [D_hat, W], output_gradients=G)

    fwd = tf.function(forward).get_concrete_function(D_hat, W).graph
    full = tf.function(both).get_concrete_function(D_hat, W).graph
    for graph in (fwd, full):
        types = [op.type for op in graph.get_operations()]
        assert "Einsum" not in types and "Tile" not in types, types
    assert [op.type for op in fwd.get_operations()].count("BatchMatMulV2") == 1
    assert len(_w_sized_transposes(fwd, size_W)) == 1  # W to (c, s, o)
    assert len(_w_sized_transposes(fwd, size_kernel)) == 1  # the product to (k, c, o)
    assert len(_w_sized_transposes(full, size_W)) == 2  # + W's gradient back to (s, c, o)
    assert len(_w_sized_transposes(full, size_kernel)) == 2  # + the kernel's gradient to (c, k, o)


@needs_tensorflow
def test_the_layer_fold_is_fold_kernel():
    import tensorflow as tf

    layer = DOConv2D(12, 3, groups=2, D_mul=10)
    layer.build((None, 8, 8, 16))
    types = [op.type for op in tf.function(layer._fold).get_concrete_function().graph.get_operations()]
    assert "Einsum" not in types and types.count("BatchMatMulV2") == 1


def _folded_expected(layer, p, native_shape):
    groups = getattr(layer, "groups", layer.in_channels)
    W = p["W"].astype(np.float64)
    D = None if p["D"] is None else p["D"].astype(np.float64)
    kernel = core.kernel_to_keras(core.fold(W, D, groups, layer.kernel_size))
    return kernel.reshape(native_shape)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: DOConv2D(6, 3, D_mul=11), (1, 6, 6, 4)),
        (lambda: DOConv2D(6, (2, 3), groups=3), (1, 6, 6, 6)),
        (lambda: DOConv2D(5, 1), (1, 4, 4, 3)),  # 1x1: no D, the fold is a reshape
        (lambda: DOConv2D(4, (1, 3), groups=2, D_mul=4), (1, 5, 5, 4)),
        (lambda: DODepthwiseConv2D(3, depth_multiplier=2, D_mul=10), (1, 6, 6, 3)),
        (lambda: DODepthwiseConv2D(1, depth_multiplier=3), (1, 4, 4, 2)),
        (lambda: DOSeparableConv2D(5, (3, 2), depth_multiplier=2), (1, 6, 6, 3)),
    ],
)
def test_layer_kernels_equal_core_fold(make, shape):
    rng = np.random.default_rng(11)
    layer = make()
    layer.build(shape)
    p = randomize(layer, rng)
    kernel = layer.kernel if not isinstance(layer, DOSeparableConv2D) else layer.depthwise_kernel
    native_shape = tuple(kernel.shape)
    assert_close32(to_numpy(kernel), _folded_expected(layer, p, native_shape))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("groups", [1, 2])
def test_mixed_precision_folds_in_the_variable_dtype(policy, groups):
    """Under a mixed policy the fold runs in float32 (the variables'), equal to the float32 fold."""
    rng = np.random.default_rng(5)
    layer = DOConv2D(4, 3, groups=groups, D_mul=10, dtype=policy)
    layer.build((None, 6, 6, 4))
    p = randomize(layer, rng)
    kernel = layer._fold()
    assert keras.backend.standardize_dtype(kernel.dtype) == "float32"
    assert_close32(to_numpy(kernel), _folded_expected(layer, get_params(layer), tuple(kernel.shape)))
    assert_close32(to_numpy(kernel), _folded_expected(layer, p, tuple(kernel.shape)))


def test_a_float64_layer_folds_in_float64():
    with _precision("float64"):
        rng = np.random.default_rng(9)
        layer = DOConv2D(6, 3, groups=2, D_mul=10, dtype="float64")
        layer.build((None, 6, 6, 4))
        p = randomize(layer, rng)
        kernel = layer.kernel
        assert keras.backend.standardize_dtype(kernel.dtype) == "float64"
        expected = _folded_expected(layer, p, tuple(kernel.shape))
        np.testing.assert_allclose(to_numpy(kernel), expected, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(expected))))
