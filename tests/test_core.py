"""doconv.core: the maths against hand-computed and property-based cases, and its errors."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doconv import core
from doconv._optional import require

RTOL64 = 1e-10


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def brute_force_fold(W, D, groups, kernel_size):
    """The definition, one loop per index."""
    C_out, C_in_g, D_mul = W.shape
    K = int(np.prod(kernel_size))
    I = np.zeros((K, D_mul))
    for s in range(K * (D_mul // K)):
        I[s % K, s] = 1
    out = np.zeros((C_out, C_in_g, K))
    for o in range(C_out):
        for c in range(C_in_g):
            i = (o // (C_out // groups)) * C_in_g + c
            for k in range(K):
                out[o, c, k] = sum((D[i, k, s] + I[k, s]) * W[o, c, s] for s in range(D_mul))
    return out.reshape((C_out, C_in_g) + tuple(kernel_size))


def brute_force_conv2d(x, kernel, stride, dilation, groups):
    """Unpadded 2-D grouped cross-correlation with explicit loops."""
    N, C_in, H, Wd = x.shape
    C_out, C_in_g, M, Nk = kernel.shape
    Ho = (H - dilation[0] * (M - 1) - 1) // stride[0] + 1
    Wo = (Wd - dilation[1] * (Nk - 1) - 1) // stride[1] + 1
    y = np.zeros((N, C_out, Ho, Wo))
    for o in range(C_out):
        g = o // (C_out // groups)
        for c in range(C_in_g):
            for m in range(M):
                for n in range(Nk):
                    rows = slice(m * dilation[0], m * dilation[0] + stride[0] * (Ho - 1) + 1, stride[0])
                    cols = slice(n * dilation[1], n * dilation[1] + stride[1] * (Wo - 1) + 1, stride[1])
                    y[:, o] += kernel[o, c, m, n] * x[:, g * C_in_g + c, rows, cols]
    return y


# --- the identity and hand-computed folds -------------------------------------------------


def test_identity_is_tiled_with_zero_columns_after():
    assert core.identity(3, 7).astype(int).tolist() == [
        [1, 0, 0, 1, 0, 0, 0],
        [0, 1, 0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0, 1, 0],
    ]
    assert core.identity(1, 1).tolist() == [[1.0]]


def test_fold_hand_computed_single_channel():
    # K = 2 taps, D_mul = 2: D_hat = D + I = [[1.5, 0], [0, 1]] -> Kf[k] = sum_s D_hat[k, s] W[s]
    W = np.array([[[2.0, 3.0]]])
    D = np.array([[[0.5, 0.0], [0.0, 0.0]]])
    assert core.fold(W, D, 1, (1, 2)).tolist() == [[[[3.0, 3.0]]]]


def test_fold_hand_computed_groups_use_the_channel_the_conv_applies_it_to():
    # C_in = 4, C_out = 2, groups = 2, kernel 1x2, D_mul = 2. Output 1 is in group 1, so
    # its kernel column c = 0 meets input channel 2: D of channel 2, not channel 1.
    W = np.ones((2, 2, 2))
    D = np.zeros((4, 2, 2))
    D[2] = [[1.0, 0.0], [0.0, 0.0]]  # channel 2's tap 0 gets (1+1)*W + 0 = 2
    folded = core.fold(W, D, 2, (1, 2))
    assert folded[1, 0, 0].tolist() == [2.0, 1.0]
    assert folded[0, 0, 0].tolist() == [1.0, 1.0]
    assert folded[1, 1, 0].tolist() == [1.0, 1.0]


def test_in_channel_index_depthwise_with_multiplier():
    assert core.in_channel_index(4, 2, 2)[:, 0].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("groups,C_in,C_out", [(1, 3, 4), (2, 4, 6), (4, 4, 4), (4, 4, 8)])
@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 3), (5, 3), (2,), (2, 1, 2)])
@pytest.mark.parametrize("D_mul_rule", ["K", "K+1", "2K", "2K+3"])
def test_fold_matches_the_definition(groups, C_in, C_out, kernel_size, D_mul_rule):
    rng = np.random.default_rng(0)
    K = int(np.prod(kernel_size))
    D_mul = {"K": K, "K+1": K + 1, "2K": 2 * K, "2K+3": 2 * K + 3}[D_mul_rule]
    W = rng.normal(size=(C_out, C_in // groups, D_mul))
    D = rng.normal(size=(C_in, K, D_mul))
    assert rel_err(core.fold(W, D, groups, kernel_size), brute_force_fold(W, D, groups, kernel_size)) < RTOL64


def test_fold_1x1_is_W_itself():
    W = np.arange(6.0).reshape(3, 2, 1)
    assert core.fold(W, None, 1, (1, 1)).tolist() == W.reshape(3, 2, 1, 1).tolist()


def test_fold_keeps_float32():
    W = np.ones((2, 2, 9), np.float32)
    assert core.fold(W, np.zeros((2, 9, 9), np.float32), 1, (3, 3)).dtype == np.float32


# --- the reference forward passes ---------------------------------------------------------


def test_extract_patches_hand_computed_and_padding_modes():
    x = np.array([[[1.0, 2.0, 3.0]]])  # (N=1, C=1, L=3)
    tap0 = {mode: core.extract_patches(x, 3, padding=1, padding_mode=mode)[0, 0, 0] for mode in core.PADDING_MODES}
    # tap 0 of each window reads the element left of the centre: the padded value at position 0
    assert tap0["zeros"].tolist() == [0.0, 1.0, 2.0]
    assert tap0["reflect"].tolist() == [2.0, 1.0, 2.0]
    assert tap0["replicate"].tolist() == [1.0, 1.0, 2.0]
    assert tap0["circular"].tolist() == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("stride,dilation", [((1, 1), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (2, 2)), ((2, 2), (2, 1))])
@pytest.mark.parametrize("groups,C_in,C_out", [(1, 2, 3), (2, 4, 2), (2, 2, 4)])
def test_conv_reference_matches_loops(stride, dilation, groups, C_in, C_out):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, C_in, 9, 8))
    kernel = rng.normal(size=(C_out, C_in // groups, 3, 2))
    bias = rng.normal(size=C_out)
    got = core.conv_reference(x, kernel, bias, stride, 0, dilation, groups)
    want = brute_force_conv2d(x, kernel, stride, dilation, groups) + bias[None, :, None, None]
    assert rel_err(got, want) < RTOL64
    # channels_last is the same computation on transposed data
    got_last = core.conv_reference(
        x.transpose(0, 2, 3, 1), kernel, bias, stride, 0, dilation, groups, data_format="channels_last"
    )
    assert rel_err(got_last.transpose(0, 3, 1, 2), want) < RTOL64


def test_same_padding_rules():
    # stride 1: independent of the input, odd pixel after (PyTorch and TensorFlow agree)
    assert core.same_padding(None, (4, 3), (1, 1), (1, 1)) == ((1, 2), (1, 1))
    assert core.same_padding(None, (3,), (1,), (2,)) == ((2, 2),)
    # stride 2: TensorFlow's rule depends on the input size
    assert core.same_padding((7,), (3,), (2,), (1,)) == ((1, 1),)
    assert core.same_padding((8,), (3,), (2,), (1,)) == ((0, 1),)
    assert core.output_shape((8, 7), (3, 3), (2, 2), (1, 1), "same") == (4, 4)
    assert core.output_shape((8, 8), (3, 3), (1, 1), (2, 2), "valid") == (4, 4)
    assert core.output_shape((5,), (3,), (1,), (1,), ((2, 0),)) == (5,)


def test_padding_forms():
    assert core.normalize_padding((1, 2), 2) == ((1, 1), (2, 2))
    assert core.normalize_padding([[0, 1], [2, 3]], 2) == ((0, 1), (2, 3))
    assert core.normalize_padding("Valid", 2) == "valid"


# --- property-based: fold == feature composition == conv(folded) ---------------------------


@st.composite
def doconv_cases(draw):
    rank = draw(st.integers(1, 3))
    kernel_size = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    K = int(np.prod(kernel_size))
    groups = draw(st.integers(1, 3))
    C_in = groups * draw(st.integers(1, 2))
    C_out = groups * draw(st.integers(1, 3))
    D_mul = None if K == 1 else K + draw(st.integers(0, K + 3))
    stride = tuple(draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank)))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank)))
    padding = draw(st.sampled_from([0, 1, "valid", "same"]))
    if padding == "same" and any(s > 1 for s in stride):
        padding = 1
    mode = draw(st.sampled_from(core.PADDING_MODES))
    spatial = tuple(d * (k - 1) + 1 + draw(st.integers(1, 4)) for k, d in zip(kernel_size, dilation))
    data_format = draw(st.sampled_from([core.CHANNELS_FIRST, core.CHANNELS_LAST]))
    seed = draw(st.integers(0, 2**31))
    return rank, kernel_size, groups, C_in, C_out, D_mul, stride, dilation, padding, mode, spatial, data_format, seed


@settings(max_examples=150, deadline=None)
@given(doconv_cases())
def test_kernel_and_feature_composition_agree(case):
    _, kernel_size, groups, C_in, C_out, D_mul, stride, dilation, padding, mode, spatial, data_format, seed = case
    rng = np.random.default_rng(seed)
    D_mul = core.resolve_D_mul(D_mul, kernel_size)
    K = core.kernel_volume(kernel_size)
    W = rng.normal(size=(C_out, C_in // groups, D_mul))
    D = rng.normal(size=(C_in, K, D_mul)) if K > 1 else None
    bias = rng.normal(size=C_out)
    x = rng.normal(size=(2, C_in) + spatial)
    if data_format == core.CHANNELS_LAST:
        x = np.moveaxis(x, 1, -1)
    args = (bias, kernel_size, stride, padding, dilation, groups, mode, data_format)
    by_kernel = core.doconv_reference(x, W, D, *args)
    by_feature = core.doconv_reference(x, W, D, *args, composition="feature")
    plain = core.conv_reference(
        x, core.fold(W, D, groups, kernel_size), bias, stride, padding, dilation, groups, mode, data_format
    )
    assert rel_err(by_feature, by_kernel) < RTOL64
    assert rel_err(plain, by_kernel) < RTOL64


def test_composition_macs_count_what_each_order_adds():
    # folding: one product per (o, c, k, s); features: per position the depthwise step (C_in·K·D_mul)
    # and W's D_mul - K columns beyond the taps (C_out·C_in/g of them each)
    assert core.composition_macs(1, 4, 6, 2, 9, 11) == (6 * 2 * 9 * 11, 4 * 9 * 11 + 6 * 2 * 2)
    assert core.composition_macs(10, 4, 6, 2, 9, 9) == (6 * 2 * 9 * 9, 10 * 4 * 9 * 9)


def test_training_composition_picks_features_only_well_below_break_even():
    kernel, per_position = core.composition_macs(1, 512, 512, 1, 9, 9)
    edge = kernel // (core.FEATURE_COMPOSITION_MARGIN * per_position)
    assert edge == 256  # 16 images of 4x4 positions
    assert core.training_composition(edge, 512, 512, 1, 9, 9) == "feature"
    assert core.training_composition(edge + 1, 512, 512, 1, 9, 9) == "kernel"
    # groups shrink the fold, not the depthwise step: depthwise layers always fold
    assert core.training_composition(1, 64, 64, 64, 9, 9) == "kernel"
    # a deeper D_mul makes W's step dearer than the plain kernel's
    assert core.training_composition(edge, 512, 512, 1, 9, 18) == "kernel"
    # nothing to compose (1x1) or no positions
    assert core.training_composition(1, 512, 512, 1, 1, 1) == "kernel"
    assert core.training_composition(0, 512, 512, 1, 9, 9) == "kernel"


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 12), st.integers(0, 2**31))
def test_at_zero_offset_the_fold_sums_W_over_the_identity_tiles(m, n, extra, seed):
    K = m * n
    D_mul = 1 if K == 1 else K + extra
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(3, 2, D_mul))
    D = np.zeros((2, K, D_mul)) if K > 1 else None
    tiles = D_mul // K
    want = sum(W[:, :, t * K : (t + 1) * K] for t in range(tiles)).reshape(3, 2, m, n)
    assert rel_err(core.fold(W, D, 1, (m, n)), want) < RTOL64


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 12), st.integers(0, 2**31))
def test_embed_kernel_inverts_fold_at_zero_offset(m, n, extra, seed):
    K = m * n
    D_mul = 1 if K == 1 else K + extra
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(4, 2, m, n))
    W0 = rng.normal(size=(4, 2, D_mul))
    W = core.embed_kernel(kernel, W0)
    D = np.zeros((2, K, D_mul)) if K > 1 else None
    assert rel_err(core.fold(W, D, 1, (m, n)), kernel) < RTOL64
    tail = K * (D_mul // K)
    assert np.array_equal(W[:, :, tail:], W0[:, :, tail:])  # the columns past the last tile keep their init


# --- layouts and the original code's checkpoints ------------------------------------------


def test_layout_round_trips_and_orders():
    rng = np.random.default_rng(2)
    W, D, kernel = rng.normal(size=(6, 2, 10)), rng.normal(size=(4, 9, 10)), rng.normal(size=(6, 2, 5, 3))
    assert core.W_to_keras(W)[7, 1, 5] == W[5, 1, 7]
    assert core.D_to_keras(D)[8, 9, 3] == D[3, 8, 9]
    assert core.kernel_to_keras(kernel)[4, 2, 1, 5] == kernel[5, 1, 4, 2]
    assert core.kernel_to_gluon(kernel, "channels_last")[5, 4, 2, 1] == kernel[5, 1, 4, 2]
    assert np.array_equal(core.W_from_keras(core.W_to_keras(W)), W)
    assert np.array_equal(core.D_from_keras(core.D_to_keras(D)), D)
    assert np.array_equal(core.kernel_from_keras(core.kernel_to_keras(kernel)), kernel)
    assert np.array_equal(
        core.kernel_from_gluon(core.kernel_to_gluon(kernel, "channels_last"), "channels_last"), kernel
    )
    assert core.kernel_to_gluon(kernel) is kernel


def original_pytorch_fold(W, D, D_diag, groups, kernel_size):
    """What the original DO-Conv PyTorch code computes (its reshape-and-einsum), in NumPy."""
    C_out, C_in_g, D_mul = W.shape
    C_in = C_in_g * groups
    W_r = W.reshape(C_out // groups, C_in, D_mul)
    return np.einsum("ims,ois->oim", D + D_diag, W_r).reshape((C_out, C_in_g) + kernel_size)


@pytest.mark.parametrize("groups,C_in,C_out", [(1, 3, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (2, 4, 6)])
def test_reference_pytorch_checkpoints(groups, C_in, C_out):
    rng = np.random.default_rng(3)
    W = rng.normal(size=(C_out, C_in // groups, 9))
    D = rng.normal(size=(C_in, 9, 9))
    D_diag = np.tile(core.identity(9, 9)[None], (C_in, 1, 1))
    original = original_pytorch_fold(W, D, D_diag, groups, (3, 3))
    assert rel_err(core.fold_reference_pytorch(W, D, D_diag, groups, (3, 3)), original) < RTOL64
    exact = groups == 1 or (groups == C_in == C_out)
    if exact:
        params = core.from_reference_pytorch(W, D, D_diag, groups)
        assert rel_err(core.fold(params["W"], params["D"], groups, (3, 3)), original) < RTOL64
    else:
        with pytest.raises(ValueError, match=rf"cannot be loaded exactly.*Received: groups={groups}"):
            core.from_reference_pytorch(W, D, D_diag, groups)


# --- bad input: each error names the argument and the value received -----------------------


@pytest.mark.parametrize(
    "call,error,message",
    [
        (
            lambda: core.check_int(0, "in_channels"),
            ValueError,
            r"in_channels must be positive. Received: in_channels=0",
        ),
        (
            lambda: core.check_int(2.0, "out_channels"),
            TypeError,
            r"out_channels must be an integer. Received: out_channels=2.0",
        ),
        (lambda: core.check_int(True, "groups"), TypeError, r"groups must be an integer. Received: groups=True"),
        (
            lambda: core.normalize_tuple(-1, 2, "kernel_size"),
            ValueError,
            r"kernel_size must be positive. Received: kernel_size=-1",
        ),
        (
            lambda: core.normalize_tuple((3, 0), 2, "kernel_size"),
            ValueError,
            r"kernel_size entries must be positive. Received: kernel_size=\(3, 0\)",
        ),
        (
            lambda: core.normalize_tuple((3, 3, 3), 2, "stride"),
            ValueError,
            r"stride must have 2 entries.*Received: stride=\(3, 3, 3\)",
        ),
        (
            lambda: core.normalize_tuple((1, True), 2, "dilation"),
            TypeError,
            r"dilation entries must be integers. Received: dilation=\(1, True\)",
        ),
        (lambda: core.normalize_tuple("3", 2, "kernel_size"), TypeError, r"Received: kernel_size='3'"),
        (lambda: core.normalize_padding(-1, 2), ValueError, r"padding must be >= 0. Received: padding=-1"),
        (
            lambda: core.normalize_padding((1, -2), 2),
            ValueError,
            r"padding entries must be >= 0. Received: padding=\(1, -2\)",
        ),
        (
            lambda: core.normalize_padding("full", 2),
            ValueError,
            r"padding must be 'same', 'valid'.*Received: padding='full'",
        ),
        (lambda: core.normalize_padding((1, 2, 3), 2), ValueError, r"Received: padding=\(1, 2, 3\)"),
        (
            lambda: core.check_padding_mode("mirror"),
            ValueError,
            r"padding_mode must be one of.*Received: padding_mode='mirror'",
        ),
        (
            lambda: core.check_groups(6, 4, 4),
            ValueError,
            r"input channels must be divisible by groups. Received: in_channels=6, groups=4",
        ),
        (
            lambda: core.check_groups(4, 6, 4),
            ValueError,
            r"output channels must be divisible by groups. Received: out_channels=6, groups=4",
        ),
        (
            lambda: core.resolve_D_mul(4, (3, 3)),
            ValueError,
            r"D_mul must be at least.*K = prod\(kernel_size\) = 9.*Received: D_mul=4, kernel_size=\(3, 3\)",
        ),
        (lambda: core.resolve_D_mul(0, (3, 3)), ValueError, r"D_mul must be positive. Received: D_mul=0"),
        (lambda: core.resolve_D_mul(True, (3, 3)), TypeError, r"D_mul must be an integer. Received: D_mul=True"),
        (
            lambda: core.check_stride_dilation((2, 2), (2, 1)),
            ValueError,
            r"Received: strides=\(2, 2\), dilation_rate=\(2, 1\)",
        ),
        (lambda: core.normalize_data_format("NCHW"), ValueError, r"Received: data_format='NCHW'"),
        (
            lambda: core.gluon_layout("NCWH", 2),
            ValueError,
            r"layout must be one of \('NCHW', 'NHWC'\). Received: layout='NCWH'",
        ),
        (
            lambda: core.same_padding(None, (3,), (2,), (1,)),
            ValueError,
            r"depends on the input size.*Received: stride=\(2,\)",
        ),
        (
            lambda: core.output_shape((2, 2), (3, 3), (1, 1), (1, 1), 0),
            ValueError,
            r"smaller than the dilated kernel.*Received: input spatial shape=\(2, 2\)",
        ),
        (lambda: core.identity(0, 3), ValueError, r"K must be positive. Received: K=0"),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_arguments_in_the_forms_the_native_layers_take():
    """1-d NumPy arrays for the int tuples, and data formats in any case, as Keras, torch and Gluon take them."""
    assert core.normalize_tuple(np.array([3, 1]), 2, "kernel_size") == (3, 1)
    assert all(type(v) is int for v in core.normalize_tuple(np.array([2, 2], np.int32), 2, "strides"))
    with pytest.raises(TypeError, match=r"strides entries must be integers. Received: strides=\(1.5, 2.0\)"):
        core.normalize_tuple(np.array([1.5, 2.0]), 2, "strides")
    with pytest.raises(TypeError, match=r"kernel_size must be an integer or a sequence of 2 integers"):
        core.normalize_tuple(np.ones((2, 2), int), 2, "kernel_size")
    assert core.normalize_data_format("Channels_First") == core.CHANNELS_FIRST
    assert core.normalize_data_format("CHANNELS_LAST") == core.CHANNELS_LAST
    with pytest.raises(ValueError, match=r"Received: data_format=None"):
        core.normalize_data_format(None)


@pytest.mark.parametrize(
    "W,D,groups,kernel_size,message",
    [
        (
            np.ones((4, 2)),
            np.zeros((2, 9, 9)),
            1,
            (3, 3),
            r"W must be an array of shape \(C_out, C_in/groups, D_mul\). Received: W.shape=\(4, 2\)",
        ),
        (
            np.ones((4, 2, 9)),
            np.zeros((3, 9, 9)),
            1,
            (3, 3),
            r"D must have shape \(C_in, K, D_mul\) = \(2, 9, 9\).*Received: D.shape=\(3, 9, 9\)",
        ),
        (
            np.ones((4, 2, 9)),
            np.zeros((2, 9, 9)),
            3,
            (3, 3),
            r"output channels must be divisible by groups. Received: W.shape=\(4, 2, 9\), groups=3",
        ),
        (np.ones((4, 2, 4)), np.zeros((2, 4, 4)), 1, (3, 3), r"Received: D.shape=\(2, 4, 4\)"),
        (np.ones((4, 2, 9)), None, 1, (3, 3), r"D is required.*Received: kernel_size=\(3, 3\)"),
        (np.ones((4, 2, 1)), np.zeros((2, 1, 1)), 1, (1, 1), r"no depthwise kernel D. Received: D.shape=\(2, 1, 1\)"),
        (np.ones((4, 2, 9)), np.zeros((2, 9, 9)), 0, (3, 3), r"groups must be positive. Received: groups=0"),
    ],
)
def test_fold_refuses_shapes_that_disagree(W, D, groups, kernel_size, message):
    with pytest.raises(ValueError, match=message):
        core.fold(W, D, groups, kernel_size)


def test_fold_refuses_D_mul_below_K_from_shapes():
    with pytest.raises(ValueError, match=r"D_mul must be at least K = 9. Received: D_mul=4"):
        core.fold(np.ones((1, 1, 4)), np.zeros((1, 9, 4)), 1, (3, 3))


def test_embed_kernel_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"Received: kernel.shape=\(4, 2, 3, 3\), W.shape=\(4, 3, 9\)"):
        core.embed_kernel(np.ones((4, 2, 3, 3)), np.ones((4, 3, 9)))


def test_reference_forward_refuses_wrong_input():
    with pytest.raises(
        ValueError, match=r"Expected an input of rank 4 with 3 channels. Received: x.shape=\(1, 2, 5, 5\)"
    ):
        core.conv_reference(np.ones((1, 2, 5, 5)), np.ones((4, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"composition must be 'kernel' or 'feature'. Received: composition='both'"):
        core.doconv_reference(np.ones((1, 1, 5, 5)), np.ones((1, 1, 9)), np.zeros((1, 9, 9)), composition="both")


# --- packaging promises -------------------------------------------------------------------


def test_import_doconv_imports_no_framework():
    code = (
        "import sys, doconv, doconv.core; "
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'mxnet', 'jax') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_missing_framework_names_the_extra():
    with pytest.raises(ImportError, match=r"doconv.torch needs PyTorch: pip install 'doconv-layers\[torch\]'"):
        require("doconv_no_such_framework", "doconv.torch", "torch", "PyTorch")


def test_every_public_name_is_exported():
    missing = [name for name in core.__all__ if not hasattr(core, name)]
    assert missing == []
