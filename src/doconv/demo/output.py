"""The output folder: checked before training, written through a staging folder, published at the end.

Artefacts are written into a temporary folder inside the output folder and moved into place only
when the run has finished, so an interrupted or failed run leaves nothing half-written.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile

from .._files import special_kind
from .settings import DemoError

# The names a run may publish (the backends' model files, the report's curves and results): a
# second run into the same folder replaces them, and only them.
ARTEFACTS = ("results.json", "curves.png", "model_folded*", "model_doconv*")


def _check_destinations(out: str, names) -> None:
    """Refuse, before anything is moved, a destination that is not a regular file (a folder named
    results.json, a link, a FIFO): replacing it would fail halfway or swap a special file for a plain one."""
    for name in names:
        kind = special_kind(os.path.join(out, name))
        if kind is not None:
            raise DemoError(
                f"output folder {out} holds {name}, which is {kind}: the demo writes a file of that name; "
                "move it away or choose another --out"
            )


def prepare_output(out: str) -> tuple[str, str, bool]:
    """Create the output folder if needed and a private temporary folder inside it.

    Checking writability here, before any training, turns an unwritable ``--out``
    into an immediate error instead of one after minutes of work.

    Returns:
        ``(out, staging_folder, created)`` where ``created`` says whether ``out`` was made here.

    Raises:
        DemoError: the folder cannot be created or written.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DemoError(f"output folder {out} is a file, not a folder")
    created = not os.path.exists(out)
    if not created:
        _check_destinations(out, sorted(n for n in os.listdir(out) if any(fnmatch.fnmatch(n, p) for p in ARTEFACTS)))
    try:
        os.makedirs(out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".doconv-demo-", dir=out)
    except OSError as err:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise DemoError(f"cannot write to output folder {out}: {err.strerror or err}") from err
    return out, staging, created


def publish(staging: str, out: str) -> list[str]:
    """Move every finished artefact from the staging folder into ``out`` (same file system: renames),
    replacing an earlier run's files of the same names; every destination is checked first.

    Raises:
        DemoError: a destination is not a regular file, or a rename fails (the message names it).
    """
    names = sorted(os.listdir(staging))
    _check_destinations(out, names)
    for name in names:
        try:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
        except OSError as err:
            raise DemoError(f"cannot write {os.path.join(out, name)}: {err.strerror or err}") from None
    os.rmdir(staging)
    return names
