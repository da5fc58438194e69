"""The ``doconv`` command line: ``demo``, ``fuse``, ``bench`` and ``info``.

Every bad input (an unknown or missing framework, a non-positive number, an
unwritable folder, a file that is not a PyTorch checkpoint) ends with one line
``doconv <command>: error: ...`` on stderr and exit status 2, never a traceback,
and leaves no half-written file behind. SIGINT and SIGTERM end a command with one
line and exit status 130 or 143 (128 + the signal's number), after removing any
temporary file.

Frameworks are imported only by the command that needs them; ``info`` and
``bench`` import each one in a child process of its own, because importing
MXNet after TensorFlow in one process crashes it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import platform
import re
import signal
import subprocess
import sys
import zipfile
from collections import OrderedDict
from typing import Optional, Sequence

from . import __version__, core
from ._files import NotRegularFile, special_kind, write_atomically
from ._kernel_status import fold_kernel_status
from ._optional import install_hint
from ._signals import Signalled, SignalsRaise
from .benchmarks.report import is_busy_note

__all__ = ["main", "fuse_state_dict"]

PROG = "doconv"


class UsageError(Exception):
    """Bad input: printed as ``doconv <command>: error: <message>``, exit status 2."""

    def __init__(self, message: str, prog: str = PROG):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and does not exit the interpreter.

    ``main`` catches the UsageError and returns 2, so ``main`` can be called from
    Python (tests, notebooks) without a SystemExit for bad input.
    """

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')", self.prog)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _per_dataset(what: str, field: str, recipes: dict) -> str:
    defaults = ", ".join(f"{getattr(r, field)} ({name})" for name, r in recipes.items())
    return f"{what} (default: {defaults})"


def _build_parser() -> _Parser:
    from .demo import DATASETS, FRAMEWORKS, RECIPES, Settings

    defaults = Settings()
    parser = _Parser(
        prog=PROG,
        description="DO-Conv (depthwise over-parameterized convolution) for PyTorch, Keras and MXNet Gluon.",
    )
    parser.add_argument("--version", action="version", version=f"doconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="train plain and DO-Conv CNNs on a real data set (digits or MNIST-1D), compare, fold, save",
        description="Train the same small CNN with plain convolutions and with DO-Conv (same initial kernels, "
        "same batches), for several seeds, on scikit-learn's 8x8 digits or on MNIST-1D; print accuracy, their "
        "paired difference, parameter counts, time per epoch and the folded network's largest difference; save "
        "the curves, the folded and the DO-Conv networks and the results.",
    )
    demo.add_argument("--framework", default=defaults.framework, help=f"one of {', '.join(FRAMEWORKS)} (default torch)")
    demo.add_argument(
        "--dataset",
        default=defaults.dataset,
        help=f"one of {', '.join(DATASETS)} (default digits; mnist1d: PyTorch only)",
    )
    demo.add_argument(
        "--seeds", type=_positive_int, default=None, help=_per_dataset("number of seeds", "seeds", RECIPES)
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=None, help=_per_dataset("epochs per run", "epochs", RECIPES)
    )
    demo.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"MNIST-1D sequences to generate, 80%% train (default {RECIPES['mnist1d'].samples})",
    )
    demo.add_argument(
        "--D-mul",
        dest="D_mul",
        type=_positive_int,
        default=None,
        metavar="M",
        help="depth multiplier of every DO-Conv layer; layers with more kernel taps K use K (default: K)",
    )
    demo.add_argument("--out", default=defaults.out, metavar="DIR", help=f"output folder (default ./{defaults.out})")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    fuse = sub.add_parser(
        "fuse",
        help="fold a PyTorch checkpoint of a DO-Conv model into the plain-convolution layout",
        description="Fold the DO-Conv layers of a PyTorch state_dict (keys <layer>.W, <layer>.D, <layer>.bias, "
        "also the original DO-Conv code's <layer>.D_diag) into plain convolution weights (<layer>.weight, "
        "<layer>.bias). The checkpoint is read with torch.load(weights_only=True): files holding pickled "
        "code are refused.",
    )
    fuse.add_argument("checkpoint", metavar="CHECKPOINT", help="a state_dict saved with torch.save")
    fuse.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the folded state_dict")
    fuse.add_argument(
        "--kernel-size",
        action="append",
        default=[],
        metavar="[LAYER=]SIZE",
        help="kernel size such as 1x3, 3x3x3 or 5, for one layer (LAYER=SIZE, LAYER as in the keys) or for "
        "all layers (SIZE). Needed when a layer's tap count is not a square, and for 1-D/3-D layers. Repeatable.",
    )
    fuse.add_argument("--force", action="store_true", help="replace OUT if it exists (never the checkpoint itself)")

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks of the installed frameworks",
        description="Run doconv.benchmarks.bench_<framework> for each installed framework, each in its own process.",
    )
    bench.add_argument(
        "--framework",
        action="append",
        metavar="NAME",
        help=f"only this framework ({', '.join(FRAMEWORKS)}); repeatable (default: every installed one)",
    )
    bench.add_argument("--quick", action="store_true", help="a seconds-long smoke run")

    sub.add_parser(
        "info",
        help="doconv's version and which frameworks import",
        description="doconv's version, "
        "and which frameworks import, with their versions (each probed in a child process).",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``doconv`` command line.

    Args:
        argv: the arguments without the program name. Default None (``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad input, 130 after SIGINT, 143 after SIGTERM,
        otherwise the failing benchmark's status.

    Example:
        >>> main(["demo", "--seeds", "0"])  # doctest: +SKIP
        2
    """
    parser = _build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse would name the top-level program; the command they were given to is clearer
            prog = f"{PROG} {args.command}" if args.command else PROG
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{prog} --help')", prog)
        if args.command is None:
            parser.print_help()
            return 2
        with SignalsRaise() as signals:
            try:
                return _COMMANDS[args.command](args)
            except BaseException:
                if signals.received:  # whatever a library turned the interruption into
                    raise Signalled(signals.received[0]) from None
                raise
    except UsageError as err:
        # One line, whatever a wrapped library message looked like.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{err.prog}: error: {message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Signalled) as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"{PROG}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


# -- demo ----------------------------------------------------------------------------------------


def _cmd_demo(args) -> int:
    from .demo import DemoError, Settings, run

    settings = Settings(
        framework=args.framework,
        dataset=args.dataset,
        samples=args.samples,
        seeds=args.seeds,
        epochs=args.epochs,
        D_mul=args.D_mul,
        out=args.out,
        progress=not args.no_progress,
    )
    try:
        run(settings)
    except DemoError as err:
        raise UsageError(str(err), f"{PROG} demo") from None
    return 0


# -- fuse ----------------------------------------------------------------------------------------

_KERNEL_SIZE = re.compile(r"^\d+(x\d+)*$")


def _parse_kernel_sizes(specs: Sequence[str]) -> tuple[dict, Optional[tuple]]:
    """``["conv1=1x3", "3x3x3"]`` -> ``({"conv1": (1, 3)}, (3, 3, 3))``."""
    per_layer, default = {}, None
    for spec in specs:
        layer, _, size = spec.rpartition("=")
        if not _KERNEL_SIZE.match(size) or "0" in size.split("x"):
            raise UsageError(
                f"--kernel-size wants [LAYER=]SIZE with SIZE like 3x3, 1x3 or 5, got {spec!r}", f"{PROG} fuse"
            )
        dims = tuple(int(d) for d in size.split("x"))
        if any(d < 1 for d in dims):
            raise UsageError(f"--kernel-size sizes must be positive, got {spec!r}", f"{PROG} fuse")
        if layer:
            per_layer[layer] = dims
        else:
            default = dims
    return per_layer, default


def _kernel_size(layer: str, K: int, per_layer: dict, default: Optional[tuple]) -> tuple:
    """The layer's kernel size: given, else a square 2-D kernel when K is a square number."""
    size = per_layer.get(layer, default)
    if size is None:
        root = math.isqrt(K)
        if root * root != K:
            raise ValueError(
                f"layer {layer!r} has K={K} kernel taps, not a square: give its kernel size, "
                f"e.g. --kernel-size {layer}=1x{K}"
            )
        return (root, root)
    if core.kernel_volume(size) != K:
        raise ValueError(
            f"--kernel-size for layer {layer!r} is {'x'.join(map(str, size))}, but the layer has K={K} taps"
        )
    return size


def _rank_of_1x1_layers(state_dict: dict, prefixes: list, kernel_sizes: dict, default: Optional[tuple]) -> int:
    """How many spatial dimensions the layers without D have: those of the size given for all layers,
    else of the layers with D when they agree (a Conv1d or Conv3d network), else 2."""
    if default is not None:
        return len(default)
    ranks = set()
    for prefix in prefixes:
        D = state_dict.get(prefix + "D")
        if getattr(D, "ndim", None) == 3:
            layer = prefix[:-1] if prefix.endswith(".") else prefix
            try:
                ranks.add(len(_kernel_size(layer, D.shape[1], kernel_sizes, None)))
            except ValueError:  # reported when the layer itself is folded
                pass
    return ranks.pop() if len(ranks) == 1 else 2


def fuse_state_dict(state_dict: dict, kernel_sizes: Optional[dict] = None, default_kernel_size=None):
    """Fold every DO-Conv layer of a PyTorch state_dict into plain convolution weights.

    A layer is recognised by a 3-D ``<layer>.W`` entry. doconv's layers fold with
    :func:`doconv.core.fold`; layers of the original DO-Conv code (which also
    store ``D_diag`` or ``d_diag``) fold with :func:`doconv.core.fold_reference_pytorch`,
    which follows that code's own channel map, so the result computes exactly
    what the original layer computed, for every ``groups``. ``groups`` is
    ``D.shape[0] / W.shape[1]``; 1x1 layers (no D) only change shape. Other
    entries (BatchNorm, Linear, ...) are kept as they are, in the same order.

    Args:
        state_dict: a mapping of names to tensors, as ``model.state_dict()`` returns it.
        kernel_sizes: ``{layer: kernel_size}`` for layers whose K is not a square number
            or which are not 2-D. Default None.
        default_kernel_size: kernel size for every layer with D not in ``kernel_sizes``. Default
            None: a square 2-D kernel inferred from K. Layers without D are 1x1 (1 or 1x1x1 in a
            1-D or 3-D network: the rank of this size, or of the other layers).

    Returns:
        ``(folded_state_dict, layers)`` where ``layers`` lists ``(layer, kernel_size, source)``
        with source ``"doconv"`` or ``"original code"``.

    Raises:
        ValueError: a layer whose shapes do not fit together, or whose kernel size cannot be inferred.

    Example:
        >>> import torch
        >>> from doconv.torch import DOConv2d
        >>> sd, layers = fuse_state_dict(torch.nn.Sequential(DOConv2d(3, 8, 3)).state_dict())
        >>> sorted(sd), layers
        (['0.bias', '0.weight'], [('0', (3, 3), 'doconv')])
    """
    import numpy as np
    import torch

    kernel_sizes = dict(kernel_sizes or {})
    layers = []
    prefixes = [key[:-1] for key, value in state_dict.items() if (key == "W" or key.endswith(".W")) and _is_3d(value)]
    consumed = set()
    replacement: dict = {}
    rank_of_1x1 = _rank_of_1x1_layers(state_dict, prefixes, kernel_sizes, default_kernel_size)
    for prefix in prefixes:
        layer = prefix[:-1] if prefix.endswith(".") else prefix
        name = layer or "(top level)"
        W = state_dict[prefix + "W"]
        D = state_dict.get(prefix + "D")
        diag_key = next((prefix + k for k in ("D_diag", "d_diag") if prefix + k in state_dict), None)
        D_diag = state_dict.get(diag_key) if diag_key else None
        for key in (prefix + "W", prefix + "D", diag_key):
            if key is not None and key in state_dict:
                consumed.add(key)
        W64 = W.detach().cpu().to(torch.float64).numpy()
        if D is None:
            if W.shape[2] != 1:
                raise ValueError(
                    f"layer {name!r} has W of shape {tuple(W.shape)} but no D: only 1x1 DO-Conv layers "
                    "(W's last dimension 1) come without D"
                )
            # A size for all layers is for the layers with D; a 1x1 layer takes only its rank.
            size = kernel_sizes.get(layer) or (1,) * rank_of_1x1
            if core.kernel_volume(size) != 1:
                raise ValueError(
                    f"layer {name!r} has no D, so it is a 1-tap layer; --kernel-size says {'x'.join(map(str, size))}"
                )
            kernel = W64.reshape(tuple(W.shape[:2]) + tuple(size))
            source = "doconv" if diag_key is None else "original code"
        else:
            if D.ndim != 3 or D.shape[2] != W.shape[2] or D.shape[0] % W.shape[1]:
                raise ValueError(
                    f"layer {name!r}: D must have shape (C_in, K, D_mul) with C_in a multiple of W's C_in/groups "
                    f"and W's D_mul. Received: W.shape={tuple(W.shape)}, D.shape={tuple(D.shape)}"
                )
            groups = D.shape[0] // W.shape[1]
            size = _kernel_size(name if layer else "", D.shape[1], kernel_sizes, default_kernel_size)
            D64 = D.detach().cpu().to(torch.float64).numpy()
            try:
                if diag_key is None:
                    kernel = core.fold(W64, D64, groups, size)
                    source = "doconv"
                else:
                    diag64 = D_diag.detach().cpu().to(torch.float64).numpy()
                    kernel = core.fold_reference_pytorch(W64, D64, diag64, groups, size)
                    source = "original code"
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None
        # Fold in float64, store in the checkpoint's own dtype.
        replacement[prefix + "W"] = (prefix + "weight", torch.from_numpy(np.ascontiguousarray(kernel)).to(W.dtype))
        layers.append((layer, tuple(size), source))
    folded = OrderedDict()
    for key, value in state_dict.items():
        if key in replacement:
            new_key, new_value = replacement[key]
            folded[new_key] = new_value
        elif key not in consumed:
            folded[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # load_state_dict reads per-module versions (e.g. BatchNorm's) from here.
        folded._metadata = metadata
    return folded, layers


def _is_3d(value) -> bool:
    return getattr(value, "ndim", None) == 3


def _load_checkpoint(path: str):
    """``torch.load(path, weights_only=True)`` with one-line errors for the ways it fails."""
    import pickle

    import torch

    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist or is not a file", f"{PROG} fuse")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                is_torch = any(n.endswith("/data.pkl") for n in zf.namelist())
                # torch.load does not check the archive's checksums: a damaged tensor would load as
                # garbage and be folded into garbage. Reading every member once checks them.
                damaged = zf.testzip() if is_torch else None
            if damaged is not None:
                raise UsageError(
                    f"{path} is damaged: its entry {damaged} fails its checksum (the file was changed or cut "
                    "after torch.save wrote it)",
                    f"{PROG} fuse",
                )
        else:
            # torch.save's pre-1.6 format starts with a pickled magic number (protocol 2, a long).
            is_torch = head == b"\x80\x02\x8a\n"
    except OSError as err:
        raise UsageError(f"cannot read checkpoint {path}: {err.strerror or err}", f"{PROG} fuse") from None
    if not is_torch:
        raise UsageError(f"{path} is not a PyTorch checkpoint (a file written by torch.save)", f"{PROG} fuse")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f" (found {found.group(1)})" if found else ""
        raise UsageError(
            f"{path} holds pickled Python objects{what}, e.g. a whole model saved with torch.save(model); "
            "doconv fuse loads weights only (weights_only=True) and never runs pickled code: "
            "save model.state_dict() instead",
            f"{PROG} fuse",
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged archive raises anything from RuntimeError to KeyError
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise UsageError(
            f"{path} is not a readable PyTorch checkpoint: {type(err).__name__}: {first_line}",
            f"{PROG} fuse",
        ) from None


def _find_state_dict(obj, path: str):
    """The state_dict itself, or the one a training checkpoint keeps under a usual key."""
    import torch

    def is_state_dict(value):
        return (
            isinstance(value, dict)
            and bool(value)
            and all(isinstance(k, str) and (torch.is_tensor(v) or v is None) for k, v in value.items())
        )

    if is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "module"):
            if is_state_dict(obj.get(key)):
                return obj[key], key
    raise UsageError(
        f"{path} is a PyTorch file but not a state_dict (a dict of names to tensors), nor a checkpoint holding one "
        "under 'state_dict' or 'model'",
        f"{PROG} fuse",
    )


def _cmd_fuse(args) -> int:
    prog = f"{PROG} fuse"
    try:
        import torch
    except ImportError:
        raise UsageError(f"needs PyTorch: {install_hint('torch')}", prog) from None
    if not args.output or args.output.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        # abspath would drop the slash, and a file would be written where a folder was meant.
        raise UsageError(f"output {args.output!r} names a folder; give a file name", prog)
    src, dst = os.path.abspath(args.checkpoint), os.path.abspath(args.output)
    if os.path.realpath(src) == os.path.realpath(dst) or (
        os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst)
    ):
        raise UsageError(f"the output must not be the checkpoint itself ({args.checkpoint}); choose another -o", prog)
    _check_output(args.output, args.force, prog)
    per_layer, default = _parse_kernel_sizes(args.kernel_size)
    obj = _load_checkpoint(args.checkpoint)
    state_dict, wrapper_key = _find_state_dict(obj, args.checkpoint)
    try:
        folded, layers = fuse_state_dict(state_dict, per_layer, default)
    except ValueError as err:
        raise UsageError(str(err), prog) from None
    if not layers:
        raise UsageError(
            f"{args.checkpoint} has no DO-Conv layer (no '<layer>.W' entries of 3 dimensions): nothing to fold", prog
        )
    unknown = sorted(set(per_layer) - {layer for layer, _, _ in layers})
    if unknown:
        raise UsageError(
            f"--kernel-size names layers that are not DO-Conv layers of the checkpoint: {', '.join(unknown)}", prog
        )
    try:
        write_atomically(dst, lambda fh: torch.save(folded, fh), replace=args.force)
    except NotRegularFile as err:
        raise UsageError(_not_regular_message(args.output, err.kind), prog) from None
    except FileExistsError:
        raise UsageError(f"output {args.output} exists; use --force to replace it", prog) from None
    except OSError as err:
        raise UsageError(f"cannot write {args.output}: {err.strerror or err}", prog) from None
    except RuntimeError as err:  # torch.save reports a failed write (e.g. a full disk) as RuntimeError
        raise UsageError(f"cannot write {args.output}: {_first_line(err)}", prog) from None
    original = sum(1 for _, _, source in layers if source == "original code")
    where = f" (the state_dict under '{wrapper_key}'; other entries are not copied)" if wrapper_key else ""
    print(
        f"Folded {len(layers)} DO-Conv layer(s){where}"
        + (f", {original} of them from the original DO-Conv code (D_diag)" if original else "")
        + f"; wrote {len(folded)} entries to {args.output}"
    )
    for layer, size, source in layers:
        print(
            f"  {layer or '(top level)'}: {'x'.join(map(str, size))}"
            + (" [original code]" if source != "doconv" else "")
        )
    return 0


def _check_output(output: str, force: bool, prog: str) -> None:
    """Refuse, before any work, an output that exists (without --force), is not a regular file, or cannot be written."""
    kind = special_kind(output)
    if kind is not None:
        raise UsageError(_not_regular_message(output, kind), prog)
    if os.path.exists(output) and not force:
        raise UsageError(f"output {output} exists; use --force to replace it", prog)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder} does not exist or is not a folder", prog)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {output}: output folder {folder} is not writable", prog)


def _not_regular_message(output: str, kind: str) -> str:
    if kind == "a folder":
        return f"output {output} is a folder; give a file name"
    return f"output {output} is {kind}, not a regular file; doconv fuse replaces only regular files, even with --force"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# -- bench and info: one child process per framework ---------------------------------------------

# (name shown, module to import, pip extra) - the order in which `info` lists them.
_PROBES = [
    ("torch", "torch", "torch"),
    ("tensorflow", "tensorflow", "tensorflow"),
    ("keras", "keras", "keras"),
    ("jax", "jax", "jax"),
    ("mxnet", "mxnet", "gluon"),
    ("gluoncv", "gluoncv", "gluon"),
]
_DEMO_PROBES = [
    ("scikit-learn", "sklearn"),
    ("matplotlib", "matplotlib"),
    ("mnist1d", "mnist1d"),
    ("tqdm", "tqdm"),
    ("onnx", "onnx"),
    ("onnxruntime", "onnxruntime"),
]
# (framework, module probed, pip extra): bench_keras runs on the tensorflow backend.
_BENCH = [("torch", "torch", "torch"), ("keras", "keras", "tensorflow"), ("gluon", "mxnet", "gluon")]
_BENCH_MODULE = "doconv.benchmarks.bench_{}"  # each has main(argv=None) -> int
_BENCH_MISSING = 75  # the child's exit status when the benchmark module itself does not exist
_BENCH_CODE = f"""
import importlib, sys
try:
    bench = importlib.import_module(sys.argv[1])
except ModuleNotFoundError as err:
    if err.name != sys.argv[1]:
        raise
    sys.exit({_BENCH_MISSING})
sys.exit(bench.main(sys.argv[2:]))
"""

_PROBE_CODE = """
import importlib, sys
m = importlib.import_module(sys.argv[1])
version = getattr(m, "__version__", "unknown version")
if sys.argv[1] == "keras":
    version += " (backend " + m.backend.backend() + ")"
print("DOCONV-PROBE " + version)
"""


def _child_env() -> dict:
    """The environment for child processes: they import this same doconv.

    An installed doconv is found by the child as it is (same interpreter, same site-packages):
    nothing is added, since putting site-packages on PYTHONPATH would place it before the
    standard library. A doconv imported from elsewhere (a source tree on sys.path) gets its
    folder put first on PYTHONPATH.
    """
    import site

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site_dirs = site.getsitepackages() + [site.getusersitepackages()]
    on_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(_same_folder(root, d) for d in site_dirs + on_path):
        env["PYTHONPATH"] = os.pathsep.join([root, *on_path])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"  # a benchmark's lines reach `doconv bench` as they are printed
    return env


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _probe(module: str, timeout: float = 180.0) -> tuple[bool, str]:
    """Import ``module`` in a child process: ``(imports, version or why not)``."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_CODE, module],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_child_env(),
        )
    except subprocess.TimeoutExpired:
        return False, f"import took more than {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith("DOCONV-PROBE "):
            return True, line[len("DOCONV-PROBE ") :]
    errors = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    if any(f"No module named '{module}'" in line for line in errors[-1:]):
        return False, "not installed"
    last = errors[-1] if errors else f"exit status {proc.returncode}"
    return False, f"import fails: {last[:160]}"


def _probe_all(modules: Sequence[str]) -> dict:
    # Parallel: TensorFlow alone takes seconds to import.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(modules, pool.map(_probe, modules)))


def _cmd_info(args) -> int:
    probes = _probe_all([m for _, m, _ in _PROBES] + [m for _, m in _DEMO_PROBES])
    print(f"doconv {__version__} (Python {platform.python_version()}, {platform.system()} {platform.machine()})")
    adapters = {"torch": "doconv.torch", "keras": "doconv.keras", "mxnet": "doconv.gluon"}
    width = max(len(name) for name, _, _ in _PROBES + [(n, m, "") for n, m in _DEMO_PROBES])
    print("\nframeworks:")
    for name, module, extra in _PROBES:
        ok, text = probes[module]
        hint = "" if ok else f"  ({install_hint(extra)})"
        adapter = f"  -> {adapters[module]}" if ok and module in adapters else ""
        print(f"  {name.ljust(width)}  {text}{adapter}{hint}")
    print(f"\nfor the demo ({install_hint('demo')}):")
    for name, module in _DEMO_PROBES:
        print(f"  {name.ljust(width)}  {probes[module][1]}")
    _, kernel = fold_kernel_status()
    print(f"\nCPU fold kernel (doconv._foldkernel, used by doconv.torch and doconv.gluon): {kernel}")
    return 0


def _cmd_bench(args) -> int:
    from .demo import FRAMEWORKS

    wanted = args.framework or [name for name, _, _ in _BENCH]
    unknown = [name for name in wanted if name not in FRAMEWORKS]
    if unknown:
        raise UsageError(f"unknown framework {unknown[0]!r}: choose from {', '.join(FRAMEWORKS)}", f"{PROG} bench")
    plan = [entry for entry in _BENCH if entry[0] in wanted]
    probes = _probe_all([module for _, module, _ in plan])
    if args.framework:  # asked for by name: every one must be there, said before the first benchmark runs
        for name, module, extra in plan:
            ok, text = probes[module]
            if not ok:
                raise UsageError(
                    f"--framework {name} needs {module}, which is {text}: {install_hint(extra)}", f"{PROG} bench"
                )
    status, ran, busy = 0, 0, []
    for name, module, _ in plan:
        ok, text = probes[module]
        bench_module = _BENCH_MODULE.format(name)
        if not ok:
            print(f"{name}: skipped, {module} {text}", flush=True)
            continue
        print(f"== {name} ({module} {text}): {bench_module}{' --quick' if args.quick else ''}", flush=True)
        returncode, was_busy = _run_benchmark(bench_module, ["--quick"] if args.quick else [])
        if returncode == _BENCH_MISSING:
            print(f"{name}: skipped, {bench_module} is not part of this doconv", flush=True)
            continue
        ran += 1
        busy += [name] if was_busy else []
        if returncode != 0:
            print(f"{name}: benchmark failed with exit status {returncode}", file=sys.stderr, flush=True)
            status = status or returncode
    if ran == 0:
        print(f"no benchmark ran: install a framework, e.g. {install_hint('torch')}", file=sys.stderr)
        return status or 1
    if busy:
        # Repeated at the end: with several frameworks, each one's own note has scrolled away.
        print(f"\nthe machine was busy during the {', '.join(busy)} benchmark(s): their ratios are unreliable")
    return status


def _run_benchmark(bench_module: str, argv: list) -> tuple[int, bool]:
    """Run one benchmark in a child process, passing its output through: ``(exit status, said it was busy)``.

    A child process per framework: no import-order crash, and one benchmark's threads and
    memory do not disturb the next one's timings.
    """
    busy = False
    proc = subprocess.Popen(
        [sys.executable, "-c", _BENCH_CODE, bench_module, *argv], stdout=subprocess.PIPE, text=True, env=_child_env()
    )
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            busy = busy or is_busy_note(line)
        proc.wait()
    except BaseException:  # interrupted: the child must not run on, unseen
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    return proc.returncode, busy


_COMMANDS = {"demo": _cmd_demo, "fuse": _cmd_fuse, "bench": _cmd_bench, "info": _cmd_info}
