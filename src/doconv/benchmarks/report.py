"""What every benchmark prints beside its ratios: whether the machine was quiet, and which goals apply.

A ratio means something only if the native-vs-native control beside it is close to 1: a
control at 0.13 says that one of two identical networks ran seven times slower than the
other, so every ratio of that run is noise. Goals were set for each benchmark's default
configuration; other sizes (``--quick``, a custom batch) have none.
"""

from __future__ import annotations

from typing import Iterable, Optional

QUIET = (0.95, 1.05)  # the controls' range in which the ratios are trusted
BUSY = "the machine is busy; these ratios are unreliable"


def busy_note(controls: Iterable[float]) -> Optional[str]:
    """A line to print after the table when a control is outside :data:`QUIET`, else None.

    Args:
        controls: the native / native ratios of the run.

    Example:
        >>> busy_note([0.99, 1.02]) is None
        True
        >>> busy_note([0.99, 0.13])
        'note: the machine is busy; these ratios are unreliable (control 0.13 outside 0.95-1.05)'
    """
    low, high = QUIET
    outside = [c for c in controls if not low <= c <= high]
    if not outside:
        return None
    shown = ", ".join(f"{c:.2f}" for c in outside)
    return f"note: {BUSY} (control {shown} outside {low:.2f}-{high:.2f})"


def is_busy_note(line: str) -> bool:
    """Whether a line of a benchmark's output is :func:`busy_note`'s (``doconv bench`` looks for it)."""
    return line.startswith(f"note: {BUSY}")


def goal(text: str, default_configuration: bool) -> str:
    """The goal column's entry: ``text`` for the configuration the goal was set for, else "-".

    Example:
        >>> goal("<= 1.05", True), goal("<= 1.05", False)
        ('<= 1.05', '-')
    """
    return text if default_configuration else "-"
