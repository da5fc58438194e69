"""Whole-model conversion: ``convert_model`` and ``fuse_model``, built on ``keras.models.clone_model``.

``clone_model`` rebuilds a Sequential or Functional graph (raw ops, nested models and custom
layers included) from each layer's config. Here each conv to convert (or DO-Conv layer to fuse)
is replaced by its counterpart with the same outputs; every other layer is rebuilt from its
config and, once the new graph has built it, given a copy of the original's weights and
trainable flags. Nothing of the given model is written to, so a failed call leaves it as it was.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

from .. import core
from .layers import DO_LAYERS, DOConv2D, DODepthwiseConv2D, DOSeparableConv2D, _Functional, _numpy, keras

_TO_DO = {
    keras.layers.Conv2D: DOConv2D,
    keras.layers.DepthwiseConv2D: DODepthwiseConv2D,
    keras.layers.SeparableConv2D: DOSeparableConv2D,
}
_TO_NATIVE = {do: native for native, do in _TO_DO.items()}
# Every public Keras convolution: a layer of one of these classes that is not converted is named.
_NATIVE_CONVS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
    )
    if hasattr(keras.layers, name)
)


def _class_name(cls) -> str:
    if cls.__module__.startswith("keras.") and getattr(keras.layers, cls.__name__, None) is cls:
        return f"keras.layers.{cls.__name__}"
    if cls in DO_LAYERS:
        return f"doconv.keras.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _sublayers(layer) -> list:
    # Keras has no public accessor for a custom layer's sublayers; this only feeds the warning.
    return list(layer._flatten_layers(include_self=False, recursive=True))


def _spec(variables) -> list:
    """Names and shapes of ``variables`` in order; unnamed ones are numbered by Keras ("variable_18")."""
    return [(re.sub(r"_\d+$", "", v.name), tuple(v.shape)) for v in variables]


class _Surgery:
    """One convert_model / fuse_model call: the clone, the layers replaced, and those left as they are."""

    def __init__(self):
        self.memo = {}  # id(original) -> its clone, so a shared layer stays shared
        self.copies = []  # (qualified name, original, copy): weights to carry once the copy is built
        self.done = []  # qualified names of the layers replaced
        self.left = []  # (qualified name, class, reason)

    def replace(self, layer, qualified: str):
        """The layer to put in ``layer``'s place, or None to copy it (recording it in ``left`` if it is conv-like)."""
        raise NotImplementedError

    def leave(self, qualified: str, layer, reason: str) -> None:
        self.left.append((qualified, _class_name(type(layer)), reason))

    def leave_inner(self, layer, qualified: str, kinds) -> None:
        """Name every layer of ``kinds`` inside ``layer``, which is copied as a whole."""
        for inner in _sublayers(layer):
            if isinstance(inner, kinds):
                self.leave(
                    f"{qualified}/{inner.name}",
                    inner,
                    f"inside {qualified} ({_class_name(type(layer))}), a layer that is copied as it is",
                )

    def model(self, model, prefix: str = ""):
        new = keras.models.clone_model(model, clone_function=lambda op: self._operation(op, prefix))
        if model.built and not new.built:  # a Sequential built without an Input
            new.build_from_config(model.get_build_config())
        if not model.trainable:
            new.trainable = False
        return new

    def _operation(self, op, prefix: str):
        if id(op) in self.memo:
            return self.memo[id(op)]
        if not isinstance(op, keras.layers.Layer):
            new = op.__class__.from_config(op.get_config())  # a raw op (x + 3.0, keras.ops.*): no state
        elif isinstance(op, (keras.Sequential, _Functional)):
            new = self.model(op, f"{prefix}{op.name}/")
        elif isinstance(op, keras.layers.Lambda):
            # Stateless, and its config holds a Python function that Keras refuses to rebuild in safe
            # mode: the clone uses the same Lambda layer (which clone_model alone cannot copy at all).
            new = op
        else:
            qualified = prefix + op.name
            new = self.replace(op, qualified)
            if new is None:
                new = op.__class__.from_config(op.get_config())
                self.copies.append((qualified, op, new))
            else:
                self.done.append(qualified)
        self.memo[id(op)] = new
        return new

    def carry_weights(self) -> None:
        """Give every copied layer the original's weights and trainable flags, checking they correspond."""
        for qualified, old, new in self.copies:
            if old.built and not new.built:
                new.build_from_config(old.get_build_config())
            source, target = old.weights, new.weights
            if _spec(source) != _spec(target):
                raise ValueError(
                    f"Layer {qualified!r} ({_class_name(type(old))}) cannot be copied with its weights: rebuilt from "
                    f"its config it holds {_spec(target)}, the original {_spec(source)}."
                )
            for a, b in zip(source, target):
                # A host copy: on jax convert_to_tensor is the very array, which training either model
                # donates (deletes) under the other one ("Array has been deleted").
                b.assign(_numpy(a))
                b.trainable = a.trainable

    def run(self, model, function: str):
        if isinstance(model, (keras.Sequential, _Functional)):
            new = self.model(model)
            self.carry_weights()
            return new
        if isinstance(model, keras.Model):
            raise TypeError(
                f"{function} takes a keras.Sequential, a Functional keras.Model or a single layer; a subclassed "
                f"model cannot be cloned. Received: {type(model).__name__}"
            )
        if isinstance(model, keras.layers.Layer):
            new = self.replace(model, model.name)
            if new is None:
                why = f": {self.left[-1][2]}" if self.left else ""
                raise TypeError(
                    f"{function} does not replace layer {model.name!r} ({_class_name(type(model))}){why}. "
                    "Pass a model to copy it as it is."
                )
            self.done.append(model.name)
            return new
        raise TypeError(
            f"{function} takes a keras.Sequential, a Functional keras.Model or a single layer. "
            f"Received: {type(model).__name__}"
        )

    def report(self, function: str, verb: str, kinds: str, model, nothing: str) -> None:
        """The call's one warning: every layer left as it is, with the counts; or that there was nothing to do."""
        if self.left:
            left = "; ".join(f"{name} ({cls}: {reason})" for name, cls, reason in self.left)
            warnings.warn(
                f"{function} {verb} {len(self.done)} of {len(self.done) + len(self.left)} {kinds} of {model.name!r} "
                f"and left {len(self.left)} as they are: {left}",
                stacklevel=3,
            )
        elif not self.done:
            warnings.warn(f"Model {model.name!r} has no {nothing}; returning a copy.", stacklevel=3)


class _Converter(_Surgery):
    def __init__(self, D_mul, depthwise: bool):
        super().__init__()
        self.D_mul, self.depthwise = D_mul, bool(depthwise)
        self.raised = []  # layers whose K exceeded an int D_mul

    def replace(self, layer, qualified: str):
        target = _TO_DO.get(type(layer))
        if target is None:
            if isinstance(layer, DO_LAYERS):
                return None  # already DO-Conv
            if isinstance(layer, _NATIVE_CONVS):
                base = next((cls for cls in _TO_DO if isinstance(layer, cls)), None)
                self.leave(
                    qualified,
                    layer,
                    f"a subclass of keras.layers.{base.__name__}, whose own behaviour is kept"
                    if base is not None
                    else "only 2-D Conv2D, DepthwiseConv2D and SeparableConv2D are converted",
                )
            else:
                self.leave_inner(layer, qualified, _NATIVE_CONVS)
            return None
        if target is not DOConv2D and not self.depthwise:
            self.leave(qualified, layer, "depthwise=False")
            return None
        if getattr(layer, "lora_rank", None):
            self.leave(qualified, layer, f"LoRA is enabled (lora_rank={layer.lora_rank})")
            return None
        if getattr(layer, "quantization_mode", None):
            self.leave(qualified, layer, f"quantized ({layer.quantization_mode})")
            return None
        K = core.kernel_volume(layer.kernel_size)
        if self.D_mul is None:
            wanted = None
        elif callable(self.D_mul):
            wanted = self.D_mul(layer.name, layer)
            if wanted is None:
                self.leave(qualified, layer, "D_mul returned None")
                return None
        else:
            wanted = max(self.D_mul, K)
            if K > self.D_mul:
                self.raised.append(qualified)
        return target.from_conv(layer, D_mul=wanted)


class _Fuser(_Surgery):
    def replace(self, layer, qualified: str):
        if type(layer) in _TO_NATIVE:
            return layer.fuse()
        if isinstance(layer, DO_LAYERS):
            self.leave(qualified, layer, "a subclass of a DO-Conv layer, whose own behaviour is kept")
        else:
            self.leave_inner(layer, qualified, DO_LAYERS)
        return None


def fuse_model(model):
    """A copy of ``model`` with every DO-Conv layer fused into its native Keras layer.

    ``DOConv2D`` becomes ``Conv2D``, ``DODepthwiseConv2D`` ``DepthwiseConv2D`` and
    ``DOSeparableConv2D`` ``SeparableConv2D``, each with the same outputs, name, dtype policy and
    trainable flags (a kernel is trainable if W or D was). Every other layer, raw op and nested
    model is copied with its weights. The given model is not modified. The copy computes the
    same outputs and has the parameter count and per-call cost of the plain network.

    Args:
        model: a ``keras.Sequential`` or Functional ``keras.Model`` (any graph
            ``keras.models.clone_model`` clones: nested models, raw ops, custom layers), or a
            single DO-Conv layer, which is fused and returned.

    Returns:
        The fused copy (or layer). One warning names every DO-Conv layer left as it is
        (subclasses of the DO-Conv layers, DO-Conv layers inside custom layers) with the count
        fused; if the model has no DO-Conv layer, a plain copy and a warning.

    Raises:
        TypeError: a subclassed model (it cannot be cloned), or a single layer that is not a DO-Conv layer.
        ValueError: a layer whose copy from its config cannot take its weights (named).

    Example:
        >>> import numpy as np, keras
        >>> from doconv.keras import DOConv2D
        >>> model = keras.Sequential([keras.Input((8, 8, 3)), DOConv2D(4, 3)])
        >>> fused = fuse_model(model)
        >>> [type(layer).__name__ for layer in fused.layers]
        ['Conv2D']
    """
    surgery = _Fuser()
    clone = surgery.run(model, "fuse_model")
    surgery.report("fuse_model", "fused", "DO-Conv layers", model, "DO-Conv layer to fuse")
    return clone


def convert_model(model, D_mul: int | Callable[[str, Any], int | None] | None = None, *, depthwise: bool = True):
    """A copy of ``model`` with its convolutions replaced by DO-Conv layers of exactly the same outputs.

    Exactly the classes ``keras.layers.Conv2D``, ``DepthwiseConv2D`` and ``SeparableConv2D`` are
    converted (into ``DOConv2D``, ``DODepthwiseConv2D`` and ``DOSeparableConv2D``, see their
    ``from_conv``), keeping names, dtype policies and trainable flags (W and D follow the kernel,
    the bias the bias), so a trained network can be fine-tuned as DO-Conv. Every other layer, raw
    op and nested model is copied with its weights. The given model is not modified.

    Args:
        model: a ``keras.Sequential`` or Functional ``keras.Model`` (any graph
            ``keras.models.clone_model`` clones: nested models, raw ops, custom layers), or a
            single conv layer, which is converted and returned.
        D_mul: None (default): each layer's K. An int: ``max(D_mul, K)`` per layer, with one
            warning naming the layers whose K was larger. A callable
            ``(name, conv) -> int | None`` decides per layer; None leaves that conv as it is.
        depthwise: keyword-only. Default True; False keeps ``DepthwiseConv2D`` and
            ``SeparableConv2D`` layers as they are.

    Returns:
        The converted copy (or layer). One warning names every conv-like layer left as it is
        (subclasses of the converted classes, other convolutions, convs inside custom layers,
        LoRA-enabled or quantized convs, those D_mul or ``depthwise=False`` left) with its
        qualified name, class and reason, and the count converted; if nothing was converted
        and nothing left, a plain copy and a warning.

    Raises:
        TypeError: a subclassed model (it cannot be cloned), or a single layer that is not converted.
        ValueError: a callable returned D_mul < K; a layer whose copy from its config cannot take
            its weights (named).

    Example:
        >>> import numpy as np, keras
        >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
        >>> converted = convert_model(model, D_mul=12)
        >>> [(type(layer).__name__, layer.D_mul) for layer in converted.layers]
        [('DOConv2D', 12)]
    """
    if D_mul is not None and not callable(D_mul):
        D_mul = core.check_int(D_mul, "D_mul")
    surgery = _Converter(D_mul, depthwise)
    clone = surgery.run(model, "convert_model")
    if surgery.raised:
        warnings.warn(
            f"D_mul={D_mul} is smaller than K = prod(kernel_size) of {len(surgery.raised)} layer(s), which use "
            f"D_mul = K: {', '.join(surgery.raised)}",
            stacklevel=2,
        )
    surgery.report(
        "convert_model",
        "converted",
        "convolution layers",
        model,
        "Conv2D, DepthwiseConv2D or SeparableConv2D layer to convert",
    )
    return clone
