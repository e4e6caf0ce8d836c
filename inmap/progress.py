"""Progress of long stages, for whoever shows it: the command line's live display, Prefect's
progress artifacts, or log lines.

Stages report `(done, total)` for one piece of work (a shard, a fit) through a callback from
`reporter(stage, piece)`; a flow may first `announce` a stage's whole size. Every report reaches
the listeners subscribed in this process (the command line's display) and any `extra` ones (a
task's Prefect artifact); with no listener subscribed, it becomes a log line at most every
`LOG_SECONDS`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("inmap.progress")
LOG_SECONDS = 10.0
WHOLE_STAGE = "*"  # the piece name of an announcement

# (stage, piece, done, total)
Listener = Callable[[str, str, int, int], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Send every report in this process to `listener`; returns the unsubscribe function."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def announce(stage: str, total: int) -> None:
    """Tell listeners how large a whole stage is (images to embed, steps to learn)."""
    reporter(stage, WHOLE_STAGE)(0, total)


def reporter(stage: str, piece: str, *extra: Listener) -> Callable[[int, int], None]:
    """A `(done, total)` callback for one piece of work of `stage`."""
    logged = [time.monotonic()]

    def report(done: int, total: int) -> None:
        with _lock:
            listeners = [*_listeners, *extra]
            quiet = bool(_listeners)
        for listener in listeners:
            listener(stage, piece, done, total)
        if piece == WHOLE_STAGE or quiet:
            return
        if time.monotonic() - logged[0] > LOG_SECONDS or done == total:
            logged[0] = time.monotonic()
            logger.info("%s %s: %d/%d", stage, piece, done, total)

    return report
