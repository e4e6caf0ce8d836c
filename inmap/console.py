"""The command line's view of a run: one live progress display (rich) with a line per stage, or
plain log lines when the output is not a terminal.

Input mistakes, a busy output and unreadable images read as one line: while the run goes, their
tracebacks are kept out of the console (they still reach the run's logs in Prefect), and the
caller prints the message.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from inmap import progress
from inmap.errors import SAYS_IT_ALL

STAGES = {  # stage -> (line shown, unit)
    "list": ("listed", "images"),
    "embed": ("embedded", "images"),
    "learn": ("learning", "steps"),
    "predict": ("predicted", "images"),
}


def run_with_console(flow: Callable, parameters: dict, *, live: bool = True, verbose: bool = False):
    """Call `flow(**parameters)` with a live display when stderr is a terminal. Unless
    `verbose`, Prefect's own INFO lines stay in the run's logs and out of the console (to the
    end of the process: the server's shutdown lines too)."""
    hidden = _ExpectedErrorTracebacks()
    handlers = _console_handlers()
    for handler in handlers:
        handler.addFilter(hidden)
        if not verbose:
            handler.addFilter(_quiet_prefect)
    try:
        if live and sys.stderr.isatty():
            with _LiveDisplay() as display:
                unsubscribe = progress.subscribe(display.report)
                try:
                    return flow(**parameters)
                finally:
                    unsubscribe()
        return flow(**parameters)
    finally:
        for handler in handlers:
            handler.removeFilter(hidden)


class _LiveDisplay:
    """A rich Progress with one task per stage; pieces (shards) of a stage are summed."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            redirect_stderr=True,
            redirect_stdout=True,
            transient=False,
        )
        self.tasks: dict[str, int] = {}
        self.pieces: dict[str, dict[str, tuple[int, int]]] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> _LiveDisplay:
        self.progress.start()
        # Prefect's console handler prints through a rich Console of its own, which would write
        # over the bars; send its lines through the display's console, above the bars.
        self.swapped = []
        for handler in _console_handlers():
            if hasattr(handler, "console"):
                self.swapped.append((handler, handler.console))
                handler.console = _AboveBars(handler.console, self.progress.console)
        return self

    def __exit__(self, *exc) -> None:
        for handler, console in self.swapped:
            handler.console = console
        self.progress.stop()

    def report(self, stage: str, piece: str, done: int, total: int) -> None:
        label, unit = STAGES.get(stage, (stage, ""))
        with self.lock:
            pieces = self.pieces.setdefault(stage, {})
            pieces[piece] = (done, total)
            announced = pieces.get(progress.WHOLE_STAGE)
            done_sum = sum(d for p, (d, _) in pieces.items() if p != progress.WHOLE_STAGE)
            total_sum = announced[1] if announced else sum(t for _, t in pieces.values())
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(label, total=total_sum, unit=unit,
                                                           rate="")  # fmt: skip
            task_id = self.tasks[stage]
            self.progress.update(task_id, completed=done_sum, total=max(total_sum, done_sum))
            speed = self.progress.tasks[task_id].speed
            rate = f"{speed:.1f} {unit}/s" if speed else ""
            self.progress.update(task_id, rate=rate)


class _AboveBars:
    """Stands in for a log handler's rich Console: renders each line as that console would (its
    markup setting, highlighter and theme — Prefect's has markup off, so a name such as
    `src [a]` prints as it is) and prints it through the live display's console, above the bars."""

    def __init__(self, own, display) -> None:
        self.own, self.display = own, display

    def print(self, message, **kwargs) -> None:
        from rich.text import Text

        if isinstance(message, str):
            text = self.own.render_str(message)
            resolved = Text(text.plain, end=text.end)
            for span in text.spans:  # style names resolved by the theme they were written for
                resolved.stylize(self.own.get_style(span.style, default=""), span.start, span.end)
            message = resolved
        self.display.print(message, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.own, name)


class _ExpectedErrorTracebacks(logging.Filter):
    """Drops the engine's records of an input mistake (its traceback, its "Finished in state
    Failed" line) from the console; the run's API logs keep them. The CLI prints the one line."""

    def __init__(self) -> None:
        super().__init__()
        self.names = {cls.__name__ for kind in SAYS_IT_ALL for cls in _subclasses(kind)}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        while error is not None:
            if isinstance(error, SAYS_IT_ALL):
                return False
            error = error.__cause__ or error.__context__
        message = record.getMessage()
        return not ("Failed(" in message and any(name in message for name in self.names))


def _quiet_prefect(record: logging.LogRecord) -> bool:
    """Prefect's INFO lines (run started, task finished, server started) are for the run logs;
    inmap's own lines and every warning stay."""
    return record.levelno >= logging.WARNING or not record.name.startswith("prefect")


def _subclasses(cls: type) -> set[type]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


def _console_handlers() -> list[logging.Handler]:
    """The handlers that print Prefect's and inmap's logs to the terminal (Prefect's console
    handler on the root logger, set up when Prefect was imported), not the API's."""
    return [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler)
    ]
