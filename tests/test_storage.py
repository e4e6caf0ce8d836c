"""Storage: atomic writes, retried reads and error messages on local disk, memory:// and a real
S3 API.

S3 is moto's ThreadedMotoServer on 127.0.0.1 spoken to by s3fs over HTTP, as s3fs's own tests do.
"""

from __future__ import annotations

import os
import time
import uuid

import pyarrow as pa
import pytest

from inmap import storage
from inmap.storage import StorageError
from tests.conftest import touch as _touch


@pytest.fixture(params=["local", "memory", "s3"])
def output_root(request, tmp_path) -> tuple[str, dict | None]:
    if request.param == "local":
        return str(tmp_path / "out"), None
    if request.param == "memory":
        return f"memory://inmap-test-{uuid.uuid4().hex}/out", None
    root = request.getfixturevalue("s3_root")
    return f"{root}/out", request.getfixturevalue("s3_storage_options")


def test_parquet_written_atomically_reads_back_with_metadata(output_root):
    root, options = output_root
    schema = pa.schema([("uri", pa.string()), ("n", pa.int64())], metadata={"model": "m"})
    first = pa.table({"uri": ["a", "b"], "n": [1, 2]}, schema=schema)
    second = pa.table({"uri": ["c"], "n": [3]}, schema=schema)
    url_1, url_2 = storage.join(root, "shards", "1.parquet"), storage.join(root, "shards/2.parquet")

    storage.write_parquet_atomic(first, url_1, options)
    storage.write_parquet_atomic(second, url_2, options)

    assert storage.exists(url_1, options)
    first_back = storage.read_parquet(url_1, storage_options=options)
    assert first_back.column("uri").to_pylist() == ["a", "b"]
    assert first_back.schema.metadata == {b"model": b"m"}
    assert storage.read_parquet(url_2, ["n"], options).column_names == ["n"]
    assert storage.parquet_rows(url_1, options) == 2
    assert storage.list_files(storage.join(root, "shards"), options) == {
        url_1: storage.size(url_1, options),
        url_2: storage.size(url_2, options),
    }


def test_exists_sees_an_object_written_after_a_cached_listing(output_root):
    root, options = output_root
    url = storage.join(root, "marker.json")
    assert not storage.exists(url, options)
    storage.list_files(root, options)  # fills s3fs's listing cache for the prefix

    storage.write_bytes_atomic(b"{}", url, options)

    assert storage.exists(url, options)


def test_local_write_replaces_the_old_file_and_leaves_no_temporary_files(tmp_path):
    url = str(tmp_path / "out" / "x.bin")
    storage.write_bytes_atomic(b"old", url)
    storage.write_bytes_atomic(b"new", url)

    assert (tmp_path / "out" / "x.bin").read_bytes() == b"new"
    assert os.listdir(tmp_path / "out") == ["x.bin"]


def test_interrupted_local_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    url = str(tmp_path / "x.bin")
    storage.write_bytes_atomic(b"old", url)

    def fail_rename(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", fail_rename)
    with pytest.raises(StorageError, match="x.bin"):
        storage.write_bytes_atomic(b"new", url)

    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_unwritable_local_output_raises_storage_error_naming_it(tmp_path):
    _touch(tmp_path / "a-file")  # a file where the output directory should be
    url = str(tmp_path / "a-file" / "out" / "x.parquet")

    with pytest.raises(StorageError) as error:
        storage.write_parquet_atomic(pa.table({"a": [1]}), url)

    assert url in str(error.value) and "writable" in str(error.value)


def test_s3_write_to_missing_bucket_raises_storage_error_naming_it(s3_storage_options):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out/x.parquet"

    with pytest.raises(StorageError) as error:
        storage.write_bytes_atomic(b"x", url, s3_storage_options)

    assert url in str(error.value)


def test_read_bytes_many_keeps_input_order_and_reports_missing_objects(s3_root, s3_storage_options):
    options = s3_storage_options
    uris = [f"{s3_root}/img/{i:03d}.jpg" for i in range(40)]
    for i, uri in enumerate(uris):
        if i != 7:
            storage.write_bytes_atomic(f"image {i}".encode(), uri, options)

    results = list(storage.read_bytes_many(uris, options, max_workers=4))

    assert [uri for uri, _ in results] == uris
    assert isinstance(results[7][1], StorageError) and uris[7] in str(results[7][1])
    assert results[8][1] == b"image 8"
    assert sum(isinstance(data, bytes) for _, data in results) == 39


def test_read_bytes_many_reads_concurrently(monkeypatch):
    def slow_read(fs, path, uri):
        time.sleep(0.05)  # an object store's latency
        return uri.encode()

    monkeypatch.setattr(storage, "_read_from", slow_read)
    begin = time.perf_counter()
    results = list(storage.read_bytes_many([f"u{i}" for i in range(32)], max_workers=16))

    assert [data for _, data in results] == [f"u{i}".encode() for i in range(32)]
    assert time.perf_counter() - begin < 0.05 * 32 / 4  # serial would take 1.6 s


def test_join_builds_urls_with_single_slashes():
    assert (
        storage.join("s3://bucket/out/", "/shards/", "1.parquet")
        == "s3://bucket/out/shards/1.parquet"
    )
    assert storage.join("/tmp/out", "x") == "/tmp/out/x"
    assert storage.join("memory://root", "", "a/b") == "memory://root/a/b"


def test_delete_and_move_aside_keep_the_url_form(output_root):
    root, options = output_root
    for name in ["a.parquet", "b.parquet"]:
        storage.write_bytes_atomic(name.encode(), storage.join(root, "stage", name), options)
    url_a, url_b = (
        storage.join(root, "stage", "a.parquet"),
        storage.join(root, "stage", "b.parquet"),
    )

    moved = storage.move_aside(url_a, options)
    storage.delete(url_b, options)
    storage.delete(url_b, options)  # already gone: fine

    assert moved.startswith(url_a + ".broken-")
    assert list(storage.list_files(storage.join(root, "stage"), options)) == [moved]
    assert storage.read_bytes(moved, options) == b"a.parquet"


def test_reading_a_missing_object_raises_storage_error_naming_it(tmp_path):
    url = str(tmp_path / "nope.parquet")
    with pytest.raises(StorageError, match="nope.parquet"):
        storage.read_parquet(url)


@pytest.mark.parametrize("content", [b"", b"PAR1 but not really", b"hello"])
def test_an_empty_or_torn_parquet_file_is_a_corrupt_file_error(tmp_path, content):
    path = tmp_path / "shard.parquet"
    path.write_bytes(content)
    with pytest.raises(storage.CorruptFileError, match="shard.parquet"):
        storage.parquet_rows(str(path))


def test_a_local_read_refused_for_permissions_advises_read_access(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self, path, *args, **kwargs):  # what a chmod 000 file gives a non-root user
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(LocalFileSystem, "cat_file", refuse)
    with pytest.raises(StorageError, match="may read it") as error:
        storage.read_bytes(str(tmp_path / "secret.jpg"))
    assert "write" not in str(error.value)


def test_transient_read_failures_are_retried_until_they_pass(monkeypatch):
    calls = []

    def flaky(fs, path, uri):
        calls.append(uri)
        if len(calls) < 3:
            raise storage.TransientStorageError(f"cannot read {uri}: 503 SlowDown")
        return b"ok"

    monkeypatch.setattr(storage, "_read_from", flaky)
    [(uri, data)] = list(storage.read_bytes_many(["memory://x/a.jpg"], retry_seconds=30))

    assert data == b"ok" and len(calls) == 3


def test_a_read_still_failing_after_the_window_is_returned_not_raised(monkeypatch):
    def down(fs, path, uri):
        raise storage.TransientStorageError(f"cannot read {uri}: connection reset")

    monkeypatch.setattr(storage, "_read_from", down)
    [(uri, error)] = list(storage.read_bytes_many(["memory://x/a.jpg"], retry_seconds=1.0))

    assert isinstance(error, storage.TransientStorageError)


def test_s3_keys_with_a_question_mark_are_read_as_keys(s3_root, s3_storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    bucket = s3_root.removeprefix("s3://")
    put = {"photo?versionId=1.jpg": b"the photo", "photo": b"WRONG OBJECT", "a?b.jpg": b"ab"}
    for key, data in put.items():
        from fsspec.asyn import sync

        sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data)

    assert storage.read_bytes(f"{s3_root}/photo?versionId=1.jpg", s3_storage_options) == (
        b"the photo"
    )
    assert storage.read_bytes(f"{s3_root}/a?b.jpg", s3_storage_options) == b"ab"


def test_conditional_create_lets_exactly_one_writer_win(output_root):
    root, options = output_root
    url = storage.join(root, "lease", "1.json")

    assert storage.create_exclusive(b"first", url, options)
    assert not storage.create_exclusive(b"second", url, options)
    assert storage.read_bytes(url, options) == b"first"


def test_old_temporary_files_are_swept_and_fresh_ones_kept(tmp_path):
    old = tmp_path / "a" / f".x.parquet.1234{storage.TEMPORARY_SUFFIX}"
    fresh = tmp_path / f".y.parquet.5678{storage.TEMPORARY_SUFFIX}"
    _touch(old)
    _touch(fresh)
    os.utime(old, (1_700_000_000, 1_700_000_000))

    removed = storage.sweep_temporary_files(str(tmp_path))

    assert removed == [str(old)]
    assert fresh.exists()
