"""Calls of user code (reward and metric functions) with a time limit.

Python cannot stop a thread, so a call that timed out is abandoned, not stopped: it keeps its
(daemon) thread until it returns or the process ends, and the next call starts on a thread of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class CallTimeout(TimeoutError):
    """A call of user code gave no result within its time limit (not a TimeoutError of its own)."""


def call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """``fn()`` on a thread of its own, waited for at most ``timeout_s`` seconds.

    Raises:
        CallTimeout: no result in time. The call is abandoned: its (daemon) thread runs on until
            ``fn`` returns or the process ends.
        Exception: what ``fn`` raised.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome.append((False, e))

    thread = threading.Thread(target=run, name="kiln-user-call", daemon=True)
    thread.start()
    # threading cannot wait longer than TIMEOUT_MAX (join(inf) raised OverflowError after fn had
    # started, blamed on the user's function): a longer limit is no limit.
    thread.join(None if timeout_s >= threading.TIMEOUT_MAX else timeout_s)
    if not outcome:
        raise CallTimeout(f"no result after {timeout_s:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
