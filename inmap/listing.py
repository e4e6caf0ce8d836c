"""List the images under a source, page by page, straight into Arrow.

Holding a listing as one dict per object (what ``fs.find(detail=True)`` returns) costs about
1.5 kB per object; here each page of at most a thousand keys becomes three Arrow arrays before the
next is fetched, so memory stays close to the final manifest. On S3 the sub-prefixes of the
source (one delimiter listing) are listed concurrently; GCS, Azure and other fsspec stores are
listed by one recursive find. Each store names its way (`inmap.stores.Store.lister`). Paths are
never glob patterns.

The result is a `Listing`: the `MANIFEST_SCHEMA` table of images sorted by uri, and the entries
that look like images but cannot be one (broken or looping symbolic links), with a reason.
"""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from inmap import storage
from inmap.errors import MissingBucketError, NotFound, SourceNotFoundError, StorageError
from inmap.schemas import LISTING_PROBLEMS_SCHEMA, MANIFEST_SCHEMA
from inmap.stores import store_for

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
BATCH_ROWS = 4096  # local entries gathered before they become Arrow arrays
S3_CONCURRENCY = 16  # sub-prefixes listed at once


@dataclass
class Listing:
    images: pa.Table  # MANIFEST_SCHEMA, sorted by uri
    problems: pa.Table  # LISTING_PROBLEMS_SCHEMA: entries named like images that are not files

    def __len__(self) -> int:
        return self.images.num_rows


def list_images(
    source: str, storage_options: dict | None = None, *, start_after: str | None = None
) -> Listing:
    """The images under `source` (recursively). Local uris are absolute paths; others keep the
    form of `source` (``s3://bucket/key``, ``memory://...``).

    Extensions in `IMAGE_EXTENSIONS` match case-insensitively. The `etag` is the object's ETag
    where the store has one, else ``size-mtime``. With `start_after` (a uri), only uris sorting
    after it are listed (S3 ``StartAfter``; a filter elsewhere). A missing local folder or bucket
    is a `SourceNotFoundError`; an existing but empty prefix gives an empty listing.
    """
    fs, path = storage.url_to_fs(source, storage_options)
    if storage.is_local(source):
        batches, problems = _list_local(source, path, start_after)
    else:
        store = store_for(source)
        batches, problems = LISTERS[store.lister](store, fs, source, path, start_after), []
    images = pa.Table.from_batches(batches, schema=MANIFEST_SCHEMA)
    images = images.take(pc.sort_indices(images, [("uri", "ascending")]))
    problem_table = pa.table(
        {"uri": [uri for uri, _ in problems], "error": [reason for _, reason in problems]},
        schema=LISTING_PROBLEMS_SCHEMA,
    )
    return Listing(images.combine_chunks(), problem_table)


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _batch(uris: list[str], etags: list[str], sizes: list[int | None]) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array(uris, pa.string()), pa.array(etags, pa.string()), pa.array(sizes, pa.int64())],
        schema=MANIFEST_SCHEMA,
    )


def local_etag(size: int, mtime: float) -> str:
    return f"{size}-{float(mtime):.6f}"


# --- local folders -------------------------------------------------------------------------------


def source_uri(source: str, storage_options: dict | None = None) -> str:
    """`source` as the uris of its images begin: a local path made absolute, as `list_images`
    writes them, so a relative source matches the uris an earlier run indexed."""
    if not storage.is_local(source):
        return source.rstrip("/")
    _, root = storage.url_to_fs(source, storage_options)
    root = root.rstrip("/") or "/"
    return "file://" + root if source.startswith("file://") else root


def check_local_source(source: str) -> None:
    """Refuse a local source that does not exist (a typo), before any work; an S3 prefix is
    checked when it is listed (an empty prefix is a normal empty run)."""
    if storage.is_local(source):
        _, path = storage.url_to_fs(source)
        if not os.path.exists(path):
            raise SourceNotFoundError(f"source {source} does not exist")
        if not os.path.isdir(path) and not is_image_name(path):
            raise SourceNotFoundError(_not_an_image(source))


def _not_an_image(source: str) -> str:
    return (
        f"source {source} is a file but not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
        "give a folder or prefix of images, or one image"
    )


def _list_local(
    source: str, root: str, start_after: str | None
) -> tuple[list[pa.RecordBatch], list[tuple[str, str]]]:
    """Walk with os.scandir; symbolic links to folders are followed once (no loops)."""
    try:
        top = os.stat(root)
    except FileNotFoundError:
        raise SourceNotFoundError(f"source {source} does not exist") from None
    except OSError as error:
        raise StorageError(f"cannot list {source}: {error}") from error
    # Local uris are absolute, so a cache hit does not depend on the working directory.
    prefix = root if not source.startswith("file://") else "file://" + root
    if not stat.S_ISDIR(top.st_mode):  # a single file
        if not is_image_name(root):
            raise SourceNotFoundError(_not_an_image(source))
        uri = prefix
        return [_batch([uri], [local_etag(top.st_size, top.st_mtime)], [top.st_size])], []
    batches: list[pa.RecordBatch] = []
    problems: list[tuple[str, str]] = []
    uris: list[str] = []
    etags: list[str] = []
    sizes: list[int | None] = []
    seen_dirs = {(top.st_dev, top.st_ino)}
    stack = [(root, prefix)]
    while stack:
        directory, uri_prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as error:
            problems.append((uri_prefix, f"cannot list folder: {error.strerror or error}"))
            continue
        for entry in entries:
            uri = f"{uri_prefix}/{entry.name}"
            try:
                info = entry.stat()  # follows symbolic links
            except OSError as error:
                if is_image_name(entry.name):
                    problems.append((uri, _link_problem(entry.path, error)))
                continue
            if stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) not in seen_dirs:
                    seen_dirs.add((info.st_dev, info.st_ino))
                    stack.append((entry.path, uri))
                continue
            if not stat.S_ISREG(info.st_mode) or not is_image_name(entry.name):
                continue
            if not uri.isascii() and not _is_utf8(uri):
                # A name in another encoding: Arrow strings (and Delta, and S3 keys) are UTF-8.
                shown = os.fsencode(uri).decode("utf-8", "backslashreplace")  # bad\xff.jpg
                problems.append((shown, "the path is not valid UTF-8; rename the file or folder"))
                continue
            if start_after is not None and uri <= start_after:
                continue
            uris.append(uri)
            etags.append(local_etag(info.st_size, info.st_mtime))
            sizes.append(info.st_size)
            if len(uris) >= BATCH_ROWS:
                batches.append(_batch(uris, etags, sizes))
                uris, etags, sizes = [], [], []
    if uris:
        batches.append(_batch(uris, etags, sizes))
    return batches, problems


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogate escapes
        return False
    return True


def _link_problem(path: str, error: OSError) -> str:
    if os.path.islink(path):
        target = os.readlink(path)
        if error.errno == 40:  # ELOOP
            return f"symbolic link loop (points to {target})"
        return f"broken symbolic link (points to {target}, which does not exist)"
    return f"cannot stat: {error.strerror or error}"


# --- S3 ------------------------------------------------------------------------------------------


def list_s3(store, fs, source: str, path: str, start_after: str | None) -> list[pa.RecordBatch]:
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key else ""
    scheme_bucket = source.split("://", 1)[0] + "://" + bucket + "/"
    start_key = None
    if start_after is not None:
        start_key = start_after.removeprefix(scheme_bucket)
    return sync(fs.loop, _list_s3_async, fs, bucket, prefix, scheme_bucket, start_key, source)


async def _list_s3_async(fs, bucket, prefix, uri_prefix, start_key, source):
    lister = _S3Lister(fs, bucket, uri_prefix)
    try:
        if start_key is not None:  # one ordered listing after the mark
            await lister.list(prefix, start_after=start_key)
        else:
            # Direct keys and sub-prefixes from one delimiter listing, then the sub-prefixes at
            # once: each is an independent chain of 1000-key pages.
            sub_prefixes = await lister.list(prefix, delimiter="/")
            limit = asyncio.Semaphore(S3_CONCURRENCY)

            async def one(sub: str) -> None:
                async with limit:
                    await lister.list(sub)

            await asyncio.gather(*(one(sub) for sub in sub_prefixes))
    except Exception:
        try:
            with storage.storage_errors(source, "list", fs, bucket):
                raise
        except MissingBucketError as missing:
            raise SourceNotFoundError(
                f"source {source}: bucket {bucket!r} does not exist"
            ) from missing
    if not lister.batches and prefix:  # maybe the source is one object, not a prefix
        key = prefix.rstrip("/")
        if is_image_name(key):
            try:
                head = await fs._call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return lister.batches
            etag, size = head["ETag"].strip('"'), int(head["ContentLength"])
            lister.batches.append(_batch([uri_prefix + key], [etag], [size]))
    return lister.batches


class _S3Lister:
    """Pages of one bucket's keys, each turned into an Arrow batch as it arrives."""

    def __init__(self, fs, bucket: str, uri_prefix: str) -> None:
        self.fs, self.bucket, self.uri_prefix = fs, bucket, uri_prefix
        self.batches: list[pa.RecordBatch] = []

    async def list(
        self, prefix: str, *, delimiter: str | None = None, start_after: str | None = None
    ) -> list[str]:
        """Add a batch per page of image keys under `prefix`; return the sub-prefixes (with a
        delimiter)."""
        sub_prefixes: list[str] = []
        kwargs: dict = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if start_after:
            kwargs["StartAfter"] = start_after
        while True:
            page = await self.fs._call_s3("list_objects_v2", **kwargs)
            uris, etags, sizes = [], [], []
            for item in page.get("Contents", ()):
                key = item["Key"]
                if key.endswith("/") or not is_image_name(key):
                    continue
                uris.append(self.uri_prefix + key)
                etags.append(str(item.get("ETag", "")).strip('"') or _mtime_etag(item))
                sizes.append(int(item.get("Size", 0)))
            if uris:
                self.batches.append(_batch(uris, etags, sizes))
            sub_prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", ())]
            if not page.get("IsTruncated"):
                return sub_prefixes
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
            kwargs.pop("StartAfter", None)


def _mtime_etag(item: dict) -> str:
    modified = item.get("LastModified")
    stamp = modified.timestamp() if isinstance(modified, datetime) else 0.0
    return local_etag(int(item.get("Size", 0)), stamp)


# --- GCS, Azure and any other fsspec filesystem (memory:// in tests) -----------------------------


def list_found(store, fs, source: str, path: str, start_after: str | None) -> list[pa.RecordBatch]:
    """One recursive find. A missing bucket is a mistake; an empty or missing prefix is empty."""
    try:
        with storage.storage_errors(source, "list", fs, path):
            fs.invalidate_cache()
            entries = fs.find(path, withdirs=False, detail=True)
    except MissingBucketError as missing:
        raise SourceNotFoundError(
            f"source {source}: bucket {store.bucket(path)!r} does not exist"
        ) from missing
    except NotFound:
        entries = {}
    if not entries and not store.bucket_exists(fs, path):  # some stores list no bucket as empty
        raise SourceNotFoundError(f"source {source}: bucket {store.bucket(path)!r} does not exist")
    root = path.rstrip("/")
    uris, etags, sizes = [], [], []
    for name, info in entries.items():
        if info.get("type", "file") != "file" or not is_image_name(name):
            continue
        uri = source.rstrip("/") + name[len(root) :] if name.startswith(root) else name
        if start_after is not None and uri <= start_after:
            continue
        size = info.get("size")
        etag = info.get("ETag") or info.get("etag")
        if etag:
            etag = str(etag).strip('"')
        else:
            modified = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            if isinstance(modified, datetime):
                modified = modified.timestamp()
            etag = local_etag(size or 0, modified)
        uris.append(uri)
        etags.append(etag)
        sizes.append(None if size is None else int(size))
    return [_batch(uris, etags, sizes)] if uris else []


LISTERS = {"s3": list_s3, "find": list_found}  # by `inmap.stores.Store.lister`
