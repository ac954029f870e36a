"""One signal policy for `train` and `sweep`: SIGTERM (timeout, batch schedulers, `docker stop`) is handled
like SIGINT (Ctrl-C).

The first SIGINT or SIGTERM raises `Interrupted` (a KeyboardInterrupt) in the main thread, so every
`except KeyboardInterrupt` path runs: MLflow runs end KILLED, Optuna trials FAIL, the parent run is closed.
Further signals while that cleanup runs are logged and ignored (SIGKILL still ends the process). The CLI
exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process ended by that signal.

Python can lose the handler's exception: raised inside a finalizer (`__del__`, a weakref callback, which
the garbage collector may run anywhere) it is printed as "Exception ignored" and dropped, and a library's
cleanup can replace it with its own error. So the signal is also remembered, and `check()` (between
training steps and between sweep trials) raises it again: a signalled process never carries on or exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by the handler; `signum` is the signal that stopped the process."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: Optional[int] = None


def _handler(signum: int, frame) -> None:
    global _received
    if _received is not None:
        log.warning("%s received while cleaning up after %s; finishing the cleanup",
                    signal.Signals(signum).name, signal.Signals(_received).name)
        return
    _received = signum
    raise Interrupted(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM by raising `Interrupted` (main thread only; no-op elsewhere). Installing
    again keeps a signal already received; installing over other handlers starts afresh."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        return
    if any(signal.getsignal(signum) is not _handler for signum in HANDLED):
        _received = None
    for signum in HANDLED:
        signal.signal(signum, _handler)


def forget() -> None:
    """Forget a received signal: for a long-lived process (a test session) that has dealt with it."""
    global _received
    _received = None


def received() -> Optional[int]:
    """The signal that interrupted this process, if any."""
    return _received


def check() -> None:
    """Raise `Interrupted` if a signal arrived (normal flow only: cleanup code must not call it)."""
    if _received is not None:
        raise Interrupted(_received)


def exit_code(error: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    if isinstance(error, Interrupted):
        return error.exit_code
    return 128 + (_received or signal.SIGINT)


# ---------------------------------------------------------------- process identity (who owns a trial)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_identity(pid: Optional[int] = None) -> str:
    """`host:pid:start` of this (or the given) process."""
    import socket

    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def is_dead(identity: str) -> bool:
    """True only when `identity` is a process of this host that no longer runs (another host: unknown, False)."""
    import socket

    try:
        host, pid_text, start = identity.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    if Path(f"/proc/{pid}/stat").exists():
        current = _start_time(pid)
        if start and current and current != start:
            return True  # the pid now belongs to another process
        try:  # a zombie has finished running
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False
    return False


__all__ = ["Interrupted", "install", "received", "forget", "check", "exit_code", "process_identity", "is_dead"]
