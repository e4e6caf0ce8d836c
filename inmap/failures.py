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


def known_failures(job: Job) -> pa.Table:
    """(uri, etag, stage) of every recorded failure: planning skips "decode" ones until the
    object changes, and clears "read" ones once the image has been read."""
    columns = ["uri", "etag", "stage"]
    errors = tables.read(layout.errors_dir(job.output), job.options, columns=columns)
    if errors is None:
        return ERRORS_SCHEMA.empty_table().select(columns)
    return errors


def decode_failures(failures: pa.Table) -> pa.Table:
    """(uri, etag) of images whose bytes did not decode: not retried until the object changes."""
    return failures.filter(pc.equal(failures["stage"], "decode")).select(["uri", "etag"])


def resolve(uris: Sequence[str], job: Job) -> None:
    """Remove the "read" failures of images that have now been read and embedded."""
    if not uris:
        return
    quoted = ", ".join("'" + uri.replace("'", "''") + "'" for uri in uris)
    tables.delete_where(
        layout.errors_dir(job.output), f"stage = 'read' AND uri IN ({quoted})", job.options
    )
