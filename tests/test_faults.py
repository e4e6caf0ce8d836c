"""FaultProxy in front of a moto S3 server: clean forwarding, injected faults, retries."""

from __future__ import annotations

import http.client
import os
import socket
import time
import uuid
from collections.abc import Iterator

import botocore.exceptions
import pytest
import s3fs

from tests.faults import FaultProxy

# What a failed s3fs call raises: OSError for a 503 (translated by s3fs), a botocore
# connection error for a reset.
S3_FAILURE = (OSError, botocore.exceptions.BotoCoreError)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def proxy(moto_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=moto_url) as proxy:
        proxy.seed(1234)
        yield proxy


def make_fs(proxy: FaultProxy, *, retry: bool = True) -> s3fs.S3FileSystem:
    """s3fs through the proxy; retry=False: one botocore attempt and no s3fs retry per call."""
    config = {} if retry else {"retries": {"total_max_attempts": 1}}
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        endpoint_url=proxy.url,
        key="testing",
        secret="testing",
        config_kwargs=config,
    )
    if not retry:
        fs.retries = 1  # s3fs's own retry loop around botocore's
    return fs


@pytest.fixture
def bucket(proxy: FaultProxy) -> str:
    name = f"faults-{uuid.uuid4().hex[:12]}"
    make_fs(proxy).mkdir(name)
    proxy.reset_counts()
    return name


def test_large_object_round_trips_through_the_proxy(proxy: FaultProxy, bucket: str) -> None:
    fs = make_fs(proxy)
    data = os.urandom(6 * 2**20)
    fs.pipe(f"{bucket}/big.bin", data)
    assert fs.cat(f"{bucket}/big.bin") == data
    assert proxy.requests >= 2
    assert proxy.by_method["PUT"] >= 1 and proxy.by_method["GET"] >= 1
    assert proxy.bytes_sent_to_client >= len(data)
    assert proxy.faults == 0


def test_chunked_and_multipart_uploads_are_forwarded(proxy: FaultProxy, bucket: str) -> None:
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    parts = [b"a" * 3_000_000, b"b" * 3_000_000]
    conn.request("PUT", f"/{bucket}/chunked.bin", body=iter(parts), encode_chunked=True)
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200
    fs = make_fs(proxy)
    assert fs.cat(f"{bucket}/chunked.bin") == b"".join(parts)

    data = os.urandom(11 * 2**20)
    with fs.open(f"{bucket}/multipart.bin", "wb", block_size=5 * 2**20) as f:
        f.write(data)
    assert proxy.by_method["POST"] >= 2  # create and complete the multipart upload
    assert fs.cat(f"{bucket}/multipart.bin") == data


def test_every_request_failing_raises_with_both_fault_kinds(proxy: FaultProxy, bucket: str) -> None:
    make_fs(proxy).pipe(f"{bucket}/k", b"payload")
    fs = make_fs(proxy, retry=False)
    proxy.reset_counts()
    proxy.error_rate = 1.0
    for _ in range(8):
        with pytest.raises(S3_FAILURE):
            fs.cat(f"{bucket}/k")
    # aiohttp itself retries an idempotent request once when a reused connection is reset,
    # so a call can take two faults.
    assert proxy.faults == proxy.requests >= 8
    assert proxy.by_fault["503"] > 0 and proxy.by_fault["reset"] > 0


def test_faults_can_be_limited_to_methods_and_paths(proxy: FaultProxy, bucket: str) -> None:
    fs = make_fs(proxy, retry=False)
    fs.pipe(f"{bucket}/drops/a", b"a")
    fs.pipe(f"{bucket}/keep/b", b"b")
    proxy.error_rate = 1.0
    proxy.fault_methods = {"GET"}
    proxy.fault_paths = lambda path: "/drops/" in path
    fs.pipe(f"{bucket}/drops/c", b"c")  # PUT: not a faulted method
    assert fs.cat(f"{bucket}/keep/b") == b"b"  # GET elsewhere: not a faulted path
    with pytest.raises(S3_FAILURE):
        fs.cat(f"{bucket}/drops/a")
    assert proxy.faults >= 1
    assert proxy.by_method["PUT"] == 3  # no PUT was faulted, none retried


def test_outage_fails_requests_until_it_ends(proxy: FaultProxy, bucket: str) -> None:
    fs = make_fs(proxy, retry=False)
    fs.pipe(f"{bucket}/k", b"payload")
    start = time.monotonic()
    proxy.outage(1.0)
    with pytest.raises(S3_FAILURE):
        fs.cat(f"{bucket}/k")
    time.sleep(max(0.0, 1.05 - (time.monotonic() - start)))
    assert fs.cat(f"{bucket}/k") == b"payload"

    with proxy.down(), pytest.raises(S3_FAILURE):
        fs.cat(f"{bucket}/k")
    assert fs.cat(f"{bucket}/k") == b"payload"
    assert proxy.faults >= 2  # one per failed call, two if aiohttp retried after a reset


def test_default_retries_absorb_a_30_percent_error_rate(proxy: FaultProxy, bucket: str) -> None:
    fs = make_fs(proxy)
    objects = {f"{bucket}/small/{i:02d}": os.urandom(1000 + i) for i in range(20)}
    fs.pipe(objects)
    proxy.reset_counts()
    proxy.error_rate = 0.3
    # One at a time, so the seeded draws fall on the same requests on every run.
    assert {path: fs.cat(path) for path in objects} == objects
    assert proxy.faults > 0
    assert proxy.requests > len(objects)  # the faulted ones were retried
