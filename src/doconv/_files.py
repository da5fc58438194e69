"""Writing an output file so that a failure or an interruption never leaves half of it behind.

The data goes to a new temporary file next to the destination, which is renamed over it once
complete; whatever stops the write (an error, KeyboardInterrupt, the exception a signal
handler raises) removes the temporary file. Only a regular file is ever replaced: a FIFO, a
device node, a symbolic link or a folder at the destination is refused, since renaming over
it would silently swap a special file for a plain one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from typing import BinaryIO, Callable, Optional

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """The destination exists and is not a regular file; ``kind`` says what it is."""

    def __init__(self, path: str, kind: str):
        super().__init__(errno.EEXIST, f"{path} is {kind}, not a regular file", path)
        self.kind = kind


def special_kind(path: str) -> Optional[str]:
    """What ``path`` is when it exists but is not a regular file (symbolic links not followed), else None.

    Example:
        >>> special_kind("/"), special_kind("/no/such/file")
        ('a folder', None)
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def write_atomically(path: str, write: Callable[[BinaryIO], None], replace: bool = False) -> None:
    """Write ``path`` with ``write(file)``, through a temporary file in the same folder.

    A new file gets mode ``0o666`` less the umask, as ``open(path, "wb")`` (and so ``torch.save``)
    gives one; a replaced file keeps its permission bits, as writing into it would (a private
    0600 file stays private).

    Args:
        path: the destination.
        write: called once with the temporary file, opened for binary writing.
        replace: replace an existing regular file at ``path``. Default False.

    Raises:
        NotRegularFile: ``path`` exists and is not a regular file (checked again before the rename).
        FileExistsError: ``path`` exists and ``replace`` is False.
        OSError: the folder cannot be written, the disk is full, ...
        Whatever ``write`` raises. In every case the temporary file is gone and ``path`` is untouched.

    Example:
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "out.bin")
        >>> write_atomically(out, lambda fh: fh.write(b"data"))
        >>> open(out, "rb").read(), len(os.listdir(os.path.dirname(out)))
        (b'data', 1)
    """
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    _check_destination(path, replace)
    tmp = None
    try:
        for _ in range(100):
            # Named before it exists, so that an interruption right after os.open still removes it.
            tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                break
            except FileExistsError:  # someone else's file: never remove it
                tmp = None
        else:
            raise OSError(f"no free temporary file name in {folder}")
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it the file
        _check_destination(path, replace)
        with contextlib.suppress(FileNotFoundError):  # a file to replace: its permissions carry over
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _check_destination(path: str, replace: bool) -> None:
    kind = special_kind(path)
    if kind is not None:
        raise NotRegularFile(path, kind)
    if not replace and os.path.exists(path):
        raise FileExistsError(errno.EEXIST, "exists", path)
