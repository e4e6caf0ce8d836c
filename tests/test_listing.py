"""Listing: recursive, streaming into Arrow page by page, never a glob; missing sources are
mistakes, empty prefixes are not."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import uuid

import fsspec
import pyarrow as pa
import pytest

from inmap import storage
from inmap.errors import SourceNotFoundError, StorageError
from inmap.listing import list_images as list_listing
from inmap.schemas import MANIFEST_SCHEMA
from tests.conftest import touch as _touch


def list_images(source, options=None, **kwargs) -> pa.Table:
    return list_listing(source, options, **kwargs).images


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

    manifest = list_images(str(tmp_path))

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
    first = list_images(str(tmp_path)).column("etag")[0].as_py()
    assert first == "5-1700000000.000000"

    _touch(image, b"123456")
    os.utime(image, (1_700_000_100, 1_700_000_100))
    assert list_images(str(tmp_path)).column("etag")[0].as_py() != first


@pytest.mark.parametrize("make_source", ["empty", "no-images"])
def test_empty_local_source_gives_empty_manifest(tmp_path, make_source):
    source = tmp_path / "drop"
    source.mkdir()
    if make_source == "no-images":
        _touch(source / "readme.txt")

    manifest = list_images(str(source))

    assert manifest.num_rows == 0
    assert manifest.schema.equals(MANIFEST_SCHEMA)


def test_missing_local_source_is_a_mistake_naming_it(tmp_path):
    with pytest.raises(SourceNotFoundError, match="drops-typo does not exist"):
        list_images(str(tmp_path / "drops-typo"))


def test_memory_listing_keeps_the_scheme_in_uris():
    root = f"memory://inmap-test-{uuid.uuid4().hex}"
    storage.write_bytes_atomic(b"abc", f"{root}/x/1.jpg")
    storage.write_bytes_atomic(b"abc", f"{root}/x/2.txt")

    manifest = list_images(root)

    assert manifest.column("uri").to_pylist() == [f"{root}/x/1.jpg"]
    assert storage.read_bytes(manifest.column("uri")[0].as_py()) == b"abc"


def test_s3_listing_is_recursive_keeps_scheme_and_records_the_etag(s3_root, s3_storage_options):
    storage.write_bytes_atomic(b"one", f"{s3_root}/drop/a.JPEG", s3_storage_options)
    storage.write_bytes_atomic(b"two!", f"{s3_root}/drop/sub/b.png", s3_storage_options)
    storage.write_bytes_atomic(b"no", f"{s3_root}/drop/sub/c.csv", s3_storage_options)
    storage.write_bytes_atomic(b"out", f"{s3_root}/other/d.jpg", s3_storage_options)

    manifest = list_images(f"{s3_root}/drop", s3_storage_options)

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


def test_s3_empty_prefix_is_empty_but_a_missing_bucket_is_a_mistake(s3_root, s3_storage_options):
    options = s3_storage_options
    assert list_images(f"{s3_root}/nothing-here", options).num_rows == 0
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(SourceNotFoundError, match=f"bucket '{bucket}' does not exist"):
        list_images(f"s3://{bucket}/x", options)


def test_s3_listing_sees_objects_added_after_an_earlier_listing(s3_root, s3_storage_options):
    options = s3_storage_options
    storage.write_bytes_atomic(b"1", f"{s3_root}/drop/a.jpg", options)
    assert list_images(f"{s3_root}/drop", options).num_rows == 1

    # Written behind inmap's back, as a new drop would be.
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True, **options).pipe(f"{s3_root}/drop/b.jpg", b"2")

    assert list_images(f"{s3_root}/drop", options).num_rows == 2


def test_s3_wrong_credentials_raise_storage_error_naming_url_with_advice(s3_root, moto_endpoint):
    # moto accepts any key until authentication is switched on for the server.
    _set_moto_auth(moto_endpoint, "0")
    try:
        bad = {"key": "AKIAWRONG", "secret": "wrong", "endpoint_url": moto_endpoint}
        with pytest.raises(StorageError) as listed:
            list_images(f"{s3_root}/drop", bad)
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

    manifest = list_images(s3_root)

    assert manifest.column("uri").to_pylist() == [f"{s3_root}/a.jpg"]
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_endpoint_can_be_given_through_client_kwargs(s3_root, s3_storage_options, moto_endpoint):
    storage.write_bytes_atomic(b"1", f"{s3_root}/a.jpg", s3_storage_options)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": moto_endpoint},
    }
    assert list_images(s3_root, options).num_rows == 1


def test_local_uris_are_absolute_whatever_the_working_directory(tmp_path, monkeypatch):
    _touch(tmp_path / "drop" / "a.jpg")
    monkeypatch.chdir(tmp_path)

    assert list_images("drop")["uri"].to_pylist() == [str(tmp_path / "drop" / "a.jpg")]


ODD_NAMES = ["in [a]/b[1].jpg", "x #1?.png", "ünï cødé/ç.JPG", "50%/p*q.jpeg", "sp ace/a b.gif"]


def test_odd_names_are_listed_literally_never_as_patterns(tmp_path):
    root = tmp_path / "src [x] #?"
    for name in ODD_NAMES:
        _touch(root / name)
    _touch(tmp_path / "src x" / "decoy.jpg")  # what "[x]" would match as a glob

    manifest = list_images(str(root))

    assert manifest["uri"].to_pylist() == sorted(str(root / name) for name in ODD_NAMES)
    for uri in manifest["uri"].to_pylist():
        assert storage.read_bytes(uri) == b"x"


def test_broken_and_looping_links_are_reported_not_skipped(tmp_path):
    _touch(tmp_path / "good.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")
    os.symlink(tmp_path, tmp_path / "cycle")  # a folder linking to itself is listed once

    found = list_listing(str(tmp_path))

    assert found.images["uri"].to_pylist() == [str(tmp_path / "good.jpg")]
    problems = dict(
        zip(found.problems["uri"].to_pylist(), found.problems["error"].to_pylist(), strict=True)
    )
    assert "broken symbolic link" in problems[str(tmp_path / "broken.jpg")]
    assert "loop" in problems[str(tmp_path / "loop.jpg")]


def _tree(fs, root: str, count: int) -> None:
    """Nested prefixes, odd names, non-images, `count` images in all."""
    names = []
    for i in range(count):
        prefix = f"{i % 7}/{'deep/' * (i % 3)}p{i % 13} [x]"
        names.append(f"{root}/{prefix}/img {i:05d} #?.jpg")
    fs.pipe({name: b"x" for name in names})
    fs.pipe({f"{root}/notes.txt": b"n", f"{root}/3/readme.md": b"n"})


def test_streaming_listing_equals_fs_find_on_a_large_nested_tree(tmp_path):
    root = str(tmp_path / "tree")
    fs = fsspec.filesystem("file", auto_mkdir=True)
    _tree(fs, root, 10_500)

    manifest = list_images(root)

    found = sorted(p for p in fs.find(root) if p.endswith(".jpg"))
    assert manifest["uri"].to_pylist() == found
    assert manifest.num_rows == 10_500


def test_s3_streaming_listing_equals_find_across_pages_and_prefixes(s3_root, s3_storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    root = s3_root.removeprefix("s3://") + "/drops"
    _tree(fs, root, 2_600)  # several 1000-key pages in the largest sub-prefix

    manifest = list_images(f"{s3_root}/drops", s3_storage_options)

    fs.invalidate_cache()
    found = sorted("s3://" + p for p in fs.find(root) if p.endswith(".jpg"))
    assert manifest["uri"].to_pylist() == found
    assert len(set(manifest["etag"].to_pylist())) == 1  # same bytes, same MD5 ETag


def test_cursor_lists_only_keys_after_the_mark(s3_root, s3_storage_options):
    options = s3_storage_options
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        storage.write_bytes_atomic(b"1", f"{s3_root}/drops/{day}/a.jpg", options)
    mark = f"{s3_root}/drops/2026-11-02/a.jpg"

    after = list_images(f"{s3_root}/drops", options, start_after=mark)
    # A straggler written with a key before the mark: only a full listing finds it.
    storage.write_bytes_atomic(b"1", f"{s3_root}/drops/2026-11-01/late.jpg", options)
    still_after = list_images(f"{s3_root}/drops", options, start_after=mark)
    full = list_images(f"{s3_root}/drops", options)

    assert after["uri"].to_pylist() == [f"{s3_root}/drops/2026-11-03/a.jpg"]
    assert still_after["uri"].to_pylist() == after["uri"].to_pylist()
    assert f"{s3_root}/drops/2026-11-01/late.jpg" in full["uri"].to_pylist()
    assert full.num_rows == 4


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_a_name_that_is_not_utf8_is_a_listing_problem_not_a_crash(tmp_path):
    (tmp_path / "good.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xff.jpg"), "wb") as file:
        file.write(b"x")
    listing = list_listing(str(tmp_path))
    assert listing.images["uri"].to_pylist() == [f"{tmp_path}/good.jpg"]
    assert listing.problems["uri"].to_pylist() == [f"{tmp_path}/bad\\xff.jpg"]
    assert "not valid UTF-8" in listing.problems["error"][0].as_py()
