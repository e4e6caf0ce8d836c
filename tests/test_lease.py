"""The run lease: one run per output; a second waits, then fails naming the holder; a killed
run's lease expires and is taken over; a run whose lease was taken over commits nothing."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from inmap import lease, storage
from inmap.errors import OutputBusyError


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None
    root = request.getfixturevalue("s3_root")
    return f"{root}/out", request.getfixturevalue("s3_storage_options")


def test_a_second_run_waits_then_fails_naming_the_holder(output):
    url, options = output
    held = lease.acquire(url, "run-a", options, ttl=30)
    try:
        start = time.monotonic()
        with pytest.raises(OutputBusyError) as error:
            lease.acquire(url, "run-b", options, wait=1.5)
        assert time.monotonic() - start >= 1.5
        message = str(error.value)
        assert "run run-a" in message and "expiring at" in message and "--lease-wait" in message
    finally:
        held.release()
    lease.acquire(url, "run-b", options, wait=0).release()  # free once released


def test_a_waiting_run_gets_the_lease_when_the_holder_releases(output):
    url, options = output
    held = lease.acquire(url, "run-a", options)
    releaser = threading.Timer(1.0, held.release)
    releaser.start()
    second = lease.acquire(url, "run-b", options, wait=30)
    assert second.record.run_id == "run-b"
    second.release()


def test_an_expired_lease_is_taken_over_and_its_holder_cannot_commit(output):
    url, options = output
    # A run killed with -9: its lease is never renewed nor released.
    stale = lease.acquire(url, "run-killed", options, ttl=1)
    stale._stop.set()  # no renewals, as after a kill
    time.sleep(1.5)

    taker = lease.acquire(url, "run-new", options, wait=0)
    try:
        lease.verify(taker.url, options)  # the new holder may commit
        with pytest.raises(OutputBusyError, match="taken over by another run"):
            lease.verify(stale.url, options)  # the stalled one may not
    finally:
        taker.release()


def test_the_lease_is_renewed_while_the_run_lives(output):
    url, options = output
    held = lease.acquire(url, "run-a", options, ttl=1.5)
    try:
        time.sleep(2.5)  # longer than the ttl: alive only if renewed
        with pytest.raises(OutputBusyError, match="run run-a"):
            lease.acquire(url, "run-b", options, wait=0)
        record = json.loads(storage.read_bytes(held.url, options))
        assert record["expires"] > time.time()
        held.check()
    finally:
        held.release()


def test_only_one_of_many_simultaneous_runs_gets_the_lease(tmp_path):
    url = str(tmp_path / "out")
    winners, losers = [], []

    def take(run_id: str) -> None:
        try:
            winners.append(lease.acquire(url, run_id, wait=0))
        except OutputBusyError:
            losers.append(run_id)

    threads = [threading.Thread(target=take, args=(f"run-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(winners) == 1 and len(losers) == 7
    finally:
        for held in winners:
            held.release()


def test_a_torn_lease_file_counts_as_live_until_its_ttl_passes(tmp_path):
    url = str(tmp_path / "out")
    torn = tmp_path / "out" / "_lease" / "000000000001.json"
    torn.parent.mkdir(parents=True)
    torn.write_text("")  # a crash between the exclusive create and the write
    with pytest.raises(OutputBusyError, match="run unknown"):
        lease.acquire(url, "run-b", wait=0)
    old = time.time() - lease.DEFAULT_TTL - 5
    os.utime(torn, (old, old))
    lease.acquire(url, "run-b", wait=0).release()


def test_a_create_whose_answer_was_lost_is_our_lease_not_a_stranger(output, monkeypatch):
    """The conditional create lands, its answer is lost, and the retried create is refused: the
    lease found there is the one this run just wrote, so it holds it at once."""
    url, options = output
    create = storage.create_exclusive
    calls = []

    def answer_lost(data, target, storage_options=None):
        calls.append(target)
        create(data, target, storage_options)
        return False  # what the retry sees: the object is there

    monkeypatch.setattr(storage, "create_exclusive", answer_lost)
    start = time.monotonic()
    held = lease.acquire(url, "run-a", options, wait=5)
    monkeypatch.setattr(storage, "create_exclusive", create)
    assert time.monotonic() - start < 4 and len(calls) == 1
    assert held.url == calls[0] and held.record.run_id == "run-a"
    held.release()
    lease.acquire(url, "run-b", options, wait=0).release()  # released for real


def test_an_output_bucket_that_does_not_exist_is_a_one_line_input_error(
    moto_endpoint, s3_storage_options
):
    from inmap.errors import OutputPathError

    with pytest.raises(OutputPathError, match="bucket 'no-such-bucket-3f1' does not exist"):
        lease.acquire("s3://no-such-bucket-3f1/out", "run-a", s3_storage_options, wait=0)
