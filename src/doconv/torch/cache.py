"""cached_kernels: an explicit, scoped cache of the folded kernels for unfused inference.

Outside the context every forward folds the kernel from the values W and D hold at that moment;
nothing is kept between calls. Inside it (as inside ``torch.nn.utils.parametrize.cached()``) each
DO-Conv layer of the model folds once, on its first forward that needs no gradient, and reuses that
kernel until the outermost context on it is left: parameter changes made inside are not seen. The
way to deploy is :func:`doconv.torch.fuse_model`; this context is for evaluating a model that keeps
training afterwards (validation passes between epochs) without paying the fold per forward.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterator, Optional

import torch

nn = torch.nn
Tensor = torch.Tensor


class _Entry:
    """One layer's cache: how many contexts hold it open, the kernel once folded, and its factors."""

    __slots__ = ("depth", "kernel", "factors", "lock")

    def __init__(self) -> None:
        self.depth = 0
        self.kernel: Optional[Tensor] = None
        self.factors: tuple = (None, None)  # the W and D tensors the kernel was folded from
        self.lock = threading.Lock()  # one fold per layer, whichever thread asks first


# Layer -> its cache while a context holds it open. Keyed by the layer object (weakly), so a layer
# that is dropped inside a context takes its cache with it.
_OPEN: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def cached_kernels(model: nn.Module) -> Iterator[nn.Module]:
    """Fold each DO-Conv layer of ``model`` once and reuse its kernel inside the ``with`` block.

    For unfused inference that should run at the native speed: every forward that needs no
    gradient reuses the kernel its layer folded first in the block (1x1 layers have no fold: they
    use W as it is). Forwards that need gradients
    fold as always. Leaving the outermost block on a layer drops its kernel. Safe to nest and to
    use from several threads; the cache is shared by every thread using the model meanwhile.

    Inside the block, changes to the values of W and D (an optimizer step, ``load_state_dict``,
    writes into them) are not seen by gradient-free forwards; other tensors in their place are (a
    new Parameter, ``torch.func.functional_call``, ``.to()`` to another dtype or device: the
    kernel is folded again from them). To deploy, fuse instead: :func:`doconv.torch.fuse_model` gives the
    native network with no DO-Conv left.

    Args:
        model: a DO-Conv layer or any module tree holding some.

    Yields:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> layer = DOConv2d(3, 8, 3).eval()
        >>> x = torch.randn(1, 3, 8, 8)
        >>> with torch.no_grad(), cached_kernels(layer):
        ...     same = bool(torch.equal(layer(x), layer(x)))
        >>> same
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"cached_kernels needs an nn.Module. Received: model of type {type(model).__name__}")
    from .layers import _DOConvNd  # the layers consult this module: imported here, not at the top

    layers = [m for m in model.modules() if isinstance(m, _DOConvNd)]
    with _OPEN_LOCK:
        for layer in layers:
            entry = _OPEN.get(layer)
            if entry is None:
                entry = _OPEN[layer] = _Entry()
            entry.depth += 1
    try:
        yield model
    finally:
        with _OPEN_LOCK:
            for layer in layers:
                entry = _OPEN.get(layer)
                if entry is not None:
                    entry.depth -= 1
                    if entry.depth == 0:
                        del _OPEN[layer]


def cached_kernel(layer: nn.Module, fold: Callable[[], Tensor]) -> Optional[Tensor]:
    """The layer's kernel from an open :func:`cached_kernels` block (``fold()`` on the first call), else None."""
    with _OPEN_LOCK:
        entry = _OPEN.get(layer)
    if entry is None:
        return None
    W, D = layer.W, layer.D
    with entry.lock:
        kernel = entry.kernel
        # Other tensors in W's or D's place (a new Parameter, torch.func.functional_call's
        # substitutes, .to() with swapped parameters) are other factors: fold theirs. Compared by
        # identity while the entry holds them, so no id can be reused meanwhile.
        same = entry.factors[0] is W and entry.factors[1] is D
        if kernel is None or not same or kernel.dtype != W.dtype or kernel.device != W.device:
            # A normal tensor even under inference_mode: a later forward in the block may need a
            # gradient with respect to its input, and an inference tensor cannot be saved for one.
            with torch.inference_mode(False), torch.no_grad():
                kernel = entry.kernel = fold()
            entry.factors = (W, D)
    return kernel
