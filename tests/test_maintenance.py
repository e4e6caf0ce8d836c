"""`inmap maintain` removes what crashed or out-raced writers left, once it is older than the
retention, and reports only what it removed this time."""

from __future__ import annotations

import os
import shutil
import time

import pyarrow as pa

from inmap import layout, maintenance, tables
from inmap.schemas import ERRORS_SCHEMA


def error_rows(uri: str) -> pa.Table:
    row = {name: None for name in ERRORS_SCHEMA.names}
    row.update(uri=uri, etag="e", stage="decode", error="bad", run_id="r")
    return pa.Table.from_pylist([row], schema=ERRORS_SCHEMA)


def unrecorded_copy(table_dir, name: str, age_hours: float):
    """A data file no commit recorded: what a writer that lost its commit race leaves."""
    committed = next(p for p in table_dir.rglob("*.parquet") if "_delta_log" not in p.parts)
    orphan = committed.with_name(name)
    shutil.copy(committed, orphan)
    old = time.time() - age_hours * 3600
    os.utime(orphan, (old, old))
    return orphan


def test_files_no_commit_recorded_are_removed_once_older_than_the_retention(tmp_path):
    output = str(tmp_path / "out")
    url = layout.errors_dir(output)
    for number in range(3):
        tables.append(url, error_rows(f"/img/{number}.jpg"), app_id=None)
    table_dir = tmp_path / "out" / "errors"
    stale = unrecorded_copy(table_dir, "part-lost-race-old.parquet", age_hours=3)
    fresh = unrecorded_copy(table_dir, "part-lost-race-new.parquet", age_hours=0)

    first = maintenance.maintain(output, retention_hours=2)
    line = next(line for line in first if line.startswith(url))
    assert not stale.exists() and fresh.exists()  # a writer about to commit keeps its file
    assert "(1 that no commit recorded)" in line
    assert tables.read(url).num_rows == 3

    second = maintenance.maintain(output, retention_hours=2)
    again = next(line for line in second if line.startswith(url))
    assert "0 file(s) removed (0 that no commit recorded)" in again  # nothing repeated
    assert fresh.exists() and tables.read(url).num_rows == 3


def test_a_run_that_died_holding_the_lease_is_recorded_as_interrupted(tmp_path):
    from dataclasses import replace

    from inmap import lease, report, storage

    output = str(tmp_path / "out")
    dead = lease.acquire(output, "dead-run", wait=0)
    dead._stop.set()  # killed: it stops renewing and never releases
    dead._thread.join()
    expired = replace(dead.record, expires=time.time() - 1)
    storage.write_bytes_atomic(lease._encode(expired), dead.url)

    with lease.acquire(output, "next-run", wait=0) as successor:
        assert successor.previous is not None and successor.previous.run_id == "dead-run"
        maintenance.record_interrupted_run(output, successor.previous, "next-run")
        maintenance.record_interrupted_run(output, successor.previous, "next-run")  # once only
    runs = report.read_runs(output).to_pylist()
    assert [(r["run_id"], r["status"]) for r in runs] == [("dead-run", "interrupted")]
    assert f"pid {expired.pid}" in runs[0]["error"] and "next-run" in runs[0]["error"]
    # `inmap runs` shows the row: no counts, no source, the error.
    from inmap.results import recent_runs, runs_text

    shown = runs_text(recent_runs(output)).splitlines()
    assert shown[1].split()[2:] == ["interrupted", "-", "-", "-", "-", "-", "-", "-", "-", "-"]
    assert shown[2].strip().startswith("error: interrupted: its process")

    with lease.acquire(output, "after-a-clean-release", wait=0) as third:
        assert third.previous is None  # "next-run" released its lease: nothing died
