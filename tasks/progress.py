"""Progress of a task: to the process's listeners (the command line's display) and to a Prefect
progress artifact, so the UI shows how far a long shard or fit has got."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from inmap import progress

ARTIFACT_SECONDS = 3.0  # at most one artifact update per task this often


def artifact_key(stage: str, piece: str) -> str:
    """A key `prefect artifact ls` lists: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"inmap-{stage}-{piece}".lower())[:100].strip("-")


@contextmanager
def stage_progress(stage: str, piece: str, what: str) -> Iterator[Callable[[int, int], None]]:
    """A `(done, total)` callback for one task: `what` is the artifact's description."""
    state: dict = {"artifact": None, "updated": 0.0}

    def to_artifact(_stage: str, _piece: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - state["updated"] < ARTIFACT_SECONDS:
            return
        state["updated"] = now
        percent = 100.0 * done / max(total, 1)
        text = f"{what}: {done}/{total}"
        try:
            if state["artifact"] is None:
                state["artifact"] = create_progress_artifact(
                    percent, key=artifact_key(stage, piece), description=text
                )
            else:
                update_progress_artifact(state["artifact"], percent, description=text)
        except Exception:  # progress is a courtesy; it never fails a task
            state["updated"] = now + 60

    yield progress.reporter(stage, piece, to_artifact)
