"""Convert and fuse real model-zoo networks; print converted vs left and whether outputs stay exact.

Not collected by pytest (no ``test_`` prefix): an opt-in program for an environment with the
zoos, e.g. ``pip install torch==2.14.1 torchvision==0.29.1 timm transformers``, then

    python tests/zoo_torch.py                   # every network it can build
    python tests/zoo_torch.py resnet18 bit      # only those whose name contains a word

Networks are built without pretrained weights (the maths does not depend on them); whichever
of torchvision, timm and transformers is missing is skipped, and a few networks defined here
(of the zoo's shapes) always run. Each network runs in float64 and eval mode:

* converted / left: exact nn.Conv1d/2d/3d replaced, conv-like modules left as they are;
* after convert: the largest |difference| of the outputs relative to max |output|, with D = 0
  (``convert_model`` puts the kernel in W's first identity tile, so it should be ~1e-16);
* after fuse: the same for ``fuse_model(convert_model(net))`` after D was set to random values
  and compared with the DO-Conv network (the folded kernel against the unfused forward);
* flags: the first half of the convs is frozen before converting; after convert and fuse the
  same modules must hold exactly the frozen parameters (``requires_grad`` kept both ways).

The exit status is 1 if any network is not exact (relative error above 1e-9), loses a flag or fails.
"""

from __future__ import annotations

import sys
import traceback
import warnings

import torch

from doconv.torch import convert_model, fuse_model
from doconv.torch.layers import _DOConvNd

nn = torch.nn
F = torch.nn.functional
TOLERANCE = 1e-9
CONV_LIKE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# -- networks of the zoo's shapes, always available ---------------------------------------------


class _StdConv(nn.Conv2d):
    """Weight standardisation in forward, as timm's StdConv2d (BiT): left as it is."""

    def forward(self, x):
        flat = self.weight.reshape(self.out_channels, -1)
        w = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _local_networks():
    def mobile():
        def block(c_in, c_out, stride):
            return [
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.ReLU6(),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
            ]

        layers = [nn.Conv2d(3, 16, 3, 2, 1), *block(16, 24, 2), *block(24, 32, 1), nn.AdaptiveAvgPool2d(1)]
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32, 10))

    def bit_like():
        return nn.Sequential(_StdConv(3, 16, 7, 2, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))

    def audio():
        return nn.Sequential(nn.Conv1d(1, 8, 9, 4), nn.GELU(), nn.Conv1d(8, 8, 3, groups=2), nn.Conv1d(8, 4, 1))

    return [
        ("local/mobilenet-like", mobile, (1, 3, 64, 64)),
        ("local/bit-like", bit_like, (1, 3, 64, 64)),
        ("local/conv1d-audio", audio, (1, 1, 400)),
    ]


def _torchvision_networks():
    try:
        import torchvision
    except Exception:  # not installed, or built for another torch
        return []
    names = [
        "resnet18",
        "resnet50",
        "resnext50_32x4d",
        "wide_resnet50_2",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "efficientnet_v2_s",
        "convnext_tiny",
        "regnet_y_400mf",
        "densenet121",
        "shufflenet_v2_x1_0",
        "squeezenet1_0",
        "mnasnet0_5",
        "vgg11_bn",
        "alexnet",
        "googlenet",
        "inception_v3",
    ]
    extra = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False}}
    size = {"inception_v3": 299}

    def build(name):
        return lambda: torchvision.models.get_model(name, weights=None, **extra.get(name, {}))

    return [(f"torchvision/{n}", build(n), (1, 3, size.get(n, 224), size.get(n, 224))) for n in names]


def _timm_networks():
    try:
        import timm
    except Exception:
        return []
    names = [
        "resnet18",
        "resnetv2_50x1_bit",  # StdConv2d
        "tf_efficientnet_b0",  # Conv2dSame
        "efficientnet_b0",
        "mobilenetv3_small_100",
        "convnext_nano",
        "regnety_002",
        "nf_resnet26",  # ScaledStdConv2d
        "cspdarknet53",
        "repvgg_a0",
    ]

    def build(name):
        return lambda: timm.create_model(name, pretrained=False)

    return [(f"timm/{n}", build(n), (1, 3, 224, 224)) for n in names]


def _transformers_networks():
    try:
        import transformers
    except Exception:
        return []

    class Wrapped(nn.Module):
        """A Hugging Face model returning its last hidden state, so it compares as a tensor."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).last_hidden_state

    def build(model_cls, config_cls, **config):
        return lambda: Wrapped(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)))

    return [
        ("transformers/ResNetModel", build("ResNetModel", "ResNetConfig"), (1, 3, 224, 224)),
        ("transformers/ConvNextModel", build("ConvNextModel", "ConvNextConfig"), (1, 3, 224, 224)),
        # Conv1d feature encoder and a weight-normed positional conv (baked, with a warning)
        (
            "transformers/Wav2Vec2Model",
            build("Wav2Vec2Model", "Wav2Vec2Config", num_hidden_layers=2),
            (1, 16000),
        ),
    ]


# -- the checks ---------------------------------------------------------------------------------


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _frozen(model: nn.Module) -> set:
    """The modules holding a frozen parameter (names survive conversion; parameter names may not)."""
    return {name.rpartition(".")[0] for name, p in model.named_parameters() if not p.requires_grad}


def _check(build, shape) -> dict:
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    conv_modules = [m for m in model.modules() if isinstance(m, CONV_LIKE)]
    convs = len(conv_modules)
    for m in conv_modules[: convs // 2]:
        m.requires_grad_(False)
    frozen = _frozen(model)
    with torch.no_grad():
        y = model(x)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            converted = convert_model(model)
        done = sum(isinstance(m, _DOConvNd) for m in converted.modules())
        left = sum(isinstance(m, CONV_LIKE) and not isinstance(m, _DOConvNd) for m in converted.modules())
        after_convert = _relative(converted(x), y)
        flags = _frozen(converted) == frozen
        for m in converted.modules():  # a trained D: fusing must still give the DO-Conv outputs
            if isinstance(m, _DOConvNd) and m.D is not None:
                m.D.normal_(0, 0.1)
        z = converted(x)
        fused = fuse_model(converted)
        remaining = sum(isinstance(m, _DOConvNd) for m in fused.modules())
        after_fuse = _relative(fused(x), z)
        flags = flags and _frozen(fused) == frozen
    return {
        "convs": convs,
        "converted": done,
        "left": left,
        "convert": after_convert,
        "fuse": after_fuse,
        "warnings": len(record),
        "remaining": remaining,
        "flags": flags,
    }


def main(argv: list[str]) -> int:
    networks = _local_networks() + _torchvision_networks() + _timm_networks() + _transformers_networks()
    if argv:
        networks = [n for n in networks if any(word in n[0] for word in argv)]
    header = f"{'network':40s} {'convs':>5s} {'conv.':>5s} {'left':>5s} {'warn':>4s} {'convert':>9s} {'fuse':>9s} flags exact"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, build, shape in networks:
        try:
            r = _check(build, shape)
        except Exception:
            failures += 1
            print(f"{name:40s} FAILED")
            traceback.print_exc(limit=3)
            continue
        exact = r["convert"] <= TOLERANCE and r["fuse"] <= TOLERANCE and r["remaining"] == 0
        failures += not (exact and r["flags"])
        print(
            f"{name:40s} {r['convs']:5d} {r['converted']:5d} {r['left']:5d} {r['warnings']:4d} "
            f"{r['convert']:9.1e} {r['fuse']:9.1e} {'kept' if r['flags'] else 'LOST':>5s} {'yes' if exact else 'NO'}"
        )
    print(f"\n{len(networks)} networks, {failures} not exact, lost flags or failed (tolerance {TOLERANCE:g}, float64).")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
