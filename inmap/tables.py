"""Delta Lake tables (delta-rs): atomic commits, no duplicates, readable by every engine.

Predictions, errors, runs and the embedding index are Delta tables. A commit is one transaction:
readers see all of it or none of it. Writers that race are resolved by Delta's optimistic
concurrency: the loser's commit fails with a conflict, and `upsert` / `insert_new` re-read the
table and merge again, so the second writer inserts only the rows the first did not. A commit
tagged with an application transaction id (`app_id`) is skipped once that id is in the log, so a
retried commit is a no-op.

delta-rs commits with conditional writes: If-None-Match on S3 (AWS S3, MinIO, R2 and moto support
it) and Azure, a generation precondition on GCS. Each store (`inmap.stores`) gives delta-rs the
options for the same location and identity as every other storage path (`delta_options`).

What delta-rs 1.6 needs, found by trying (tests/test_tables.py pins it): every write is a table
create plus a MERGE, since `write_deltalake` panics on local paths holding `[` or `]`; reads run
with `use_threads=False`, since pyarrow's scanner threads otherwise abort the process at exit
about one time in three ("terminate called without an active exception"); an AWS profile is
resolved to keys here, since delta-rs ignores `AWS_PROFILE` unless forced.

delta-rs reports store failures as an OSError whose kind is only in its text. So a failure that
is not a commit conflict is diagnosed by asking the store the same question through fsspec
(`_diagnosis`), whose errors the store translates into kinds: a missing bucket, refused credentials
or an outage is named as such. Where the store answers well, delta-rs's I/O error (an OSError) is
taken as transient, its other errors (a broken log, a schema mismatch) as permanent; only
transient failures and commit conflicts are retried.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from inmap import storage
from inmap.errors import MissingBucketError, NotFound, OutputPathError, StorageError, Transient
from inmap.pairs import first_per_key
from inmap.stores import common_kind, store_for

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 12
CHECKPOINT_INTERVAL = 10  # commits between checkpoints (Delta's default is 100)
APP_VERSION = 1  # each app_id commits once


def table_uri(url: str) -> str:
    """The spelling of `url` that delta-rs reads and writes: an absolute local path, or the URL
    with its key percent-encoded (delta-rs parses it as a URL: a raw `#` or `?` would cut the key
    short, and two tables would become one)."""
    if storage.is_local(url):
        return os.path.abspath(url.removeprefix("file://"))
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}/{urllib.parse.quote(key, safe='/')}" if key else url


def delta_options(storage_options: dict | None = None, url: str | None = None) -> dict | None:
    """fsspec options as delta-rs (object_store) options for the store of `url` (S3 when no URL
    is given): the same bucket and identity; None for a local path."""
    return store_for(url or "s3://").delta_options(storage_options)


def _options_for(url: str, storage_options: dict | None) -> dict[str, str] | None:
    return delta_options(storage_options, url)


def open_table(url: str, storage_options: dict | None = None):
    """The DeltaTable at `url`, or None where there is none yet.

    (Not `DeltaTable.is_deltatable`: it holds the GIL while it waits on the store, which starves
    a store served from the same process, as moto is in tests.)"""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(table_uri(url), storage_options=_options_for(url, storage_options))
    except TableNotFoundError:
        return None
    except Exception as error:
        raise _storage_error(url, "open", error, storage_options) from error


def read(
    url: str,
    storage_options: dict | None = None,
    *,
    columns: Sequence[str] | None = None,
    partition: tuple[str, str] | None = None,
) -> pa.Table | None:
    """The table's current version (only `columns`, only rows of one `partition` value), or None
    where there is no table. Parquet column projection: unread columns cost nothing."""
    table = open_table(url, storage_options)
    if table is None:
        return None
    try:
        if partition:
            predicate = [(partition[0], "=", partition[1])]
            dataset = table.to_pyarrow_dataset(file_pruning_predicate=predicate)
            wanted = pc.field(partition[0]) == partition[1]
        else:
            dataset, wanted = table.to_pyarrow_dataset(), None
        return dataset.to_table(
            columns=list(columns) if columns else None, filter=wanted, use_threads=False
        )
    except Exception as error:
        raise _storage_error(url, "read", error, storage_options) from error


def committed(url: str, app_id: str, storage_options: dict | None = None) -> bool:
    """Whether a commit tagged `app_id` is in the table's log."""
    table = open_table(url, storage_options)
    return table is not None and (table.transaction_version(app_id) or 0) >= APP_VERSION


def append(
    url: str,
    rows: pa.Table,
    storage_options: dict | None = None,
    *,
    app_id: str | None,
    partition_by: Sequence[str] | None = None,
) -> bool:
    """Append `rows` in one transaction (creating the table); False if `app_id` was committed."""
    return _merge(url, rows, _Merge((), app_id, partition_by), storage_options) >= 0


def insert_new(
    url: str,
    rows: pa.Table,
    keys: Sequence[str],
    storage_options: dict | None = None,
    *,
    app_id: str | None = None,
    partition_by: Sequence[str] | None = None,
) -> int:
    """Insert the rows whose `keys` are not in the table yet, in one transaction; returns how
    many were new (0 when `app_id` was already committed: a retried commit is a no-op)."""
    return max(_merge(url, rows, _Merge(tuple(keys), app_id, partition_by), storage_options), 0)


def upsert(
    url: str,
    rows: pa.Table,
    keys: Sequence[str],
    storage_options: dict | None = None,
    *,
    partition_by: Sequence[str] | None = None,
) -> int:
    """Insert new rows and replace those whose `keys` match, in one transaction."""
    how = _Merge(tuple(keys), None, partition_by, update=True)
    return _merge(url, rows, how, storage_options)


@dataclass(frozen=True)
class _Merge:
    keys: tuple[str, ...]  # none: append
    app_id: str | None
    partition_by: Sequence[str] | None
    update: bool = False  # replace the rows whose keys match


def _merge(url: str, rows: pa.Table, how: _Merge, storage_options: dict | None) -> int:
    """One MERGE of `rows` on `how.keys`; -1 if `how.app_id` was already committed."""
    from deltalake import CommitProperties, Transaction, WriterProperties

    keys, app_id, partition_by, update = how.keys, how.app_id, how.partition_by, how.update
    if keys:
        rows = first_per_key(rows, keys)  # a MERGE source must not match one target row twice

    def attempt() -> int:
        table = _create(url, rows.schema, partition_by, storage_options)
        if app_id and (table.transaction_version(app_id) or 0) >= APP_VERSION:
            return -1
        predicate = " AND ".join(f"t.{key} = s.{key}" for key in keys) or "false"
        literals = _pruning_literals(rows, keys, partition_by)
        if literals:  # implied by the join; lets delta-rs skip files that cannot match
            predicate = f"{literals} AND {predicate}"
        merger = table.merge(
            rows,
            predicate,
            source_alias="s",
            target_alias="t",
            merge_schema=True,  # a column added in a later version (nullable) joins older tables
            writer_properties=WriterProperties(compression="ZSTD"),
            commit_properties=CommitProperties(
                app_transactions=[Transaction(app_id, APP_VERSION)] if app_id else None,
                max_commit_retries=0,  # conflicts come back here, to re-read and merge again
            ),
        )
        if update:
            merger = merger.when_matched_update_all()
        metrics = merger.when_not_matched_insert_all().execute()
        return int(metrics.get("num_target_rows_inserted", 0))

    return _retrying(url, "commit to", attempt, storage_options)


def _create(url: str, schema: pa.Schema, partition_by, storage_options):
    """The table at `url`, created empty with `schema` if there is none (a racing creator wins
    and its table is used)."""
    from deltalake import DeltaTable

    table = open_table(url, storage_options)
    if table is not None:
        return table
    try:
        return DeltaTable.create(
            table_uri(url),
            schema=schema,
            partition_by=list(partition_by) if partition_by else None,
            mode="ignore",
            storage_options=_options_for(url, storage_options),
            # Opening a table reads the log since its last checkpoint: keep that short.
            configuration={"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)},
        )
    except Exception:
        table = open_table(url, storage_options)
        if table is None:
            raise
        return table


def delete_where(url: str, predicate: str, storage_options: dict | None = None) -> None:
    """Delete the rows matching the SQL `predicate`, in one transaction."""

    def attempt() -> None:
        table = open_table(url, storage_options)
        if table is not None:
            table.delete(predicate)

    _retrying(url, "delete from", attempt, storage_options)


def compact_if_fragmented(
    url: str, storage_options: dict | None = None, *, max_files: int = 64
) -> bool:
    """Compact a table that has grown more than `max_files` files (each commit adds some), so a
    run's reads stay few; older files are left for `inmap maintain` to vacuum."""
    table = open_table(url, storage_options)
    if table is None or len(table.file_uris()) <= max_files:
        return False

    def attempt() -> None:
        open_table(url, storage_options).optimize.compact()

    _retrying(url, "compact", attempt, storage_options)
    return True


def _pruning_literals(rows: pa.Table, keys: Sequence[str], partition_by) -> str | None:
    """Conditions on the target that the join implies: the partition value, and the range of
    uris, so a MERGE reads only the files whose statistics overlap the new rows (drops whose keys
    sort by arrival touch only the newest files)."""
    if not keys or rows.num_rows == 0:
        return None
    clauses = []
    for column in partition_by or ():
        values = set(rows[column].to_pylist())
        if len(values) != 1:
            return None
        clauses.append(f"t.{column} = {_sql_string(values.pop())}")
    if "uri" in keys:
        bounds = pc.min_max(rows["uri"])
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        clauses.append(f"t.uri >= {_sql_string(low)} AND t.uri <= {_sql_string(high)}")
    return " AND ".join(clauses) or None


def _sql_string(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _retrying(url: str, action: str, attempt, storage_options: dict | None = None):
    """Run `attempt` until it commits: conflicts with another writer and transient failures are
    retried with backoff; other errors are raised as their StorageError kind, naming the table."""
    from deltalake.exceptions import CommitFailedError

    delay = 0.2
    for number in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return attempt()
        except Exception as error:
            conflict = isinstance(error, CommitFailedError)
            if isinstance(error, StorageError):
                failure = error
            else:
                failure = None if conflict else _storage_error(url, action, error, storage_options)
            if number == COMMIT_ATTEMPTS or not (conflict or isinstance(failure, Transient)):
                if failure is error:
                    raise
                raise (failure or _storage_error(url, action, error, storage_options)) from error
            # A conflict is another writer's commit landing first (shards of one run commit to
            # the index at once): routine, so it stays out of the console.
            level = logging.DEBUG if conflict else logging.INFO
            logger.log(level, "retrying %s %s after %s: %s", action, url, type(error).__name__,
                       error)  # fmt: skip
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def _storage_error(
    url: str, action: str, error: Exception, storage_options: dict | None = None
) -> StorageError:
    """A delta-rs failure as a StorageError of the kind the store itself reports (`_diagnosis`);
    the store is well but delta-rs failed: a plain StorageError, with delta-rs's words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # delta-rs colours its error chains
    text = " ".join(text.split())[:500]
    message = f"cannot {action} the Delta table {url}: {type(error).__name__}: {text}"
    diagnosis = _diagnosis(url, storage_options)
    if diagnosis is None:  # the store answers: delta-rs's own type says (an OSError is its I/O)
        return common_kind(error)(message)
    kind = type(diagnosis)
    return kind(f"{message}; asked directly, the store says: {diagnosis}")


def _diagnosis(url: str, storage_options: dict | None) -> StorageError | None:
    """What the store says when asked for the table's folder through fsspec: None when it answers
    (a folder that is not there yet is an answer), else its error, as a kind."""
    try:
        fs, path = storage.url_to_fs(url, storage_options)
        with storage.storage_errors(url, "list", fs, path):
            fs.invalidate_cache(path)
            fs.ls(path, detail=False)
    except MissingBucketError as error:
        return error
    except NotFound:
        return None
    except StorageError as error:
        return error
    except Exception:  # the store cannot even be opened: let delta-rs's words stand
        return None
    return None


def check_table_path(url: str) -> None:
    """Refuse, before any work, an output that delta-rs cannot use: it decodes `%` escapes in a
    path (so `%41` lands in another folder, and an object key holding any `%` cannot be opened
    again), and a backslash is not a path character to it. Everything else works, `[ ] # ? *`,
    spaces and unicode included."""
    path = table_uri(url) if storage.is_local(url) else url.partition("://")[2]
    problems = []
    if storage.is_local(url) and re.search(r"%[0-9A-Fa-f]{2}", path):
        problems.append("'%' followed by two hex digits (read as a URL escape)")
    if not storage.is_local(url) and "%" in path:
        problems.append("'%' (read as a URL escape)")
    if "\\" in path:
        problems.append("a backslash")
    if problems:
        raise OutputPathError(
            f"output {url}: Delta Lake cannot use a path holding {' and '.join(problems)}; "
            "choose another output path"
        )
    if storage.is_local(url) and os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"output {url} is a file; the output must be a folder (or a prefix)")


def compact(
    url: str, storage_options: dict | None = None, *, retention_hours: float = 168.0
) -> dict[str, int] | None:
    """Compact, checkpoint and vacuum one table; None where there is no table."""
    table = open_table(url, storage_options)
    if table is None:
        return None
    before = len(table.file_uris())

    def attempt() -> dict[str, int]:
        current = open_table(url, storage_options)
        current.optimize.compact()
        current = open_table(url, storage_options)
        current.create_checkpoint()
        removed = current.vacuum(
            retention_hours=math.ceil(retention_hours),  # never less than asked
            dry_run=False,
            enforce_retention_duration=False,
        )
        current.cleanup_metadata()
        return {"files_before": before, "files_after": len(current.file_uris()),
                "vacuumed": len(removed)}  # fmt: skip

    return _retrying(url, "compact", attempt, storage_options)
