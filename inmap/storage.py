"""Every path is a URL: local paths, ``s3://bucket/prefix`` through s3fs, ``memory://`` in tests.

One helper (`url_to_fs`) opens any of them; the rest of inmap never imports s3fs or touches
``open()`` directly. User paths are never used as glob patterns: a folder named ``out[1]`` is a
folder, not a character class.

Credentials never travel in `storage_options` through Prefect (see `inmap.credentials`): they come
from the usual AWS sources, which botocore reads itself (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance and IRSA roles), or from a Prefect block that
the task layer loads and merges in.
"""

from __future__ import annotations

import errno
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

from inmap.errors import MissingBucketError, StorageError, TransientStorageError

__all__ = ["StorageError", "TransientStorageError"]

# Enough requests in flight to hide object-store latency (tens of ms per GET) on a few cores.
DEFAULT_READ_WORKERS = 32
# How long a read keeps retrying transient failures (5xx, throttling, resets, timeouts).
DEFAULT_RETRY_SECONDS = 120.0
TEMPORARY_SUFFIX = ".inmap-tmp"

CREDENTIALS_ADVICE = (
    "check the credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, use an "
    "instance or IRSA role, or name a Prefect AwsCredentials block (--credentials-block); for "
    "S3-compatible stores also set the endpoint (storage_options={'endpoint_url': ...} or "
    "AWS_ENDPOINT_URL_S3)"
)
# OS errors that retrying cannot fix.
_PERMANENT_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
    errno.ENAMETOOLONG, errno.EEXIST, errno.EROFS,
}  # fmt: skip


def url_to_fs(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it.

    `storage_options` go to remote filesystems only, so one dict of S3 options can be passed along
    with a local output path.
    """
    if is_local(url):
        fs = LocalFileSystem()
        return fs, os.path.abspath(url.removeprefix("file://"))
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


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
                filesystems[scheme] = _reader_fs(uri, storage_options)
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


def _reader_fs(uri: str, storage_options: dict | None) -> fsspec.AbstractFileSystem:
    """The filesystem for reading `uri`. On S3, s3fs and botocore would each retry a failed GET
    several times (about 45 s for one object of a store answering 503) under inmap's own loop;
    here they try once, so `retry_seconds` is what bounds a read."""
    if is_local(uri) or not uri.startswith(("s3://", "s3a://")):
        return url_to_fs(uri, storage_options)[0]
    options = dict(storage_options or {})
    config = dict(options.get("config_kwargs") or {})
    config["retries"] = {"total_max_attempts": 1}
    fs = url_to_fs(uri, {**options, "config_kwargs": config})[0]
    fs.retries = 1
    return fs


def _read_retrying(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, seconds: float, stopped: threading.Event
) -> bytes:
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return _read_from(fs, path, uri)
        except TransientStorageError:
            if time.monotonic() + delay > deadline or stopped.is_set():
                raise
            # Exponential backoff with jitter: many readers share one store.
            if stopped.wait(delay * random.uniform(0.5, 1.0)):
                raise
            delay = min(delay * 2, 15.0)


def _read_from(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bytes:
    with _storage_errors(uri, "read"):
        if _is_s3(fs):
            return _read_s3_object(fs, path)
        return fs.cat_file(path)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in fs.protocol if isinstance(fs.protocol, tuple) else fs.protocol == "s3"


def _read_s3_object(fs, path: str) -> bytes:
    """GET one object by its exact key. s3fs would read ``photo?versionId=1.jpg`` as the key
    ``photo`` at version ``1.jpg``; a key is a key."""
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")

    async def get() -> bytes:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return await body.read()

    return sync(fs.loop, get)


def read_parquet(
    url: str, columns: list[str] | None = None, storage_options: dict | None = None
) -> pa.Table:
    """One Parquet file, reading only the footer and `columns` (ranged reads on object stores).

    A file that is empty, truncated or not Parquet raises `CorruptFileError`."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "read"), fs.open(path, "rb") as f:
        try:
            return pq.ParquetFile(f).read(columns=columns)
        except (pa.ArrowInvalid, OSError) as error:
            raise CorruptFileError(f"{url} is not a readable Parquet file: {error}") from error


def parquet_rows(url: str, storage_options: dict | None = None) -> int:
    """Rows in a Parquet file, from its footer alone."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "read"), fs.open(path, "rb") as f:
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
    with _storage_errors(url, "list"):
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
    files = {}
    for entry in entries:
        if entry.get("type") == "file":
            files[join(url, basename(entry["name"]))] = int(entry.get("size") or 0)
    return files


def size(url: str, storage_options: dict | None = None) -> int:
    """Size in bytes of the object at `url` (caches bypassed)."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "check"):
        fs.invalidate_cache(path)
        return int(fs.size(path))


def modified(url: str, storage_options: dict | None = None) -> float:
    """When the object at `url` was last written, as a POSIX timestamp."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "check"):
        fs.invalidate_cache(path)
        stamp = fs.modified(path)
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object or directory exists at `url` (listing caches are bypassed)."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "check"):
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
    with _storage_errors(url, "write"):
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
                _fsync_directory(directory)
            finally:
                with suppress(FileNotFoundError):
                    os.remove(tmp_path)
        else:
            fs.pipe_file(path, data)
            fs.invalidate_cache(path)


def create_exclusive(data: bytes, url: str, storage_options: dict | None = None) -> bool:
    """Create `url` holding `data` only if nothing is there; False if something already was.

    Local files use O_EXCL (then fsync); S3 uses a conditional PUT (If-None-Match: *)."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "create"):
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _fsync_directory(os.path.dirname(path))
            return True
        if _is_s3(fs):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            except OSError as error:  # some stores answer 409 ConditionalRequestConflict
                if "PreconditionFailed" in str(error) or "ConditionalRequest" in str(error):
                    return False
                raise
            return True
        if fs.exists(path):  # memory:// in tests: single process, so check-then-write is safe
            return False
        fs.pipe_file(path, data)
        return True


def write_parquet_atomic(table: pa.Table, url: str, storage_options: dict | None = None) -> None:
    """Write `table` as one Parquet file at `url`, atomically (see `write_bytes_atomic`)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(buffer.getvalue(), url, storage_options)


def delete(url: str, storage_options: dict | None = None) -> None:
    """Delete one object; an object that is already gone is not an error."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "delete"):
        with suppress(FileNotFoundError):
            fs.rm_file(path)
        fs.invalidate_cache(path)


def move_aside(url: str, storage_options: dict | None = None) -> str:
    """Rename a broken file to ``<name>.broken-<time>`` beside it, out of every cache's way;
    returns the new URL. A file that is already gone is not an error."""
    fs, path = url_to_fs(url, storage_options)
    target = f"{url}.broken-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    _, target_path = url_to_fs(target, storage_options)
    with _storage_errors(url, "move aside"):
        try:
            if isinstance(fs, LocalFileSystem):
                os.replace(path, target_path)
            else:
                fs.mv(path, target_path)
        except FileNotFoundError:
            return url
        fs.invalidate_cache()
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


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable (a crash must not undo it)."""
    with suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _result(uri: str, future: Future) -> tuple[str, bytes | Exception]:
    try:
        return uri, future.result()
    except Exception as error:  # reported per object, never raised mid-shard
        return uri, error


def is_transient(error: BaseException) -> bool:
    """Whether retrying `error` may help: outages, throttling, resets and timeouts do; a missing
    object, a permission or a bad path do not."""
    if isinstance(error, TransientStorageError):
        return True
    if isinstance(error, StorageError):
        return False
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError, FileExistsError)):  # fmt: skip
        return False
    if isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS:
        return False
    name = type(error).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError"):
        return False
    if "credential" in str(error).lower() or "InvalidAccessKeyId" in str(error):
        return False
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or name in (
        "ClientError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError",
        "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
        "ResponseStreamingError", "IncompleteReadError", "ClientConnectorError",
    )  # fmt: skip


def _no_bucket(error: BaseException) -> bool:
    text = str(error)
    return "NoSuchBucket" in text or "bucket does not exist" in text.lower()


@contextmanager
def _storage_errors(url: str, action: str) -> Iterator[None]:
    """Turn filesystem and botocore errors into a StorageError that names `url` and the fix;
    failures that may pass become a TransientStorageError."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as error:
        if _no_bucket(error):
            raise MissingBucketError(f"cannot {action} {url}: the bucket does not exist") from error
        if action in ("read", "check"):
            raise StorageError(f"cannot {action} {url}: not found ({error})") from error
        raise StorageError(
            f"cannot {action} {url}: {error}; does the bucket or directory exist?"
        ) from error
    except PermissionError as error:
        if not is_local(url):
            advice = CREDENTIALS_ADVICE
        elif action in ("read", "check", "list"):
            advice = "check that this user may read it"
        else:
            advice = "check the directory exists and this user may write to it"
        raise StorageError(
            f"cannot {action} {url}: permission denied ({error}); {advice}"
        ) from error
    except Exception as error:  # botocore, aiohttp, OS errors: say which URL, keep the cause
        if _no_bucket(error):
            raise MissingBucketError(f"cannot {action} {url}: the bucket does not exist") from error
        message = f"cannot {action} {url}: {type(error).__name__}: {error}"
        if "credential" in str(error).lower() or type(error).__name__ == "NoCredentialsError":
            raise StorageError(f"{message}; {CREDENTIALS_ADVICE}") from error
        if isinstance(error, OSError) and error.errno == errno.ELOOP:
            raise StorageError(f"cannot {action} {url}: symbolic link loop") from error
        if is_transient(error):
            raise TransientStorageError(message) from error
        if action in ("write", "create"):
            message += "; check that the output location is a writable directory or bucket"
        raise StorageError(message) from error
