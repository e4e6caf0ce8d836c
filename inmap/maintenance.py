"""`inmap maintain`: keep an output's tables fast as runs add small files.

Each Delta table is compacted (small files rewritten into fewer large ones, in one transaction
that readers see atomically), checkpointed, and vacuumed: files that no longer belong to the
current version and are older than the retention are deleted. A reader of the current version, or
of any version within the retention, never loses a file. Temporary files that crashed writers
left behind are removed too.
"""

from __future__ import annotations

import logging

from inmap import layout, storage, tables

logger = logging.getLogger(__name__)
DEFAULT_RETENTION_HOURS = 168.0


def output_tables(output: str, storage_options: dict | None = None) -> list[str]:
    """The Delta tables under `output`: predictions, errors, runs and every embedding index."""
    urls = [layout.predictions_dir(output), layout.errors_dir(output), layout.runs_dir(output)]
    fs, path = storage.url_to_fs(storage.join(output, "embeddings"), storage_options)
    try:
        models = [
            entry["name"] for entry in fs.ls(path, detail=True) if entry["type"] == "directory"
        ]
    except FileNotFoundError:
        models = []
    urls += [storage.join(output, "embeddings", storage.basename(m), "_index") for m in models]
    return urls


def maintain(
    output: str,
    storage_options: dict | None = None,
    *,
    retention_hours: float = DEFAULT_RETENTION_HOURS,
) -> list[str]:
    """Compact, checkpoint and vacuum every table under `output`; one report line per table."""
    report = []
    for url in output_tables(output, storage_options):
        outcome = tables.compact(url, storage_options, retention_hours=retention_hours)
        if outcome is not None:
            report.append(
                f"{url}: {outcome['files_before']} -> {outcome['files_after']} files, "
                f"{outcome['vacuumed']} unreferenced file(s) removed"
            )
    removed = storage.sweep_temporary_files(output)
    if removed:
        report.append(f"{output}: removed {len(removed)} temporary file(s) older than an hour")
    return report or [f"{output}: no tables yet"]
