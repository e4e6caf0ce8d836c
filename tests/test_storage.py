"""Storage: listing, atomic writes and error messages on local disk, memory:// and a real S3 API.

S3 is moto's ThreadedMotoServer on 127.0.0.1 spoken to by s3fs over HTTP, as s3fs's own tests do.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
import uuid

import pyarrow as pa
import pytest

from inmap import storage
from inmap.schemas import MANIFEST_SCHEMA
from inmap.storage import StorageError


@pytest.fixture
def s3_root(s3_bucket) -> str:
    """s3://<a fresh, empty bucket> on conftest's moto server."""
    return f"s3://{s3_bucket}"


def _touch(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_local_listing_is_recursive_sorted_and_filters_extensions_case_insensitively(tmp_path):
    for name in [
        "b.JPG",
        "a/c.jpeg",
        "a/deep/d.Png",
        "e.webp",
        "f.BMP",
        "g.gif",
        "h.tif",
        "i.TIFF",
    ]:
        _touch(tmp_path / name)
    for name in ["notes.txt", "a/meta.json", "jpg", "a/.jpg.swp", "archive.jpg.zip"]:
        _touch(tmp_path / name)

    manifest = storage.list_images(str(tmp_path))

    assert manifest.schema.equals(MANIFEST_SCHEMA)
    expected = sorted(
        str(tmp_path / name)
        for name in ["b.JPG", "a/c.jpeg", "a/deep/d.Png", "e.webp", "f.BMP", "g.gif", "h.tif"]
        + ["i.TIFF"]
    )
    assert manifest.column("uri").to_pylist() == expected
    assert manifest.column("size").to_pylist() == [1] * len(expected)


def test_local_etag_is_size_and_mtime_and_changes_when_the_file_changes(tmp_path):
    image = tmp_path / "a.jpg"
    _touch(image, b"12345")
    os.utime(image, (1_700_000_000, 1_700_000_000))
    first = storage.list_images(str(tmp_path)).column("etag")[0].as_py()
    assert first == "5-1700000000.000000"

    _touch(image, b"123456")
    os.utime(image, (1_700_000_100, 1_700_000_100))
    assert storage.list_images(str(tmp_path)).column("etag")[0].as_py() != first


@pytest.mark.parametrize("make_source", ["missing", "empty", "no-images"])
def test_missing_or_empty_local_source_gives_empty_manifest(tmp_path, make_source):
    source = tmp_path / "drop"
    if make_source != "missing":
        source.mkdir()
    if make_source == "no-images":
        _touch(source / "readme.txt")

    manifest = storage.list_images(str(source))

    assert manifest.num_rows == 0
    assert manifest.schema.equals(MANIFEST_SCHEMA)


def test_memory_listing_keeps_the_scheme_in_uris():
    root = f"memory://inmap-test-{uuid.uuid4().hex}"
    storage.write_bytes_atomic(b"abc", f"{root}/x/1.jpg")
    storage.write_bytes_atomic(b"abc", f"{root}/x/2.txt")

    manifest = storage.list_images(root)

    assert manifest.column("uri").to_pylist() == [f"{root}/x/1.jpg"]
    assert storage.read_bytes(manifest.column("uri")[0].as_py()) == b"abc"


def test_s3_listing_is_recursive_keeps_scheme_and_records_the_etag(s3_root, s3_storage_options):
    storage.write_bytes_atomic(b"one", f"{s3_root}/drop/a.JPEG", s3_storage_options)
    storage.write_bytes_atomic(b"two!", f"{s3_root}/drop/sub/b.png", s3_storage_options)
    storage.write_bytes_atomic(b"no", f"{s3_root}/drop/sub/c.csv", s3_storage_options)
    storage.write_bytes_atomic(b"out", f"{s3_root}/other/d.jpg", s3_storage_options)

    manifest = storage.list_images(f"{s3_root}/drop", s3_storage_options)

    assert manifest.column("uri").to_pylist() == [
        f"{s3_root}/drop/a.JPEG",
        f"{s3_root}/drop/sub/b.png",
    ]
    # S3's ETag of a single-part upload is the MD5 of the bytes.
    assert manifest.column("etag").to_pylist() == [
        _md5(b"one"),
        _md5(b"two!"),
    ]
    assert manifest.column("size").to_pylist() == [3, 4]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_s3_missing_prefix_or_bucket_gives_empty_manifest(s3_root, s3_storage_options):
    options = s3_storage_options
    assert storage.list_images(f"{s3_root}/nothing-here", options).num_rows == 0
    assert (
        storage.list_images(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", options).num_rows == 0
    )


def test_s3_listing_sees_objects_added_after_an_earlier_listing(s3_root, s3_storage_options):
    options = s3_storage_options
    storage.write_bytes_atomic(b"1", f"{s3_root}/drop/a.jpg", options)
    assert storage.list_images(f"{s3_root}/drop", options).num_rows == 1

    # Written behind inmap's back, as a new drop would be.
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True, **options).pipe(f"{s3_root}/drop/b.jpg", b"2")

    assert storage.list_images(f"{s3_root}/drop", options).num_rows == 2


def test_s3_wrong_credentials_raise_storage_error_naming_url_with_advice(s3_root, moto_endpoint):
    # moto accepts any key until authentication is switched on for the server.
    _set_moto_auth(moto_endpoint, "0")
    try:
        bad = {"key": "AKIAWRONG", "secret": "wrong", "endpoint_url": moto_endpoint}
        with pytest.raises(StorageError) as listed:
            storage.list_images(f"{s3_root}/drop", bad)
        with pytest.raises(StorageError) as written:
            storage.write_bytes_atomic(b"x", f"{s3_root}/out/x.parquet", bad)
    finally:
        _set_moto_auth(moto_endpoint, "inf")
    assert f"{s3_root}/drop" in str(listed.value)
    assert "AWS_ACCESS_KEY_ID" in str(listed.value)
    assert f"{s3_root}/out/x.parquet" in str(written.value)
    assert "credentials" in str(written.value)


def _set_moto_auth(endpoint_url: str, no_auth_action_count: str) -> None:
    request = urllib.request.Request(
        f"{endpoint_url}/moto-api/reset-auth",
        data=no_auth_action_count.encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    urllib.request.urlopen(request).read()


def test_s3_credentials_and_endpoint_come_from_aws_env_vars(
    s3_root, s3_storage_options, moto_endpoint, monkeypatch
):
    import s3fs

    storage.write_bytes_atomic(b"1", f"{s3_root}/a.jpg", s3_storage_options)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # an option-less instance may predate the env vars

    manifest = storage.list_images(s3_root)

    assert manifest.column("uri").to_pylist() == [f"{s3_root}/a.jpg"]
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_endpoint_can_be_given_through_client_kwargs(s3_root, s3_storage_options, moto_endpoint):
    storage.write_bytes_atomic(b"1", f"{s3_root}/a.jpg", s3_storage_options)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": moto_endpoint},
    }
    assert storage.list_images(s3_root, options).num_rows == 1


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
    both = storage.read_table([url_1, url_2], storage_options=options)
    assert both.column("uri").to_pylist() == ["a", "b", "c"]
    assert both.schema.metadata == {b"model": b"m"}
    assert storage.read_table(url_2, columns=["n"], storage_options=options).column_names == ["n"]


def test_exists_sees_an_object_written_after_a_cached_listing(output_root):
    root, options = output_root
    url = storage.join(root, "marker.json")
    assert not storage.exists(url, options)
    storage.list_images(root, options)  # fills s3fs's listing cache for the prefix

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


def test_glob_move_and_delete_keep_the_url_form(output_root):
    root, options = output_root
    for name in ["a.parquet", "b.parquet", "c.json"]:
        storage.write_bytes_atomic(name.encode(), storage.join(root, "stage", name), options)

    staged = storage.glob(storage.join(root, "stage", "*.parquet"), options)
    assert staged == [
        storage.join(root, "stage", "a.parquet"),
        storage.join(root, "stage", "b.parquet"),
    ]

    storage.move(staged[0], storage.join(root, "final", "run1", "a.parquet"), options)
    storage.delete(staged[1], options)
    storage.delete(staged[1], options)  # already gone: fine

    assert storage.glob(storage.join(root, "*", "*", "*.parquet"), options) == [
        storage.join(root, "final", "run1", "a.parquet")
    ]
    assert storage.read_bytes(storage.join(root, "final/run1/a.parquet"), options) == b"a.parquet"
    assert storage.glob(storage.join(root, "stage", "*.parquet"), options) == []
    assert storage.glob(storage.join(root, "nowhere", "*.parquet"), options) == []


def test_reading_a_missing_object_raises_storage_error_naming_it(tmp_path):
    url = str(tmp_path / "nope.parquet")
    with pytest.raises(StorageError, match="nope.parquet"):
        storage.read_table(url)
