"""The errors table: every image that could not be listed, read or decoded, with a reason.

One Delta table under `OUT/errors`, one row per (uri, etag, stage), the latest reason kept.
Stages: "decode" (the bytes are not an image: skipped until the object changes), "missing" (gone
between listing and reading), "list" (a broken or looping symbolic link) and "read" (still
unreadable after retrying: its partition committed nothing, and a later run tries again).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from inmap import layout, tables
from inmap.job import Job
from inmap.schemas import ERRORS_SCHEMA

KEYS = ("uri", "etag", "stage")


def record(failures: Sequence[tuple[str, str, object]], job: Job) -> None:
    """Upsert error rows for (uri, etag, failure) triples; failures have `stage` and `reason`."""
    if not failures:
        return
    now = datetime.now(timezone.utc)
    rows = pa.table(
        {
            "uri": [uri for uri, _, _ in failures],
            "etag": [etag for _, etag, _ in failures],
            "stage": [failure.stage for _, _, failure in failures],
            "error": [failure.reason for _, _, failure in failures],
            "run_id": [job.run_id] * len(failures),
            "recorded_at": [now] * len(failures),
        },
        schema=ERRORS_SCHEMA,
    )
    tables.upsert(layout.errors_dir(job.output), rows, KEYS, job.options)


def record_listing_problems(problems: pa.Table, job: Job) -> None:
    """Entries the listing found named like images that cannot be read (broken links)."""
    from inmap.batches import Failure

    record(
        [(uri, "", Failure("list", error)) for uri, error in
         zip(problems["uri"].to_pylist(), problems["error"].to_pylist(), strict=True)],
        job,
    )  # fmt: skip


def known_decode_failures(job: Job) -> pa.Table:
    """(uri, etag) of images whose bytes did not decode: not retried until the object changes."""
    errors = tables.read(
        layout.errors_dir(job.output), job.options, columns=["uri", "etag", "stage"]
    )
    if errors is None:
        return pa.table({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string())})
    return errors.filter(pc.equal(errors["stage"], "decode")).select(["uri", "etag"])
