"""Shared fixtures: the real data in ../shared/data, located from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# Tests talk to local servers only; no usage telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEV_FEATURES = SHARED_DATA / "clip-vitb32-imagenet500.npz"
SAMPLE_IMAGES = SHARED_DATA / "imagenet-sample"


@pytest.fixture(scope="session")
def dev_set() -> dict[str, np.ndarray]:
    """Real CLIP ViT-B/32 ImageNet features: image_features, labels, text_proxy, classnames."""
    assert DEV_FEATURES.exists(), f"real dev features not found at {DEV_FEATURES}"
    with np.load(DEV_FEATURES, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """The 1000 real ImageNet JPEGs, sorted by name."""
    assert SAMPLE_IMAGES.exists(), f"sample images not found at {SAMPLE_IMAGES}"
    return sorted(SAMPLE_IMAGES.glob("*.JPEG"))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 endpoint: moto's ThreadedMotoServer on 127.0.0.1, for the whole session."""
    import os

    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_storage_options(moto_endpoint) -> dict:
    """storage_options for s3fs against the moto server, with its test credentials (for library
    calls; flow parameters never hold secrets)."""
    return {
        "endpoint_url": moto_endpoint,
        "key": "testing",
        "secret": "testing",
    }


@pytest.fixture
def s3_endpoint_options(moto_endpoint) -> dict:
    """The non-secret storage options a flow takes: where the store is, not who we are."""
    return {"endpoint_url": moto_endpoint}


@pytest.fixture
def s3_credentials_in_env(monkeypatch):
    """The moto test keys in the environment, the way a deployment's worker has its own."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_root(s3_bucket) -> str:
    """s3://<a fresh, empty bucket> on the moto server."""
    return f"s3://{s3_bucket}"


def touch(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def s3_bucket(moto_endpoint, s3_storage_options):
    """A fresh, empty bucket name on the moto server."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    fs.mkdir(name)
    return name


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def image_folder(tmp_path, sample_images):
    """A folder of 12 real JPEGs (in two sub-folders) plus three broken files."""
    import shutil

    folder = tmp_path / "source"
    for number, path in enumerate(sample_images[:: len(sample_images) // 12][:12]):
        target = folder / ("a" if number % 2 else "b") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "truncated.jpg").write_bytes(sample_images[0].read_bytes()[:2000])
    (folder / "empty.JPG").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, not an image")
    (folder / "readme.txt").write_text("not listed: not an image extension")
    return folder


def wait_for(predicate, timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: process exited with {process.returncode}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
    }
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-ui",
            "--analytics-off",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: http_ok(f"{api}/health"), 120, "prefect server", server)
        yield {**env, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def read_delta(table, storage_options: dict | None = None):
    """A Delta table of the output as a polars DataFrame, the way the README reads it."""
    import polars as pl

    from inmap.tables import delta_options

    table = str(table)
    if table.startswith("s3://"):
        return pl.read_delta(table, storage_options=delta_options(storage_options))
    return pl.read_delta(table)


def one_row_per_image(predictions) -> bool:
    """No (labelset, uri, etag) twice."""
    return predictions.select(["labelset", "uri", "etag"]).unique().height == predictions.height


def api_request(url: str, method: str = "GET", body: object = None, attempts: int = 6):
    """A JSON call to a Prefect server; a busy server's 5xx or a dropped connection is tried
    again (CI machines are shared)."""
    import json
    import urllib.error

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    for attempt in range(attempts):
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == attempts - 1:
                raise
        except urllib.error.URLError:
            if attempt == attempts - 1:
                raise
        time.sleep(2 + 2 * attempt)
