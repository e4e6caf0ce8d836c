"""Stop the embedded Prefect server that a killed `inmap label` would leave running.

Prefect's embedded (ephemeral) server is a child process of the CLI. A CLI killed with SIGKILL
cannot stop it, and each such server would live on, holding a port and a few hundred MB. So the
CLI starts a watchdog process and puts a token in its own environment, which the server inherits
when Prefect starts it. Once the CLI is gone, the watchdog terminates the Prefect servers whose
environment holds the token (there is no race with a server started just before the kill). When
the CLI ends normally, Prefect has stopped the server already and the watchdog finds none.

Linux only (it reads /proc); elsewhere no watchdog is started.

    python -m inmap.watchdog PID TOKEN    # what `start` runs
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

SERVER_MARKER = b"prefect.server.api.server:create_app"  # in the uvicorn command line Prefect runs
TOKEN_VARIABLE = "INMAP_WATCHDOG_TOKEN"
POLL_SECONDS = 1.0


def start() -> subprocess.Popen | None:
    """A watchdog for this process, or None where there is no /proc."""
    if not os.path.isdir("/proc/self/task"):
        return None
    token = secrets.token_hex(8)
    os.environ[TOKEN_VARIABLE] = token  # before the server starts: it inherits the environment
    return subprocess.Popen(
        [sys.executable, "-m", "inmap.watchdog", str(os.getpid()), token],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the CLI's process group does not stop it
    )


def watch(parent: int, token: str, poll: float = POLL_SECONDS) -> list[int]:
    """Wait for `parent` to end, then terminate the Prefect servers started with `token` in their
    environment; the pids terminated."""
    started = _start_time(parent)
    while started is not None and _start_time(parent) == started and not _is_zombie(parent):
        time.sleep(poll)
    tag = f"{TOKEN_VARIABLE}={token}".encode()
    stopped = []
    for pid in _pids():
        if SERVER_MARKER in _cmdline(pid) and tag in _environ(pid).split(b"\0"):
            _terminate(pid)
            stopped.append(pid)
    return stopped


def servers_of(parent: int) -> list[int]:
    """The Prefect server processes that are children of `parent`."""
    return [pid for pid in _pids() if _ppid(pid) == parent and SERVER_MARKER in _cmdline(pid)]


def _terminate(pid: int, grace: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not _is_zombie(pid):
            time.sleep(0.1)
        if not _is_zombie(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; the fields after it are plain.
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # field 22: start time since boot, in ticks


def _ppid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _is_zombie(pid: int) -> bool:
    """Gone, or ended and not yet reaped."""
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def _cmdline(pid: int) -> bytes:
    return _read(f"/proc/{pid}/cmdline")


def _environ(pid: int) -> bytes:
    return _read(f"/proc/{pid}/environ")


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
