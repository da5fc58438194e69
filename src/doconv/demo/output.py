"""The output folder: checked before training, written through a staging folder, published at the end.

Artefacts are written into a temporary folder inside the output folder and moved into place only
when the run has finished, so an interrupted or failed run leaves nothing half-written.
"""

from __future__ import annotations

import os
import tempfile

from .settings import DemoError


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
    try:
        os.makedirs(out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".doconv-demo-", dir=out)
    except OSError as err:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise DemoError(f"cannot write to output folder {out}: {err.strerror or err}") from err
    return out, staging, created


def publish(staging: str, out: str) -> list[str]:
    """Move every finished artefact from the staging folder into ``out`` (same file system: renames)."""
    names = sorted(os.listdir(staging))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    return names
