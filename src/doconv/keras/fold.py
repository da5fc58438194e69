"""The DOConv2D fold in ``keras.ops``: D + I and W into the Keras kernel, as one batched matmul.

The fold is ``kernel[k, c, o] = sum_s D_hat[k, s, c] * W[s, c, o]`` per group: a matmul of
(K, D_mul) by (D_mul, C_out) for every input channel c. c is a batch axis, and it sits in the
middle of W's Keras layout ``(D_mul, C_in/g, C_out)`` and of the kernel's HWIO layout
``(K, C_in/g, C_out)``, while every backend's batched matmul takes batch axes first. So the fold
is written as what it costs: two transposes of W-sized tensors (W to ``(c, s, o)``, the product
back to ``(k, c, o)``) around one batched matmul; its gradient transposes the kernel's gradient
once and W's gradient once, and reuses W's transposed copy (on tensorflow the matmul gradients
take adjoint flags, not copies). ``ops.einsum`` computes the same contraction, but on tensorflow
each Einsum op (the forward's and the two of its gradient) makes its own transposed copies of
its operands inside its kernel, where the graph does not show them. Measured on one CPU core,
forward plus gradient for 3x3 512->512: einsum 17.9 ms, this 10.6 ms (TF graph); 18.9 / 12.0 ms
(XLA); 30.9 / 15.8 ms (jax) (``python -m doconv.benchmarks.bench_keras_fold``; docs/keras.rst).

The transposes that remain are the batched matmul's price for the two layouts: a multiply-and-sum
over s needs none, but materialises K x W outside XLA and was 2-12x slower on every backend; a
depthwise convolution needs none either (D_hat as K images of D_mul x 1 pixels, W as their filter
with channel multiplier C_out), but the backends' depthwise kernels are made for small multipliers
and it was 3-63x slower (bench_keras_fold's ``depthwise_conv``). Storing W as
``(C_in/g, D_mul, C_out)`` would save the two transposes of W and of its gradient (about a quarter
of the fold on tensorflow and jax), at the price of a change of the checkpoint layout (DESIGN.md
pins the Keras W layout).

The torch backend keeps the einsum (:func:`_fold_einsum`): torch runs it as this same bmm on
strided views, measured as fast, and Keras' torch matmul would fold float64 layers in float32.
"""

from __future__ import annotations

from .._optional import require

keras = require("keras", "doconv.keras", "keras", "Keras 3")
ops = keras.ops


def einsum_backend() -> bool:
    """True on the backend whose products this package writes as einsums: torch.

    torch runs an einsum as a bmm on strided views (as fast as the matmul forms, measured), and
    Keras 3.15's torch ``ops.matmul`` computes in ``dtypes.result_type``, which gives float32 for two
    float64 operands: float64 layers would fold or compose features in float32 there. The fold and
    feature composition both ask this one question.
    """
    return keras.backend.backend() == "torch"


def fold_kernel(D_hat, W, groups: int):
    """The folded kernel ``(K, C_in/groups, C_out)`` of D + I and W, in their dtype.

    Args:
        D_hat: D + I, ``(K, D_mul, C_in)``.
        W: ``(D_mul, C_in/groups, C_out)`` (the Keras layout).
        groups: number of groups; divides C_in and C_out.

    Returns:
        ``kernel[k, c, gi·Og + o] = sum_s D_hat[k, s, gi·Cg + c] · W[s, c, gi·Og + o]`` for group gi, with
        Cg = C_in/groups and Og = C_out/groups; reshaped to ``(M, N, Cg, C_out)`` it is the Conv2D kernel.

    Example:
        >>> import numpy as np
        >>> D_hat = np.ones((4, 4, 2), "float32")
        >>> W = np.ones((4, 2, 3), "float32")
        >>> tuple(fold_kernel(D_hat, W, 1).shape), float(ops.convert_to_numpy(fold_kernel(D_hat, W, 1))[0, 0, 0])
        ((4, 2, 3), 4.0)
    """
    K, D_mul, _ = D_hat.shape
    _, C_in_g, C_out = W.shape
    if einsum_backend():
        return _fold_einsum(D_hat, W, groups)
    if groups == 1:
        # (c, k, s) @ (c, s, o) -> (c, k, o); D_hat's transpose is D-sized, a K·C_out-th of W's.
        product = ops.matmul(ops.transpose(D_hat, (2, 0, 1)), ops.transpose(W, (1, 0, 2)))
        return ops.transpose(product, (1, 0, 2))
    # Group-major views: input channel gi·C_in/g + c of D_hat meets only group gi's C_out/g columns of W.
    # Batch axes (c, g): (c, g, k, s) @ (c, g, s, o) -> (c, g, k, o), then k to the front.
    g = groups
    D_t = ops.transpose(ops.reshape(D_hat, (K, D_mul, g, C_in_g)), (3, 2, 0, 1))
    W_t = ops.transpose(ops.reshape(W, (D_mul, C_in_g, g, C_out // g)), (1, 2, 0, 3))
    product = ops.matmul(D_t, W_t)
    return ops.reshape(ops.transpose(product, (2, 0, 1, 3)), (K, C_in_g, C_out))


def _fold_einsum(D_hat, W, groups: int):
    """The same fold as one einsum: the torch backend's path (why: :func:`einsum_backend`)."""
    K, D_mul, _ = D_hat.shape
    _, C_in_g, C_out = W.shape
    if groups == 1:
        return ops.einsum("ksc,sco->kco", D_hat, W)
    D_hat = ops.reshape(D_hat, (K, D_mul, groups, C_in_g))
    W = ops.reshape(W, (D_mul, C_in_g, groups, C_out // groups))
    return ops.reshape(ops.einsum("ksgc,scgo->kcgo", D_hat, W), (K, C_in_g, C_out))
