"""SIGINT and SIGTERM as exceptions, so that a command's cleanup (``finally``) runs for both.

SIGTERM's default action kills the process on the spot, leaving temporary files behind;
raised as an exception it unwinds like KeyboardInterrupt does.
"""

from __future__ import annotations

import signal
import threading


class Signalled(BaseException):
    """SIGINT or SIGTERM arrived during a command (a BaseException, as KeyboardInterrupt is)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class SignalsRaise:
    """Within it, SIGINT and SIGTERM raise :class:`Signalled` in the main thread, and are remembered.

    Remembering matters because some libraries replace the exception: an interrupted
    ``torch.save`` raises its own RuntimeError on the way out. ``received`` still says a
    signal stopped the command. Elsewhere (another thread) the handlers cannot be set and
    SIGTERM keeps its default action.
    """

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. under nohup: stays ignored
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received.append(signum)
        raise Signalled(signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
