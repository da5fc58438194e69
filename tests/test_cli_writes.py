"""``doconv fuse`` writes its output safely: one-line errors, signals, special files, the umask.

Runs in the torch tox env. A signal is sent mid-write to a child process whose ``torch.save``
writes through a file that stops after its first bytes and says so on stdout: the parent
signals only once the temporary file holds data, so the test does not depend on timing.
"""

import os
import signal
import stat
import struct
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from doconv import _files, cli  # noqa: E402
from doconv.torch import DOConv2d  # noqa: E402


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "doconv.pt"
    torch.save(torch.nn.Sequential(DOConv2d(3, 8, 3), DOConv2d(8, 4, 3, groups=2)).state_dict(), path)
    return path


def fuse(capsys, checkpoint, output, *extra):
    status = cli.main(["fuse", str(checkpoint), "-o", str(output), *extra])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, match):
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("doconv fuse: error: ") and match in err, err


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_output_folder_that_cannot_be_written(capsys, checkpoint, tmp_path, monkeypatch):
    """Creating the temporary file fails (as in a read-only folder, whoever the user is)."""

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_files.os, "open", refuse)
    status, _, err = fuse(capsys, checkpoint, tmp_path / "out.pt")
    assert_one_line_error(status, err, f"cannot write {tmp_path / 'out.pt'}: Permission denied")
    assert sorted(os.listdir(tmp_path)) == ["doconv.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_output_folder(capsys, checkpoint, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        status, _, err = fuse(capsys, checkpoint, folder / "out.pt")
    finally:
        folder.chmod(0o700)
    assert_one_line_error(status, err, "is not writable")
    assert os.listdir(folder) == []


def test_a_failing_torch_save_is_one_line(capsys, checkpoint, tmp_path, monkeypatch):
    """torch.save reports a failed write (a full disk) as a RuntimeError, after writing part of the file."""

    def disk_full(obj, fh, **kwargs):
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    status, _, err = fuse(capsys, checkpoint, tmp_path / "out.pt")
    assert_one_line_error(status, err, "cannot write")
    assert "PytorchStreamWriter failed writing file" in err
    assert sorted(os.listdir(tmp_path)) == ["doconv.pt"]


def _special(kind, path, tmp_path):
    """Make ``path`` a special file of the given kind; returns what must still be there afterwards."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink":
        target = tmp_path / "target.pt"
        target.write_bytes(b"the link's target")
        path.symlink_to(target)
    elif kind == "device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of its own
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    return os.lstat(path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("fifo", "is a named pipe (FIFO), not a regular file"),
        ("symlink", "is a symbolic link, not a regular file"),
        ("device", "is a character device, not a regular file"),
        ("folder", "is a folder; give a file name"),
    ],
)
def test_force_replaces_only_a_regular_file(capsys, checkpoint, tmp_path, kind, message):
    output = tmp_path / "out.pt"
    before = _special(kind, output, tmp_path)
    for extra in ([], ["--force"]):
        status, _, err = fuse(capsys, checkpoint, output, *extra)
        assert_one_line_error(status, err, message)
        after = os.lstat(output)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    if kind == "symlink":
        assert (tmp_path / "target.pt").read_bytes() == b"the link's target"
    assert leftovers(tmp_path) == []


def test_force_replaces_a_regular_file(capsys, checkpoint, tmp_path):
    output = tmp_path / "out.pt"
    output.write_bytes(b"old")
    assert fuse(capsys, checkpoint, output, "--force")[0] == 0
    assert "0.weight" in torch.load(output, weights_only=True)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_mode_honours_the_umask(capsys, checkpoint, tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert fuse(capsys, checkpoint, tmp_path / "out.pt")[0] == 0
        torch.save({}, tmp_path / "by_torch.pt")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "out.pt").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "by_torch.pt").st_mode)


_STALLING_CHILD = r"""
import sys, time
import torch
from doconv import cli

real_save = torch.save


class Stalls:
    # Passes writes through until some bytes are on disk, then says so and waits for the signal.
    def __init__(self, fh):
        self.fh, self.stalled = fh, False

    def write(self, data):
        if not self.stalled and self.fh.tell() > 0:
            self.stalled = True
            self.fh.flush()
            print("mid-write", flush=True)
            time.sleep(120)  # ended by the parent's signal
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()


torch.save = lambda obj, fh, **kwargs: real_save(obj, Stalls(fh), **kwargs)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_write_removes_the_temporary_file(checkpoint, tmp_path, signum, status):
    output = tmp_path / "out.pt"
    output.write_bytes(b"the previous output")
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALLING_CHILD, "fuse", str(checkpoint), "-o", str(output), "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "mid-write\n", proc.stderr.read()
        partial = leftovers(tmp_path)
        assert len(partial) == 1 and (tmp_path / partial[0]).stat().st_size > 0  # caught mid-write
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert err.strip().splitlines() == [f"doconv: interrupted ({signal.Signals(signum).name})"]
    assert sorted(os.listdir(tmp_path)) == ["doconv.pt", "out.pt"]
    assert output.read_bytes() == b"the previous output"


def test_signal_handlers_are_restored_and_an_ignored_signal_stays_ignored():
    from doconv._signals import SignalsRaise

    before = signal.getsignal(signal.SIGTERM)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup or `cmd &`
    try:
        with SignalsRaise():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGINT, previous_int)


def test_force_keeps_the_permissions_of_the_file_it_replaces(capsys, checkpoint, tmp_path):
    """Renaming a new file over the old one would give it 0o666 less the umask: a private output stayed private
    only when written into, so the replacement takes the old file's permission bits."""
    output = tmp_path / "private.pt"
    output.write_bytes(b"old")
    output.chmod(0o600)
    status, _, err = fuse(capsys, checkpoint, output, "--force")
    assert status == 0, err
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert output.read_bytes() != b"old"


@pytest.mark.parametrize("output", ["newdir/", ""])
def test_an_output_naming_a_folder_is_refused(capsys, checkpoint, tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    status, _, err = fuse(capsys, checkpoint, output)
    assert_one_line_error(status, err, f"output {output!r} names a folder; give a file name")
    assert sorted(os.listdir(tmp_path)) == ["doconv.pt"]


def test_a_damaged_checkpoint_is_refused(capsys, checkpoint, tmp_path):
    """torch.load does not check the archive's checksums: flipped bytes in a tensor loaded as garbage."""
    import zipfile

    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as zf:
        member = next(info for info in zf.infolist() if "/data/" in info.filename and info.file_size >= 64)
    # The member's data follows its local header (30 bytes, then its name and extra field, whose lengths
    # the header gives: the extra field pads for alignment and differs from the central directory's).
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    status, _, err = fuse(capsys, damaged, tmp_path / "out.pt")
    assert_one_line_error(status, err, f"{damaged} is damaged: its entry")
    assert not (tmp_path / "out.pt").exists()
