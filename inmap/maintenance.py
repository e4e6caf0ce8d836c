"""`inmap maintain`: keep an output's tables fast as runs add small files.

Each Delta table is compacted (small files rewritten into fewer large ones, in one transaction
that readers see atomically), checkpointed, and vacuumed: files that no longer belong to the
current version and are older than the retention are deleted. A reader of the current version, or
of any version within the retention, never loses a file. Temporary files that crashed writers
left behind are removed too.

After a crash: files that no commit recorded are removed once older than the retention, and a run
that died holding the output's lease is recorded as interrupted by the run that takes it over.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone

from inmap import layout, storage, tables

logger = logging.getLogger(__name__)
DEFAULT_RETENTION_HOURS = 168.0


def output_tables(output: str, storage_options: dict | None = None) -> list[str]:
    """The Delta tables under `output`: predictions, errors, runs and every embedding index."""
    urls = [layout.predictions_dir(output), layout.errors_dir(output), layout.runs_dir(output)]
    fs, path = storage.url_to_fs(layout.embeddings_root(output), storage_options)
    try:
        models = [
            entry["name"] for entry in fs.ls(path, detail=True) if entry["type"] == "directory"
        ]
    except FileNotFoundError:
        models = []
    root = layout.embeddings_root(output)
    urls += [layout.index_uri_in(storage.join(root, storage.basename(m))) for m in models]
    return urls


def maintain(
    output: str,
    storage_options: dict | None = None,
    *,
    retention_hours: float = DEFAULT_RETENTION_HOURS,
) -> list[str]:
    """Compact, checkpoint and vacuum every table under `output`; one report line per table,
    counting the files this call removed (gone now, there before it)."""
    report = []
    for url in output_tables(output, storage_options):
        present = _data_files(url, storage_options)
        outcome = tables.compact(url, storage_options, retention_hours=retention_hours)
        if outcome is None:
            continue
        unrecorded = remove_unrecorded_files(url, storage_options, retention_hours=retention_hours)
        removed = len(present - _data_files(url, storage_options))
        report.append(
            f"{url}: {outcome['files_before']} -> {outcome['files_after']} files, "
            f"{removed} file(s) removed ({unrecorded} that no commit recorded)"
        )
    removed = storage.sweep_temporary_files(output)
    if removed:
        report.append(f"{output}: removed {len(removed)} temporary file(s) older than an hour")
    return report or [f"{output}: no tables yet"]


def record_interrupted_run(
    output: str, previous, taken_over_by: str, storage_options: dict | None = None
) -> None:
    """Record in the runs table, as "interrupted", a run that died holding the output's lease
    (`previous`, the `inmap.lease.LeaseRecord` its successor found expired): it never recorded
    itself. Once per run id, as a run records itself, so a run that did record itself keeps its
    own row."""
    import pyarrow as pa

    from inmap.schemas import RUNS_SCHEMA

    last_renewed = datetime.fromtimestamp(previous.expires, timezone.utc)
    row = {name: None for name in RUNS_SCHEMA.names}
    row.update(
        run_id=previous.run_id,
        status="interrupted",
        started_at=datetime.fromtimestamp(previous.started, timezone.utc),
        finished_at=last_renewed,
        error=(
            f"interrupted: its process (host {previous.host}, pid {previous.pid}) stopped "
            f"renewing the lease on {output}, which expired at {last_renewed:%Y-%m-%d %H:%M:%S} "
            f"UTC; run {taken_over_by} took it over"
        ),
    )
    tables.append(
        layout.runs_dir(output),
        pa.Table.from_pylist([row], schema=RUNS_SCHEMA),
        storage_options,
        app_id=f"inmap-run-{previous.run_id}",
    )


def remove_unrecorded_files(
    url: str, storage_options: dict | None = None, *, retention_hours: float
) -> int:
    """Delete the data files under a table that no commit ever recorded (a writer that lost its
    commit race, or died before committing) once they are older than the retention, so that a
    writer still about to commit keeps its files: delta-rs's full vacuum. Returns how many it
    removed."""
    table = tables.open_table(url, storage_options)
    if table is None:
        return 0
    before = _data_files(url, storage_options)
    tables._retrying(
        url,
        "vacuum",
        lambda: table.vacuum(
            retention_hours=math.ceil(retention_hours),  # never less than asked
            dry_run=False,
            enforce_retention_duration=False,
            full=True,
        ),
    )
    # The ordinary vacuum (tables.compact) ran first, so what this one removes was unrecorded.
    return len(before - _data_files(url, storage_options))


def _data_files(url: str, storage_options: dict | None) -> set[str]:
    """The table's data files, as URLs: every file under it outside `_delta_log`."""
    fs, path = storage.url_to_fs(url, storage_options)
    fs.invalidate_cache(path)
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return set()
    root = path.rstrip("/") + "/"
    relative = [name[len(root) :] if name.startswith(root) else name for name in found]
    return {storage.join(url, name) for name in relative if not name.startswith("_delta_log")}
