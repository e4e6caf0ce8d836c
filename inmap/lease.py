"""A run lease per output: two runs never work on one output at once.

The lease is a series of small JSON objects under ``OUT/_lease/``, one per generation
(``000000000007.json``), each created with a conditional create (O_EXCL on a local disk,
If-None-Match on S3 and Azure, ifGenerationMatch=0 on GCS), so of two runs taking generation n+1
exactly one succeeds. A store that cannot create exclusively is refused
(`ExclusiveCreateUnsupported`), never leased by check-then-write. The newest generation is
the lease: it names the run, host and pid, and an expiry that the holder pushes forward while it
lives. A run finding a live lease waits, up to `wait` seconds, then fails naming the holder. A
lease whose holder was killed expires and is taken over by creating the next generation; a holder
that finds a newer generation than its own has lost the lease and must not commit.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from inmap import layout, storage
from inmap.config import LEASE_TTL, LEASE_WAIT
from inmap.errors import (
    MissingBucketError,
    NotFound,
    OutputBusyError,
    OutputPathError,
    StorageError,
)

logger = logging.getLogger(__name__)

DEFAULT_TTL = LEASE_TTL  # seconds a lease lives unrenewed: how soon a killed run is taken over
DEFAULT_WAIT = LEASE_WAIT  # how long a second run waits for the holder before giving up
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started: float
    expires: float

    def describe(self) -> str:
        expiry = datetime.fromtimestamp(self.expires, timezone.utc).strftime("%H:%M:%S UTC")
        return f"run {self.run_id} (host {self.host}, pid {self.pid}), expiring at {expiry}"


class Lease:
    """A held lease; renewed by a background thread until `release`."""

    def __init__(self, url: str, record: LeaseRecord, ttl: float, storage_options: dict | None):
        self.url, self.record, self.ttl = url, record, ttl
        # The holder whose lease expired unreleased when this one took over: a run that died.
        self.previous: LeaseRecord | None = None
        self._options = storage_options
        self._stop = threading.Event()
        self._lost: str | None = None
        # The caller's context (a Prefect flow run's, say) goes with the thread, so its log lines
        # land in that run's logs.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._renew_loop,), name="inmap-lease", daemon=True
        )
        self._thread.start()

    def check(self) -> None:
        """Raise if the lease was lost (taken over after this run stalled past its expiry)."""
        if self._lost:
            raise OutputBusyError(self._lost)

    def release(self) -> None:
        """Stop renewing and mark the lease released (expired now). The file stays, so that
        generation numbers only grow: a stalled holder can never see its number come back."""
        self._stop.set()
        self._thread.join()
        if not self._lost:
            released = LeaseRecord(**{**asdict(self.record), "expires": 0.0})
            try:
                storage.write_bytes_atomic(_encode(released), self.url, self._options)
            except StorageError as error:  # it expires on its own
                logger.warning("could not release the lease %s: %s", self.url, error)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                directory = layout.lease_dir_of(self.url)
                newest = max(_generations(directory, self._options), default=None)
                mine = _generation_of(self.url)
                if newest is not None and newest > mine:
                    self._lost = f"the lease on {directory} was taken over by a later run"
                    logger.error(self._lost)
                    return
                record = LeaseRecord(**{**asdict(self.record), "expires": time.time() + self.ttl})
                storage.write_bytes_atomic(_encode(record), self.url, self._options)
                self.record = record
            except Exception as error:  # keep trying until the lease would expire
                logger.warning("could not renew the lease %s: %s", self.url, error)
                if time.time() > self.record.expires:
                    self._lost = f"the lease {self.url} expired: renewing failed ({error})"
                    return


def acquire(
    output: str,
    run_id: str,
    storage_options: dict | None = None,
    *,
    ttl: float = DEFAULT_TTL,
    wait: float = DEFAULT_WAIT,
) -> Lease:
    """Take the output's lease, waiting up to `wait` seconds for a live holder."""
    directory = layout.lease_dir(output)
    deadline = time.monotonic() + wait
    announced = False
    attempted: LeaseRecord | None = None
    while True:
        generations = _generations(directory, storage_options)
        newest = max(generations, default=0)
        holder = _live_holder(directory, newest, storage_options) if newest else None
        if holder is None:
            now = time.time()
            record = LeaseRecord(run_id, socket.gethostname(), os.getpid(), now, now + ttl)
            url = _url(directory, newest + 1)
            attempted = record
            if _create(record, url, output, storage_options):
                previous = _expired_holder(directory, newest, storage_options) if newest else None
                for old in generations:  # expired or released: clear them away
                    if old <= newest:
                        storage.delete(_url(directory, old), storage_options)
                lease = Lease(url, record, ttl, storage_options)
                lease.previous = previous
                return lease
            continue  # another run took that generation first: look again
        if holder == attempted:  # our create landed, but its answer was lost and the retry refused
            return Lease(_url(directory, newest), holder, ttl, storage_options)
        if time.monotonic() >= deadline:
            raise OutputBusyError(
                f"output {output} is in use by {holder.describe()}; waited {wait:.0f}s. Run again "
                "later, or raise --lease-wait; a killed run's lease expires on its own"
            )
        if not announced:
            gone = ""
            if holder.host == socket.gethostname() and holder.pid > 0 and not _running(holder.pid):
                gone = " (that process has ended: a killed run, whose lease lapses at its expiry)"
            logger.warning("output %s is in use by %s%s; waiting", output, holder.describe(), gone)
            announced = True
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.05)))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _create(record: LeaseRecord, url: str, output: str, storage_options: dict | None) -> bool:
    try:
        return storage.create_exclusive(_encode(record), url, storage_options)
    except MissingBucketError:
        bucket = output.split("://", 1)[-1].split("/", 1)[0]
        raise OutputPathError(
            f"output {output}: bucket {bucket!r} does not exist; create it, or fix --output"
        ) from None


def _live_holder(
    directory: str, generation: int, storage_options: dict | None
) -> LeaseRecord | None:
    """The record of `generation` if it is live; None if expired, released or gone."""
    url = _url(directory, generation)
    try:
        record = LeaseRecord(**json.loads(storage.read_bytes(url, storage_options)))
    except MissingBucketError:
        raise
    except NotFound:
        return None  # taken over and cleared between listing and reading
    except (ValueError, TypeError):
        # Being written right now (a local create is not atomic), or left torn by a crash: live
        # for one ttl after it was last written.
        written = storage.modified(url, storage_options)
        record = LeaseRecord("unknown", "unknown", 0, written, written + DEFAULT_TTL)
    return record if record.expires > time.time() else None


def _expired_holder(
    directory: str, generation: int, storage_options: dict | None
) -> LeaseRecord | None:
    """The record of `generation` if its holder let it expire without releasing it."""
    try:
        record = LeaseRecord(**json.loads(storage.read_bytes(_url(directory, generation),
                                                             storage_options)))  # fmt: skip
    except (StorageError, ValueError, TypeError):
        return None
    return record if 0 < record.expires <= time.time() else None


def _generations(directory: str, storage_options: dict | None) -> list[int]:
    found = (layout.lease_generation(url) for url in storage.list_files(directory, storage_options))
    return [generation for generation in found if generation is not None]


def _generation_of(url: str) -> int:
    return layout.lease_generation(url)


def _url(directory: str, generation: int) -> str:
    return layout.lease_uri(directory, generation)


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record)).encode()


def verify(url: str | None, storage_options: dict | None = None) -> None:
    """Raise `OutputBusyError` unless the lease at `url` is still the output's newest: a run that
    stalled past its expiry and was taken over must not commit."""
    if url is None:
        return
    directory = layout.lease_dir_of(url)
    newest = max(_generations(directory, storage_options), default=None)
    if newest != _generation_of(url):
        raise OutputBusyError(
            f"this run's lease {url} was taken over by another run while this one stalled, so it "
            "stops without committing; run it again to label its images (what it embedded is kept)"
        )
