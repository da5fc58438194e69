"""Feature composition for DOConv2D, where a training batch has few output positions.

The fold costs the same whatever the batch; composing features costs in proportion to the output
positions (docs/maths.rst). `core.training_composition` picks the cheaper order, as in doconv.torch.
Composing features here is two native Convolutions: D_hat as a depthwise convolution with D_mul
filters per input channel (the layer's stride, dilation and padding), then W as a 1x1 grouped
convolution, so it differentiates like any MXNet graph and exports without the custom operator.
The choice is made per batch imperatively (a Gluon block that is not hybridized). A hybridized graph
is traced once from shapeless symbols and then serves every input shape, so no batch size is known
when it is built (and MXNet 1.x's one in-graph branch, contrib.cond, runs its branches as nested
graphs): hybridized layers fold, unless `plan_compositions(net, example)` has fixed each layer's
order from the shapes that example gives it. `use_feature_composition(False)` folds everywhere.
"""

from __future__ import annotations

from .. import core
from .._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import nd  # noqa: E402

_FEATURES = core.Switch()  # use_feature_composition's setting


def use_feature_composition(enabled: bool) -> bool:
    """Let DOConv2D train by feature composition where it is the cheaper order (the default).

    Both orders give the same outputs and gradients up to rounding (docs/maths.rst). The choice is
    made per training batch of a layer that is not hybridized (see the module docstring); turn it off
    to fold in every step, e.g. to compare the two.

    Args:
        enabled: True (the default setting) or False.

    Returns:
        The new setting.

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> use_feature_composition(False)
        False
        >>> use_feature_composition(True)
        True
    """
    return _FEATURES.set(enabled)


def feature_composition_in_use() -> bool:
    """The current setting of :func:`use_feature_composition`."""
    return bool(_FEATURES)


def compose_features(F, x, W, D, bias, C_in: int, kernel_size, D_mul: int, dtype: str, conv_kwargs: dict):
    """The convolution by feature composition: D_hat as a depthwise convolution, then W as 1x1.

    Args:
        F: ``mxnet.ndarray`` or ``mxnet.symbol``.
        x: the NCHW input; W, D, bias: the layer's parameters (bias None without one).
        C_in: input channels; kernel_size: (M, N); D_mul: the depth multiplier; dtype: W's, by name.
        conv_kwargs: the layer's Convolution arguments (stride, dilate, pad, num_group, layout...).
    """
    K = kernel_size[0] * kernel_size[1]
    # I (K, D_mul): the K x K identity in each of the floor(D_mul/K) tiles, zero columns after.
    on = {"ctx": D.context} if F is nd else {}  # a graph's constants go where the graph runs
    identity = F.add_n(*[F.eye(K, D_mul, k=t * K, dtype=dtype, **on) for t in range(D_mul // K)])
    D_hat = F.broadcast_add(D, F.reshape(identity, shape=(1, K, D_mul)))
    # Filter c·D_mul + s of the depthwise step reads channel c: D_hat[c, :, s] as an M x N kernel.
    taps = F.reshape(F.transpose(D_hat, axes=(0, 2, 1)), shape=(-1, 1) + tuple(kernel_size))
    depthwise = dict(conv_kwargs, num_filter=C_in * D_mul, num_group=C_in, no_bias=True)
    features = F.Convolution(x, taps, name="fwd_features", **depthwise)  # (N, C_in·D_mul, H_out, W_out)
    # Group gi's rows of W meet the features of its own C_in/g channels (DESIGN.md, i(o, c)).
    pointwise = dict(conv_kwargs, kernel=(1, 1), stride=(1, 1), dilate=(1, 1), pad=(0, 0))
    kernel = F.reshape(W, shape=(0, -1, 1, 1))  # (C_out, C_in/g·D_mul, 1, 1)
    inputs = (features, kernel) if bias is None else (features, kernel, bias)
    return F.Convolution(*inputs, name="fwd", **pointwise)
