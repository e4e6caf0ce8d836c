"""Every path is a URL: local paths, ``s3://bucket/prefix`` through s3fs, ``memory://`` in tests.

One helper (`url_to_fs`) opens any of them; the rest of inmap never imports s3fs or touches
``open()`` directly.

S3 settings come from ``storage_options`` (passed to ``s3fs.S3FileSystem``: ``key``, ``secret``,
``token``, ``anon``, ``endpoint_url``, ``client_kwargs``, ...) or from the usual AWS sources, which
botocore reads itself: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), instance roles.
"""

from __future__ import annotations

import io
import os
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import datetime

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from inmap.schemas import MANIFEST_SCHEMA

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})

# Enough requests in flight to hide object-store latency (tens of ms per GET) on a few cores.
DEFAULT_READ_WORKERS = 32

_CREDENTIALS_ADVICE = (
    "check the credentials: pass storage_options={'key': ..., 'secret': ...} "
    "(or {'anon': True} for a public bucket), or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
    "or AWS_PROFILE; for S3-compatible stores also set storage_options={'endpoint_url': ...} "
    "or AWS_ENDPOINT_URL_S3"
)


class StorageError(Exception):
    """A storage operation failed; the message names the URL and what to do about it."""


def url_to_fs(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it.

    `storage_options` go to remote filesystems only, so one dict of S3 options can be passed along
    with a local output path.
    """
    options = dict(storage_options or {})
    if not _has_protocol(url) or url.startswith("file://"):
        options = {}
    return fsspec.core.url_to_fs(url, **options)


def join(url: str, *parts: str) -> str:
    """Join URL path segments with '/': ``join("s3://b/out", "shards", "x.parquet")``."""
    pieces = [url.rstrip("/")] + [part.strip("/") for part in parts if part.strip("/")]
    return "/".join(pieces)


def list_images(source: str, storage_options: dict | None = None) -> pa.Table:
    """List the images under `source`, recursively, as a `MANIFEST_SCHEMA` table sorted by uri.

    Extensions in `IMAGE_EXTENSIONS` match case-insensitively. The `uri` keeps the form the source
    was given in (``s3://bucket/key``, ``memory://...`` or a plain local path). The `etag` is the
    object's ETag where the store has one, else ``size-mtime``. A missing or empty source gives an
    empty table.
    """
    fs, path = url_to_fs(source, storage_options)
    with _storage_errors(source, "list"):
        fs.invalidate_cache()  # s3fs caches listings; a scheduled re-run must see new drops
        try:
            entries = fs.find(path, withdirs=False, detail=True)
        except FileNotFoundError:  # e.g. a bucket that does not exist
            entries = {}
    rows = []
    for name, info in entries.items():
        if info.get("type", "file") != "file" or not _is_image_name(name):
            continue
        uri = _uri_under(source, path, name, fs)
        size = info.get("size")
        rows.append((uri, _etag(info), None if size is None else int(size)))
    rows.sort()
    return pa.table(
        {
            "uri": [row[0] for row in rows],
            "etag": [row[1] for row in rows],
            "size": [row[2] for row in rows],
        },
        schema=MANIFEST_SCHEMA,
    )


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole object at `uri`; StorageError (naming it) when it cannot be read."""
    fs, path = url_to_fs(uri, storage_options)
    return _read_from(fs, path, uri)


def read_bytes_many(
    uris: Iterable[str],
    storage_options: dict | None = None,
    max_workers: int = DEFAULT_READ_WORKERS,
) -> Iterator[tuple[str, bytes | Exception]]:
    """Read objects concurrently; yield ``(uri, bytes)`` or ``(uri, exception)`` in input order.

    A failed read is yielded, not raised, so one bad object never stops a shard. At most about
    ``2 * max_workers`` objects are held in memory at once.
    """
    # One filesystem per scheme: building it from options costs ~0.3 ms per URL for s3://.
    filesystems: dict[str, fsspec.AbstractFileSystem] = {}
    window = max(1, 2 * max_workers)
    pending: deque[tuple[str, Future]] = deque()
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="inmap-read") as pool:
        for uri in uris:
            scheme = uri.split("://", 1)[0] if _has_protocol(uri) else ""
            if scheme not in filesystems:
                filesystems[scheme] = url_to_fs(uri, storage_options)[0]
            fs = filesystems[scheme]
            pending.append((uri, pool.submit(_read_from, fs, fs._strip_protocol(uri), uri)))
            if len(pending) >= window:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def _read_from(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bytes:
    with _storage_errors(uri, "read"):
        return fs.cat_file(path)


def write_bytes_atomic(data: bytes, url: str, storage_options: dict | None = None) -> None:
    """Write `data` to `url` so readers see the old object or the whole new one, never a part.

    Local files are written to a temporary name in the same directory, then renamed over the
    target. Object stores get one PUT, which is atomic.
    """
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "write"):
        if isinstance(fs, LocalFileSystem):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp_path, "wb") as f:
                    f.write(data)
                os.replace(tmp_path, path)
            finally:
                if os.path.exists(tmp_path):
                    os.remove(tmp_path)
        else:
            fs.pipe_file(path, data)
            fs.invalidate_cache(path)


def write_parquet_atomic(table: pa.Table, url: str, storage_options: dict | None = None) -> None:
    """Write `table` as one Parquet file at `url`, atomically (see `write_bytes_atomic`)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(buffer.getvalue(), url, storage_options)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object or directory exists at `url` (listing caches are bypassed)."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "check"):
        fs.invalidate_cache(path)
        return fs.exists(path)


def glob(pattern: str, storage_options: dict | None = None) -> list[str]:
    """URLs matching `pattern` (``*`` within one path segment), sorted; none gives ``[]``.

    The URLs keep the form the pattern was given in, like `list_images`.
    """
    base = pattern[: min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))]
    base = base.rsplit("/", 1)[0] if "/" in base else base
    fs, base_path = url_to_fs(base, storage_options)
    _, path_pattern = url_to_fs(pattern, storage_options)
    with _storage_errors(pattern, "list"):
        fs.invalidate_cache()
        try:
            names = fs.glob(path_pattern)
        except FileNotFoundError:
            names = []
    return sorted(_uri_under(base, base_path, name, fs) for name in names)


def move(source: str, destination: str, storage_options: dict | None = None) -> None:
    """Move one object. Local moves are an atomic rename; object stores copy, then delete."""
    fs, source_path = url_to_fs(source, storage_options)
    _, destination_path = url_to_fs(destination, storage_options)
    with _storage_errors(destination, "move to"):
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(destination_path), exist_ok=True)
            os.replace(source_path, destination_path)
        else:
            fs.mv(source_path, destination_path)
            fs.invalidate_cache()


def delete(url: str, storage_options: dict | None = None) -> None:
    """Delete one object; an object that is already gone is not an error."""
    fs, path = url_to_fs(url, storage_options)
    with _storage_errors(url, "delete"):
        with suppress(FileNotFoundError):
            fs.rm_file(path)
        fs.invalidate_cache(path)


def read_table(
    url_or_urls: str | Iterable[str],
    columns: list[str] | None = None,
    storage_options: dict | None = None,
) -> pa.Table:
    """Read one Parquet file, or several with the same schema concatenated in the given order.

    The schema metadata of the first file is kept.
    """
    urls = [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls)
    if not urls:
        raise ValueError("read_table needs at least one URL")
    tables = []
    for url in urls:
        data = read_bytes(url, storage_options)
        try:
            tables.append(pq.read_table(io.BytesIO(data), columns=columns))
        except (pa.ArrowInvalid, OSError) as error:
            raise StorageError(f"{url} is not a readable Parquet file: {error}") from error
    if len(tables) == 1:
        return tables[0]
    schema = tables[0].schema
    return pa.concat_tables([table.cast(schema) for table in tables])


def _has_protocol(url: str) -> bool:
    return "://" in url


def _uri_under(source: str, source_path: str, name: str, fs: fsspec.AbstractFileSystem) -> str:
    """`name` (a path inside `fs`) written with the same prefix the user gave for `source`."""
    root = source_path.rstrip("/")
    if name == root:
        return source
    if name.startswith(root + "/"):
        return source.rstrip("/") + name[len(root) :]
    return fs.unstrip_protocol(name) if _has_protocol(source) else name


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _etag(info: dict) -> str:
    """The store's ETag when it has one (S3), else ``size-mtime`` (local and memory files)."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    modified = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    if isinstance(modified, datetime):
        modified = modified.timestamp()
    return f"{info.get('size')}-{float(modified):.6f}"


def _result(uri: str, future: Future) -> tuple[str, bytes | Exception]:
    try:
        return uri, future.result()
    except Exception as error:  # reported per object, never raised mid-shard
        return uri, error


@contextmanager
def _storage_errors(url: str, action: str) -> Iterator[None]:
    """Turn filesystem and botocore errors into a StorageError that names `url` and the fix."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as error:
        if action in ("read", "check"):
            raise StorageError(f"cannot {action} {url}: not found ({error})") from error
        raise StorageError(
            f"cannot {action} {url}: {error}; does the bucket or directory exist?"
        ) from error
    except PermissionError as error:
        if _has_protocol(url) and not url.startswith("file://"):
            advice = _CREDENTIALS_ADVICE
        else:
            advice = "check the directory exists and this user may write to it"
        raise StorageError(
            f"cannot {action} {url}: permission denied ({error}); {advice}"
        ) from error
    except Exception as error:  # botocore, aiohttp, OS errors: say which URL, keep the cause
        message = f"cannot {action} {url}: {type(error).__name__}: {error}"
        if "credential" in str(error).lower() or type(error).__name__ == "NoCredentialsError":
            message += f"; {_CREDENTIALS_ADVICE}"
        elif action in ("write", "move to"):
            message += "; check that the output location is a writable directory or bucket"
        raise StorageError(message) from error
