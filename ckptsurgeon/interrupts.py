"""SIGINT and SIGTERM as a clean stop: exit 130 / 143, the output untouched, no temporary file.

The CLI installs the handlers (`handling_signals`) before anything heavy is imported. A signal is
both raised (as `Interrupted`, a BaseException, so no `except Exception` stops it) and recorded:
torch's import swallows whatever is raised while it imports numpy (its C++ code clears the
error), so the writers also call `raise_if_interrupted` where a swallowed signal must still stop
them, above all right before the rename that replaces the output. Once an output has replaced its
destination (`committed`), a late signal no longer stops the command: exit 130 / 143 always means
the output was left as it was.

Without `handling_signals` (the Python API) nothing is ever recorded and every function here is a
no-op: KeyboardInterrupt behaves as Python makes it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A SIGINT or SIGTERM received; the command ends with `exit_code` (128 + the signal number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


_pending: int | None = None  # the first signal received
_shield = 0  # > 0: signals are recorded, not raised (temp-file bookkeeping and cleanup)
_committed = False  # an output replaced its destination: the command finishes


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _pending is None:
        _pending = signum
    if _shield == 0 and not _committed:
        raise Interrupted(_pending)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Install the handlers for the duration of one command (main thread only), then restore.

    A signal ignored when the command starts (`nohup`, `cmd &` in a script) stays ignored.
    """
    global _pending, _shield, _committed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending, _shield, _committed = None, 0, False
    previous = {s: signal.signal(s, _handler) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Inside, a signal is only recorded; the code after the block calls `raise_if_interrupted`."""
    global _shield
    _shield += 1
    try:
        yield
    finally:
        _shield -= 1


def hold() -> None:
    """From now on signals are only recorded (the command is over and reports how it ended)."""
    global _shield
    _shield += 1


def pending() -> int | None:
    """The signal received and not overtaken by a committed output, or None."""
    return None if _committed else _pending


def raise_if_interrupted() -> None:
    """Raise `Interrupted` if a signal was received (also one that something swallowed)."""
    if _pending is not None and not _committed:
        raise Interrupted(_pending)


def commit() -> None:
    """An output has replaced its destination: a signal from now on lets the command finish."""
    global _committed
    _committed = True
