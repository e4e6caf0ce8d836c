"""Stop the embedded Prefect server that a killed `inmap label` would leave running.

Prefect's embedded (ephemeral) server is a child process of the CLI. A CLI killed with SIGKILL
cannot stop it, and each such server would live on, holding a port and a few hundred MB. So the
CLI starts a watchdog process: while the CLI lives it notes the CLI's server children, and once
the CLI is gone it terminates those still running. When the CLI ends normally, Prefect has
stopped the server already and the watchdog just exits.

Linux only (it reads /proc); elsewhere no watchdog is started.

    python -m inmap.watchdog PID    # what `start` runs
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SERVER_MARKER = b"prefect.server.api.server:create_app"  # in the uvicorn command line Prefect runs
POLL_SECONDS = 1.0


def start() -> subprocess.Popen | None:
    """A watchdog for this process, or None where there is no /proc."""
    if not os.path.isdir("/proc/self/task"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "inmap.watchdog", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the CLI's process group does not stop it
    )


def watch(parent: int, poll: float = POLL_SECONDS) -> list[int]:
    """Wait for `parent` to end, then terminate its server children; the pids terminated."""
    started = _start_time(parent)
    servers: dict[int, int | None] = {}
    while started is not None and _start_time(parent) == started and not _is_zombie(parent):
        for pid in _children(parent):
            if pid not in servers and SERVER_MARKER in _cmdline(pid):
                servers[pid] = _start_time(pid)
        time.sleep(poll)
    stopped = []
    for pid, pid_started in servers.items():
        if _start_time(pid) == pid_started and SERVER_MARKER in _cmdline(pid):
            _terminate(pid)
            stopped.append(pid)
    return stopped


def _terminate(pid: int, grace: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _start_time(pid) is not None:
            if _is_zombie(pid):
                return
            time.sleep(0.1)
        if _start_time(pid) is not None:
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


def _is_zombie(pid: int) -> bool:
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def _children(parent: int) -> list[int]:
    children = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields and fields[1] == str(parent):
                children.append(int(name))
    return children


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


if __name__ == "__main__":
    watch(int(sys.argv[1]))
