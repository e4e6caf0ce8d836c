"""Every path is a URL: local paths, ``s3://`` (s3fs), ``gs://`` (gcsfs), ``az://`` or ``abfs://``
(adlfs), and ``memory://`` in tests.

One helper (`url_to_fs`) opens any of them; the rest of inmap never imports s3fs or touches
``open()`` directly. What differs between stores (exclusive create, listing, delta-rs options,
error kinds) lives in `inmap.stores`; every error leaves this module as one of the `StorageError`
kinds of `inmap.errors`, translated there. User paths are never used as glob patterns: a folder
named ``out[1]`` is a folder, not a character class.

Credentials never travel in `storage_options` through Prefect (see `inmap.credentials`): they come
from the usual sources, which each store's client reads itself (``AWS_*``, ``GOOGLE_APPLICATION_
CREDENTIALS``, ``AZURE_STORAGE_*``, profiles and roles), or from a Prefect block that the task layer
loads and merges in.
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from inmap.errors import InmapError, NotFound, StorageError, Transient, TransientStorageError
from inmap.stores import S3_ADVICE, fsync_directory, store_for

__all__ = ["NotFound", "StorageError", "Transient", "TransientStorageError"]

# Enough requests in flight to hide object-store latency (tens of ms per GET) on a few cores.
DEFAULT_READ_WORKERS = 32
# How long a read keeps retrying transient failures (5xx, throttling, resets, timeouts).
DEFAULT_RETRY_SECONDS = 120.0
TEMPORARY_SUFFIX = ".inmap-tmp"

CREDENTIALS_ADVICE = S3_ADVICE  # the older name


def url_to_fs(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it.

    `storage_options` go to remote filesystems only, so one dict of S3 options can be passed along
    with a local output path.
    """
    return store_for(url).filesystem(url, storage_options)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join URL path segments with '/': ``join("s3://b/out", "shards", "x.parquet")``."""
    pieces = [url.rstrip("/")] + [part.strip("/") for part in parts if part.strip("/")]
    return "/".join(pieces)


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# --- reading -------------------------------------------------------------------------------------


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole object at `uri`; StorageError (naming it) when it cannot be read."""
    fs, path = url_to_fs(uri, storage_options)
    return _read_from(fs, path, uri)


def read_bytes_many(
    uris: Iterable[str],
    storage_options: dict | None = None,
    max_workers: int = DEFAULT_READ_WORKERS,
    retry_seconds: float = DEFAULT_RETRY_SECONDS,
) -> Iterator[tuple[str, bytes | Exception]]:
    """Read objects concurrently; yield ``(uri, bytes)`` or ``(uri, exception)`` in input order.

    Transient failures are retried with backoff for up to `retry_seconds` per object; what still
    fails is yielded, not raised, so the caller decides. At most about ``2 * max_workers``
    objects are held in memory at once. The read threads are gone when the generator is closed.
    """
    # One filesystem per scheme: building it from options costs ~0.3 ms per URL for s3://.
    filesystems: dict[str, fsspec.AbstractFileSystem] = {}
    window = max(1, 2 * max_workers)
    pending: deque[tuple[str, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="inmap-read")
    stopped = threading.Event()  # set when the caller stops early: retries stop waiting
    try:
        for uri in uris:
            scheme = "" if is_local(uri) else uri.split("://", 1)[0]
            if scheme not in filesystems:
                filesystems[scheme] = store_for(uri).reader(uri, storage_options)
            fs = filesystems[scheme]
            path = url_to_fs(uri)[1] if not scheme else fs._strip_protocol(uri)
            pending.append(
                (uri, pool.submit(_read_retrying, fs, path, uri, retry_seconds, stopped))
            )
            if len(pending) >= window:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        stopped.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _read_retrying(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, seconds: float, stopped: threading.Event
) -> bytes:
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return _read_from(fs, path, uri)
        except Transient:
            if time.monotonic() + delay > deadline or stopped.is_set():
                raise
            # Exponential backoff with jitter: many readers share one store.
            if stopped.wait(delay * random.uniform(0.5, 1.0)):
                raise
            delay = min(delay * 2, 15.0)


def _read_from(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bytes:
    with storage_errors(uri, "read", fs, path):
        return store_for(uri).read(fs, path)


def read_parquet(
    url: str, columns: list[str] | None = None, storage_options: dict | None = None
) -> pa.Table:
    """One Parquet file, reading only the footer and `columns` (ranged reads on object stores).

    A file that is empty, truncated or not Parquet raises `CorruptFileError`."""
    fs, path = url_to_fs(url, storage_options)
    with storage_errors(url, "read", fs, path), fs.open(path, "rb") as f:
        try:
            return pq.ParquetFile(f).read(columns=columns)
        except (pa.ArrowInvalid, OSError) as error:
            raise CorruptFileError(f"{url} is not a readable Parquet file: {error}") from error


def parquet_rows(url: str, storage_options: dict | None = None) -> int:
    """Rows in a Parquet file, from its footer alone."""
    fs, path = url_to_fs(url, storage_options)
    with storage_errors(url, "read", fs, path), fs.open(path, "rb") as f:
        try:
            return pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as error:
            raise CorruptFileError(f"{url} is not a readable Parquet file: {error}") from error


class CorruptFileError(StorageError):
    """A cache file that exists but cannot be read: recompute it."""


def list_files(url: str, storage_options: dict | None = None) -> dict[str, int]:
    """{url: size} of the files directly under the directory `url` (none if it does not exist).

    Not a glob: `url` is taken literally, whatever characters it holds."""
    fs, path = url_to_fs(url, storage_options)
    try:
        with storage_errors(url, "list"):  # not `fs`: a missing bucket is no files either
            fs.invalidate_cache(path)
            entries = fs.ls(path, detail=True)
    except NotFound:  # no folder (or no bucket) is no files
        return {}
    files = {}
    for entry in entries:
        if entry.get("type") == "file":
            files[join(url, basename(entry["name"]))] = int(entry.get("size") or 0)
    return files


def size(url: str, storage_options: dict | None = None) -> int:
    """Size in bytes of the object at `url` (caches bypassed)."""
    fs, path = url_to_fs(url, storage_options)
    with storage_errors(url, "check", fs, path):
        fs.invalidate_cache(path)
        return int(fs.size(path))


def modified(url: str, storage_options: dict | None = None) -> float:
    """When the object at `url` was last written, as a POSIX timestamp."""
    fs, path = url_to_fs(url, storage_options)
    with storage_errors(url, "check", fs, path):
        fs.invalidate_cache(path)
        stamp = fs.modified(path)
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object or directory exists at `url` (listing caches are bypassed)."""
    fs, path = url_to_fs(url, storage_options)
    with storage_errors(url, "check", fs, path):
        fs.invalidate_cache(path)
        return fs.exists(path)


# --- writing -------------------------------------------------------------------------------------


def write_bytes_atomic(data: bytes, url: str, storage_options: dict | None = None) -> None:
    """Write `data` to `url` so readers see the old object or the whole new one, never a part.

    Local files go to a temporary name in the same directory, are flushed to disk, then renamed
    over the target (and the directory is synced), so a crash leaves no empty or torn file.
    Object stores get one PUT, which is atomic.
    """
    fs, path = url_to_fs(url, storage_options)
    with storage_errors(url, "write", fs, path):
        if isinstance(fs, LocalFileSystem):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp_path = os.path.join(
                directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}"
            )
            try:
                with open(tmp_path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp_path, path)
                fsync_directory(directory)
            finally:
                with suppress(FileNotFoundError):
                    os.remove(tmp_path)
        else:
            fs.pipe_file(path, data)
            fs.invalidate_cache(path)


def create_exclusive(data: bytes, url: str, storage_options: dict | None = None) -> bool:
    """Create `url` holding `data` only if nothing is there; False if something already was.

    Each store does it in one request the store decides (see `inmap.stores`): O_EXCL locally,
    If-None-Match on S3 and Azure, ifGenerationMatch=0 on GCS. A store that cannot raises
    `ExclusiveCreateUnsupported`: never a check-then-write."""
    store = store_for(url)
    fs, path = store.filesystem(url, storage_options)
    with storage_errors(url, "create", fs, path):
        created = store.create_exclusive(fs, path, data, url)
    fs.invalidate_cache(path)
    return created


def write_parquet_atomic(table: pa.Table, url: str, storage_options: dict | None = None) -> None:
    """Write `table` as one Parquet file at `url`, atomically (see `write_bytes_atomic`)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(buffer.getvalue(), url, storage_options)


def delete(url: str, storage_options: dict | None = None) -> None:
    """Delete one object; an object that is already gone is not an error."""
    fs, path = url_to_fs(url, storage_options)
    with storage_errors(url, "delete", fs, path):
        with suppress(FileNotFoundError):
            fs.rm_file(path)
        fs.invalidate_cache(path)


def move_aside(url: str, storage_options: dict | None = None) -> str:
    """Rename a broken file to ``<name>.broken-<time>`` beside it, out of every cache's way;
    returns the new URL. A file that is already gone is not an error."""
    fs, path = url_to_fs(url, storage_options)
    target = f"{url}.broken-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    _, target_path = url_to_fs(target, storage_options)
    try:
        with storage_errors(url, "move aside", fs, path):
            if isinstance(fs, LocalFileSystem):
                os.replace(path, target_path)
            else:
                fs.mv(path, target_path)
            fs.invalidate_cache()
    except NotFound:
        return url
    return target


def sweep_temporary_files(url: str, older_than: float = 3600.0) -> list[str]:
    """Remove temporary files that crashed writers left under the local directory `url`.

    Only inmap's own temporary names, and only older than `older_than` seconds, so a live writer
    never loses its file. Object stores have none: a PUT is whole or absent."""
    if not is_local(url):
        return []
    _, root = url_to_fs(url)
    removed = []
    cutoff = time.time() - older_than
    for directory, _, names in os.walk(root):
        for name in names:
            if not name.endswith(TEMPORARY_SUFFIX):
                continue
            path = os.path.join(directory, name)
            with suppress(FileNotFoundError):
                if os.stat(path).st_mtime < cutoff:
                    os.remove(path)
                    removed.append(path)
    return removed


def _result(uri: str, future: Future) -> tuple[str, bytes | Exception]:
    try:
        return uri, future.result()
    except Exception as error:  # reported per object, never raised mid-shard
        return uri, error


@contextmanager
def storage_errors(url: str, action: str, fs=None, path: str | None = None) -> Iterator[None]:
    """Raise whatever fails inside as one `StorageError` kind, translated by the URL's store, with
    a message naming `url` and what to do; `fs` and `path` let it tell a missing bucket apart."""
    try:
        yield
    except InmapError:  # already one of ours (a kind, or a refusal such as no exclusive create)
        raise
    except Exception as error:
        raise store_for(url).translate(error, url, action, fs, path) from error
