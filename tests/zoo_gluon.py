"""convert_model and fuse_model on GluonCV model-zoo networks: a table of what converts and how exactly.

Not collected by pytest (no ``test_`` prefix): run it by hand or from the opt-in ``zoo`` tox env,

    python tests/zoo_gluon.py                      # the default networks
    python tests/zoo_gluon.py resnet18_v1 ssd_512_resnet50_v1_voc --size 128

Each network is built with ``pretrained=False`` (and ``pretrained_base=False``: no download), initialized with Xavier and run
once on a random batch in predict mode. Then:

* convert: ``convert_model``; the conv layers it converted and the ones it left (the counts its
  warning gives; "Conv2D" is the number of blocks of exactly that class in the network), and the
  largest difference from the native network, relative to the largest value of the array, over
  the outputs and the output of every converted layer (forward hooks registered on the native
  Conv2Ds, which conversion carries to the new layers: a lost hook fails the network);
* fuse: every D moved away from zero (as training does), then ``fuse_model``; the largest
  difference from the DO-Conv network, in the same way.

"exact" means both differences are within float32 tolerance (1e-5). Detection networks end in
non-maximum suppression, which at random init keeps boxes of near-uniform scores whatever the
kernels are, and can reorder boxes whose scores differ in the last bits: it is switched off
(``set_nms(nms_thresh=0)``), so every decoded box is compared, in the order of the anchors.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import time
import warnings

import mxnet as mx
import numpy as np
from mxnet import autograd, nd
from mxnet.gluon import nn

from doconv.gluon import DOConv2D, convert_model, fuse_model

DEFAULT = [
    "resnet18_v1",
    "resnet50_v1b",
    "resnet18_v2",
    "resnext50_32x4d",
    "se_resnet18_v1",
    "mobilenet0.25",
    "mobilenetv2_0.25",
    "mobilenetv3_small",
    "squeezenet1.1",
    "densenet121",
    "inceptionv3",
    "darknet53",
    "vgg11_bn",
    "cifar_resnet20_v1",
    "ssd_512_resnet50_v1_voc",
    "ssd_512_mobilenet1.0_voc",
    "yolo3_mobilenet1.0_voc",
    "simple_pose_resnet18_v1b",
    "center_net_resnet18_v1b_voc",
    "fcn_resnet50_voc",
]
TOLERANCE = 1e-5
LAYER_OUTPUTS = []  # filled by record_output
# Networks whose last pooling needs a larger input than --size's default (224 as in GluonCV).
MIN_SIZE = {"squeezenet1.0": 224, "squeezenet1.1": 224, "densenet121": 224, "inceptionv3": 299}


def blocks(block, seen=None):
    """Every block of the tree once."""
    seen = set() if seen is None else seen
    if id(block) not in seen:
        seen.add(id(block))
        yield block
        for child in block._children.values():
            yield from blocks(child, seen)


def record_output(block, args, out) -> None:
    """A forward hook on every native Conv2D; convert_model and fuse_model carry it to their layers."""
    LAYER_OUTPUTS.append(out.asnumpy().astype(np.float64))


def outputs(net, x) -> list:
    """Every output array in predict mode, flattened out of nested lists, then every conv layer's output."""
    LAYER_OUTPUTS.clear()
    with autograd.predict_mode():
        out = net(x)
    flat, stack = [], [out]
    while stack:
        item = stack.pop(0)
        if isinstance(item, (list, tuple)):
            stack[:0] = list(item)
        else:
            flat.append(item.asnumpy().astype(np.float64))
    return flat + LAYER_OUTPUTS[:]


def first_outputs(net, x) -> list:
    """The outputs of the first call. GluonCV's FeatureExpander (the SSD trunks) puts a Xavier
    initializer on its whole graph, BatchNorm vectors included, which MXNet 1.9 refuses; those
    vectors, whose shapes the failed call inferred, get ones (gamma, variance) or zeros."""
    for _ in range(8):
        try:
            return outputs(net, x)
        except ValueError as err:
            if "It requires at least 2D" not in str(err):
                raise
            for param in net.collect_params().values():
                if param._data is None and param.shape and len(param.shape) == 1 and 0 not in param.shape:
                    one = param.name.endswith(("gamma", "var"))
                    param.initialize(mx.init.One() if one else mx.init.Zero(), ctx=x.context, force_reinit=True)
    return outputs(net, x)


def relative_difference(got: list, want: list) -> float:
    """The largest difference of an output array from its reference, relative to that array's largest value."""
    if len(got) != len(want):
        raise RuntimeError(f"{len(got)} output and layer arrays against {len(want)}: a conv layer lost its hook")
    return max(float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-30) for g, w in zip(got, want))


def converted_and_left(messages: list, net) -> tuple[int, int]:
    """The counts convert_model's one warning gives; without a warning, every DOConv2D and none left."""
    for message in messages:
        match = re.search(r"replaced (\d+) layer\(s\) and left (\d+) conv layer\(s\)", message)
        if match:
            return int(match.group(1)), int(match.group(2))
    return sum(isinstance(b, DOConv2D) for b in blocks(net)), 0


def run(name: str, size: int, seed: int = 0) -> dict:
    from gluoncv.model_zoo import get_model
    from gluoncv.model_zoo.model_zoo import _models as gluoncv_models

    mx.random.seed(seed)
    # detection, segmentation and pose networks would download their pretrained trunk
    has_trunk = "pretrained_base" in inspect.signature(gluoncv_models[name.lower()]).parameters
    net = get_model(name, pretrained=False, **({"pretrained_base": False} if has_trunk else {}))
    net.initialize(mx.init.Xavier())
    x = nd.array(np.random.default_rng(seed).uniform(size=(1, 3, size, size)))
    if hasattr(net, "set_nms"):  # a detector: every box, in the order of the anchors (see above)
        net.set_nms(nms_thresh=0)
    for block in blocks(net):
        if type(block) is nn.Conv2D:
            block.register_forward_hook(record_output)
    native = first_outputs(net, x)
    row = {"network": name, "Conv2D": sum(type(b) is nn.Conv2D for b in blocks(net))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        do = convert_model(net)
    row["converted"], row["left"] = converted_and_left([str(w.message) for w in caught], do)
    unfused = outputs(do, x)
    row["convert"] = relative_difference(unfused, native)
    rng = np.random.default_rng(seed + 1)
    for layer in blocks(do):
        if isinstance(layer, DOConv2D) and layer.D is not None:
            layer.D.set_data(nd.array(0.01 * rng.standard_normal(layer.D.shape), dtype=layer.D.dtype))
    trained = outputs(do, x)
    row["fuse"] = relative_difference(outputs(fuse_model(do), x), trained)
    row["exact"] = "yes" if max(row["convert"], row["fuse"]) <= TOLERANCE else "no"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("networks", nargs="*", default=DEFAULT, help="GluonCV model-zoo names")
    parser.add_argument("--size", type=int, default=128, help="input height and width (default 128)")
    args = parser.parse_args(argv)
    columns = ["network", "Conv2D", "converted", "left", "convert", "fuse", "exact"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    failed = 0
    for name in args.networks:
        start = time.perf_counter()
        try:
            row = run(name, max(args.size, MIN_SIZE.get(name, 0)))
        except Exception as err:  # one network's failure is a row of the table, not the end of it
            failed += 1
            lines = [line for line in str(err).splitlines() if line.strip()]
            print(f"| {name} | failed: {type(err).__name__}: {lines[-1][:120] if lines else ''} |||||")
            continue
        failed += row["exact"] != "yes"
        cells = [f"{row[c]:.1e}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("| " + " | ".join(cells) + " |", flush=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
