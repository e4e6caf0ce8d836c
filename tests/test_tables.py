"""Delta tables: one transaction per commit, no duplicates with retries or racing writers, readers
see committed rows only, odd local paths, and maintenance that never breaks a reader."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from inmap import tables
from inmap.errors import OutputPathError

KEYS = ("labelset", "uri", "etag")
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("label", pa.string()),
        ("at", pa.timestamp("us", tz="UTC")),
        ("labelset", pa.string()),
    ]
)


def rows(start: int, stop: int, label: str = "cat", labelset: str = "ls") -> pa.Table:
    n = stop - start
    return pa.table(
        {
            "uri": [f"s3://b/{i:05d}.jpg" for i in range(start, stop)],
            "etag": ["e"] * n,
            "label": [label] * n,
            "at": [datetime.now(timezone.utc)] * n,
            "labelset": [labelset] * n,
        },
        schema=SCHEMA,
    )


def insert(url, table, app_id=None) -> int:
    return tables.insert_new(url, table, KEYS, app_id=app_id, partition_by=["labelset"])


def test_a_retried_commit_is_a_no_op(tmp_path):
    url = str(tmp_path / "t")
    assert insert(url, rows(0, 10), app_id="run-1") == 10
    version = DeltaTable(url).version()

    assert insert(url, rows(0, 10), app_id="run-1") == 0  # the same commit again
    assert DeltaTable(url).version() == version  # not even an empty commit
    assert tables.committed(url, "run-1") and not tables.committed(url, "run-2")


def test_only_rows_not_there_are_inserted(tmp_path):
    url = str(tmp_path / "t")
    insert(url, rows(0, 10), app_id="run-1")

    assert insert(url, rows(5, 15, label="dog"), app_id="run-2") == 5
    table = pl.read_delta(url)
    assert table.height == 15 and table["uri"].n_unique() == 15
    assert table.filter(pl.col("uri") == "s3://b/00005.jpg")["label"].to_list() == ["cat"]


def test_rows_repeated_in_one_commit_are_inserted_once_and_none_dropped(tmp_path):
    url = str(tmp_path / "t")
    repeated = pa.concat_tables([rows(0, 2), rows(0, 1), rows(2, 4), rows(1, 2)])  # 0 and 1 twice

    assert insert(url, repeated) == 4
    table = pl.read_delta(url)
    assert sorted(table["uri"].to_list()) == [f"s3://b/{i:05d}.jpg" for i in range(4)]


def test_racing_writers_never_duplicate_a_row(tmp_path):
    url = str(tmp_path / "t")
    errors = []

    def writer(number: int) -> None:
        try:
            insert(url, rows(number * 20, number * 20 + 60), app_id=f"writer-{number}")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    table = pl.read_delta(url)
    assert table.height == 120 and table["uri"].n_unique() == 120  # 0..119, each once


def test_uncommitted_files_are_invisible_and_committed_rows_visible(tmp_path):
    url = str(tmp_path / "t")
    insert(url, rows(0, 3), app_id="run-1")
    # What a writer killed between writing data and committing leaves: a Parquet file in the
    # table's folder that no commit names.
    partition = tmp_path / "t" / "labelset=ls"
    pq.write_table(rows(100, 200).drop(["labelset"]), partition / "part-orphan.parquet")

    assert pl.read_delta(url).height == 3
    assert len(DeltaTable(url).to_pandas()) == 3
    assert tables.read(url, columns=["uri"]).num_rows == 3

    insert(url, rows(100, 200), app_id="run-2")
    assert pl.read_delta(url).height == 103


def test_upsert_keeps_the_latest_row_per_key(tmp_path):
    url = str(tmp_path / "t")
    tables.upsert(url, rows(0, 2, label="old"), ("uri", "etag"))
    tables.upsert(url, rows(1, 3, label="new"), ("uri", "etag"))

    table = pl.read_delta(url).sort("uri")
    assert table["label"].to_list() == ["old", "new", "new"]


def test_reading_one_partition_reads_only_its_rows(tmp_path):
    url = str(tmp_path / "t")
    insert(url, rows(0, 4, labelset="a"))
    insert(url, rows(0, 2, labelset="b"))

    done = tables.read(url, columns=["uri", "etag"], partition=("labelset", "b"))
    assert done.column_names == ["uri", "etag"] and done.num_rows == 2
    assert tables.read(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("name", ["out[1] #x?", "in [a]", "ünï cødé", "50%", "a*b"])
def test_odd_local_paths_hold_tables(tmp_path, name):
    url = str(tmp_path / name / "predictions")
    tables.check_table_path(url)
    insert(url, rows(0, 5), app_id="run-1")
    assert insert(url, rows(0, 5), app_id="run-2") == 0

    assert (tmp_path / name / "predictions" / "_delta_log").is_dir()  # the literal folder
    assert len(DeltaTable(url).to_pandas()) == 5
    assert pl.read_delta(url, use_pyarrow=True).height == 5


@pytest.mark.parametrize("name", ["x%41y", "back\\slash"])
def test_local_paths_delta_would_misread_are_refused_before_any_work(tmp_path, name):
    with pytest.raises(OutputPathError, match="choose another output path"):
        tables.check_table_path(str(tmp_path / name))


def test_maintenance_compacts_and_never_breaks_the_current_version(tmp_path):
    url = str(tmp_path / "t")
    for start in range(0, 50, 5):
        insert(url, rows(start, start + 5), app_id=f"run-{start}")
    before = len(DeltaTable(url).file_uris())

    outcome = tables.compact(url, retention_hours=0)  # the harshest vacuum

    assert outcome["files_before"] == before == 10 and outcome["files_after"] == 1
    assert outcome["vacuumed"] == 10  # the small files, no longer part of the current version
    table = pl.read_delta(url)
    assert table.height == 50 and table["uri"].n_unique() == 50
    assert tables.compact(str(tmp_path / "nothing")) is None


def test_delta_options_follow_the_fsspec_options(monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    options = tables.delta_options(
        {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}}
    )
    assert options == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "eu-west-1",
    }
    # A profile is resolved to its keys, as s3fs would; delta-rs alone would ignore it.
    credentials = tmp_path / "credentials"
    credentials.write_text("[bench]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "bench")
    profiled = tables.delta_options({})
    assert profiled["AWS_ACCESS_KEY_ID"] == "AKIDPROFILE"
    assert "AWS_ENDPOINT_URL" not in profiled  # an empty endpoint makes delta-rs panic
