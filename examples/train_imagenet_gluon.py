"""Train a GluonCV model-zoo network on ImageNet with DO-Conv, in the paper's setting.

The DO-Conv paper (Cao, Li et al., IEEE TIP 2022) trained GluonCV's ImageNet models with
GluonCV's training recipe and every convolution replaced by DO-Conv. This script is that
recipe (GluonCV's ``scripts/classification/imagenet/train_imagenet.py``, reduced to its
essentials) with one extra line: ``doconv.gluon.convert_model``. At the end the DO-Conv
network is folded (``doconv.gluon.fuse_model``) and exported as a plain Gluon network:
same outputs, the plain network's parameters and cost.

Defaults are GluonCV's: Nesterov SGD (momentum 0.9), lr 0.1 per 256 images, 5 linear
warm-up epochs then cosine decay, weight decay 1e-4 except on BatchNorm and biases, label
smoothing 0.1, 120 epochs, batch 256, random-resized crops of 224 with flips, colour jitter
and lighting noise; validation on the centre crop of the image resized to 224 / 0.875.

Data: the ImageFolder layout, ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg``
(the ImageNet training set already is; its validation set needs sorting into class folders).

Examples::

    # DO-Conv ResNet-50 on 8 GPUs, as in the paper
    python examples/train_imagenet_gluon.py --data-dir ~/imagenet --model resnet50_v1b --gpus 0,1,2,3,4,5,6,7

    # the plain baseline, same recipe
    python examples/train_imagenet_gluon.py --data-dir ~/imagenet --model resnet50_v1b --gpus 0,1,2,3 --plain

    # a smoke run on CPU: a few steps at a tiny input size
    python examples/train_imagenet_gluon.py --data-dir DATA --model resnet18_v1b --batch-size 4 \\
        --input-size 32 --max-steps 2 --num-workers 0
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import mxnet as mx
from gluoncv.model_zoo import get_model
from gluoncv.utils import LRScheduler, LRSequential
from mxnet import autograd, gluon, nd
from mxnet.gluon.data.vision import ImageFolderDataset, transforms

from doconv.gluon import convert_model, fuse_model

# ImageNet's channel statistics, as GluonCV normalises.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="folder holding train/<class>/*.jpg and val/<class>/*.jpg")
    p.add_argument("--model", default="resnet50_v1b", help="GluonCV model-zoo name")
    p.add_argument("--plain", action="store_true", help="train the plain network (the baseline), no DO-Conv")
    p.add_argument(
        "--D-mul", dest="D_mul", type=int, default=None, help="DO-Conv depth multiplier (default: K per layer)"
    )
    p.add_argument("--gpus", default="", help="GPU ids, e.g. 0,1,2,3; empty: CPU")
    p.add_argument("--batch-size", type=int, default=256, help="total batch size over all devices")
    p.add_argument("--num-epochs", type=int, default=120)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate per 256 images (scaled by batch-size/256)")
    p.add_argument("--optimizer", default="nag", choices=["nag", "sgd"], help="GluonCV uses Nesterov SGD (nag)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay (not on BatchNorm and biases)")
    p.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up epochs before the cosine decay")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="0 to turn off")
    p.add_argument("--last-gamma", action="store_true", help="zero-init the last BN gamma of each residual block")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument(
        "--crop-ratio", type=float, default=0.875, help="validation: centre crop of the image resized to input/ratio"
    )
    p.add_argument("--num-workers", type=int, default=8, help="data-loading processes")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many training steps (smoke runs)")
    p.add_argument("--log-interval", type=int, default=50, help="batches between log lines")
    p.add_argument("--save-dir", default="params", help="folder for per-epoch parameters and the fused export")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_dir, sub)):
            p.error(f"{os.path.join(args.data_dir, sub)} is not a folder: --data-dir needs train/ and val/ subfolders")
    if args.batch_size < 1 or args.num_epochs < 1 or (args.max_steps is not None and args.max_steps < 1):
        p.error("--batch-size, --num-epochs and --max-steps must be positive")
    if args.warmup_epochs >= args.num_epochs:
        p.error("--warmup-epochs must be smaller than --num-epochs")
    return args


def data_loaders(args, contexts):
    normalize = transforms.Normalize(MEAN, STD)
    jitter = 0.4
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.input_size),
            transforms.RandomFlipLeftRight(),
            transforms.RandomColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
            transforms.RandomLighting(0.1),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(int(math.ceil(args.input_size / args.crop_ratio)), keep_ratio=True),
            transforms.CenterCrop(args.input_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train_set = ImageFolderDataset(os.path.join(args.data_dir, "train"))
    val_set = ImageFolderDataset(os.path.join(args.data_dir, "val"))
    if len(train_set) < args.batch_size:
        sys.exit(f"error: {len(train_set)} training images, fewer than one batch of {args.batch_size}")
    train = gluon.data.DataLoader(
        train_set.transform_first(train_tf),
        batch_size=args.batch_size,
        shuffle=True,
        last_batch="discard",  # every step sees a full batch: BN statistics and the lr scaling assume it
        num_workers=args.num_workers,
    )
    val = gluon.data.DataLoader(
        val_set.transform_first(val_tf), batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers
    )
    return train, val, len(train_set.synsets)


def build_network(args, classes: int, contexts):
    kwargs = {"classes": classes}
    if args.last_gamma:
        kwargs["last_gamma"] = True
    net = get_model(args.model, pretrained=False, **kwargs)
    net.initialize(mx.init.MSRAPrelu(), ctx=contexts)
    # One forward pass finishes deferred initialisation: convert_model copies initialised kernels.
    net(nd.zeros((1, 3, args.input_size, args.input_size), ctx=contexts[0]))
    if not args.plain:
        # The one line that makes this DO-Conv training: every Conv2D becomes a DOConv2D that
        # starts with exactly the conv's output (D = 0, the kernel in W).
        net = convert_model(net, D_mul=args.D_mul)
    return net


def evaluate(net, val, contexts, classes: int, max_batches=None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (top-5 is nan with 5 classes or fewer, where it means nothing)."""
    top1 = mx.metric.Accuracy()
    top5 = mx.metric.TopKAccuracy(5) if classes > 5 else None
    for i, (data, label) in enumerate(val):
        if max_batches is not None and i >= max_batches:
            break
        xs = gluon.utils.split_and_load(data, contexts, even_split=False)
        ys = gluon.utils.split_and_load(label, contexts, even_split=False)
        outputs = [net(x) for x in xs]
        top1.update(ys, outputs)
        if top5 is not None:
            top5.update(ys, outputs)
    return top1.get()[1], (top5.get()[1] if top5 is not None else float("nan"))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("train_imagenet")
    mx.random.seed(args.seed)
    contexts = [mx.gpu(int(i)) for i in args.gpus.split(",") if i.strip()] or [mx.cpu()]
    train, val, classes = data_loaders(args, contexts)
    net = build_network(args, classes, contexts)
    variant = "plain" if args.plain else "doconv"
    log.info(
        "%s (%s), %d classes, %d training batches per epoch, devices %s",
        args.model,
        variant,
        classes,
        len(train),
        contexts,
    )

    steps_per_epoch = len(train)
    lr = args.lr * args.batch_size / 256
    scheduler = LRSequential(
        [
            LRScheduler("linear", base_lr=0, target_lr=lr, nepochs=args.warmup_epochs, iters_per_epoch=steps_per_epoch),
            LRScheduler(
                "cosine",
                base_lr=lr,
                target_lr=0,
                nepochs=args.num_epochs - args.warmup_epochs,
                iters_per_epoch=steps_per_epoch,
            ),
        ]
    )
    # GluonCV's --no-wd. DO-Conv's D stays decayed: it is the offset from the identity, so decay
    # pulls the layer towards a plain convolution rather than towards zero.
    for param in net.collect_params(".*beta|.*gamma|.*bias").values():
        param.wd_mult = 0.0
    trainer = gluon.Trainer(
        net.collect_params(), args.optimizer, {"wd": args.wd, "momentum": args.momentum, "lr_scheduler": scheduler}
    )
    smoothing = args.label_smoothing > 0
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=not smoothing)
    net.hybridize(static_alloc=True, static_shape=True)
    os.makedirs(args.save_dir, exist_ok=True)

    step, done = 0, False
    for epoch in range(args.num_epochs):
        tic, metric = time.time(), mx.metric.Accuracy()
        for i, (data, label) in enumerate(train):
            xs = gluon.utils.split_and_load(data, contexts)
            ys = gluon.utils.split_and_load(label, contexts)
            targets = ys
            if smoothing:
                eta = args.label_smoothing
                targets = [y.one_hot(classes, on_value=1 - eta + eta / classes, off_value=eta / classes) for y in ys]
            with autograd.record():
                outputs = [net(x) for x in xs]
                losses = [loss_fn(out, t) for out, t in zip(outputs, targets)]
            autograd.backward(losses)
            trainer.step(args.batch_size)
            metric.update(ys, outputs)
            step += 1
            if step % args.log_interval == 0 or step == 1:
                loss = sum(float(loss.mean().asscalar()) for loss in losses) / len(losses)
                log.info(
                    "epoch %d batch %d: loss %.4f, train top-1 %.4f, lr %.5f, %.1f images/s",
                    epoch,
                    i + 1,
                    loss,
                    metric.get()[1],
                    trainer.learning_rate,
                    args.batch_size * (i + 1) / (time.time() - tic),
                )
            if args.max_steps is not None and step >= args.max_steps:
                done = True
                break
        top1, top5 = evaluate(net, val, contexts, classes, max_batches=args.max_steps if args.max_steps else None)
        log.info("epoch %d: val top-1 %.4f, top-5 %.4f, %.0f s", epoch, top1, top5, time.time() - tic)
        net.save_parameters(os.path.join(args.save_dir, f"{args.model}-{variant}-{epoch:04d}.params"))
        if done:
            break

    prefix = os.path.join(args.save_dir, f"{args.model}-{variant}")
    deploy = fuse_model(net) if not args.plain else net
    deploy.hybridize(static_alloc=True, static_shape=True)
    x = next(iter(val))[0][:2].as_in_context(contexts[0])
    if not args.plain:
        # The fused network must give the DO-Conv network's outputs; say how closely it does.
        diff = float(nd.abs(deploy(x) - net(x)).max().asscalar())
        log.info("fused vs DO-Conv network: max |logit difference| %.2e", diff)
    deploy(x)
    deploy.export(prefix + ("-fused" if not args.plain else ""), epoch=0)
    log.info(
        "exported %s-symbol.json and -0000.params (load with gluon.SymbolBlock.imports)",
        prefix + ("-fused" if not args.plain else ""),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
