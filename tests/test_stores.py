"""The storage seam, store by store: local disk, S3 (moto), GCS (fake-gcs-server) and Azure
(Azurite), each a real server on 127.0.0.1 (see the fixtures in conftest.py).

Each store must: create exclusively (so the run lease keeps runs apart), list a source, commit
Delta tables that readers trust, and report failures as kinds, never as text to match.
"""

from __future__ import annotations

import json
import threading
import uuid

import pyarrow as pa
import pytest

from inmap import errors, lease, listing, storage, stores, tables
from inmap.credentials import merge_options
from inmap.errors import (
    AccessDenied,
    ExclusiveCreateUnsupported,
    MissingBucketError,
    NoCredentials,
    NotFound,
    OutputBusyError,
    OutputPathError,
    SourceNotFoundError,
    StorageError,
    Transient,
)


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def root(request, tmp_path) -> tuple[str, dict | None]:
    """(an empty output location, its storage options) on each store."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_root')}/out", request.getfixturevalue(
            "s3_storage_options"
        )
    if request.param == "gcs":
        return f"gs://{request.getfixturevalue('gcs_bucket')}/out", None
    return f"az://{request.getfixturevalue('azure_container')}/out", None


@pytest.fixture(params=["s3", "gcs", "azure"])
def remote(request) -> tuple[str, str, dict | None]:
    """(scheme, a fresh bucket, storage options) on each object store."""
    if request.param == "s3":
        return (
            "s3",
            request.getfixturevalue("s3_bucket"),
            request.getfixturevalue("s3_storage_options"),
        )
    if request.param == "gcs":
        return "gs", request.getfixturevalue("gcs_bucket"), None
    return "az", request.getfixturevalue("azure_container"), None


def test_of_racing_exclusive_creates_exactly_one_wins(root):
    location, options = root
    url = storage.join(location, "_lease", "000000000001.json")
    start = threading.Barrier(6)
    won: list[int] = []

    def create(number: int) -> None:
        start.wait()
        if storage.create_exclusive(f"writer {number}".encode(), url, options):
            won.append(number)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(won) == 1
    assert storage.read_bytes(url, options) == f"writer {won[0]}".encode()
    assert not storage.create_exclusive(b"late", url, options)


def test_the_lease_keeps_a_second_run_out_until_the_first_releases(root):
    location, options = root
    held = lease.acquire(location, "run-a", options, wait=0)
    with pytest.raises(OutputBusyError, match="run-a"):
        lease.acquire(location, "run-b", options, wait=0)
    held.release()

    lease.acquire(location, "run-b", options, wait=0).release()


def test_a_store_that_cannot_create_exclusively_is_refused_for_the_lease():
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class PlainMemory(MemoryFileSystem):  # any store inmap has no seam for
        protocol = ("plainmem",)
        store = {}
        pseudo_dirs = [""]

    fsspec.register_implementation("plainmem", PlainMemory, clobber=True)

    with pytest.raises(ExclusiveCreateUnsupported, match="plainmem://x/out") as refused:
        lease.acquire("plainmem://x/out", "run-a", wait=0)

    assert isinstance(refused.value, OutputPathError)  # a mistake in the input: never retried
    assert not PlainMemory().exists("x/out/_lease/000000000001.json")  # nothing written


def test_a_missing_object_is_not_found_and_a_missing_bucket_is_named(remote):
    scheme, bucket, options = remote
    with pytest.raises(NotFound) as missing:
        storage.read_bytes(f"{scheme}://{bucket}/no/such.jpg", options)
    assert not isinstance(missing.value, MissingBucketError)
    assert f"{scheme}://{bucket}/no/such.jpg" in str(missing.value)

    absent = f"no-such-{uuid.uuid4().hex[:10]}"
    with pytest.raises(MissingBucketError):
        storage.write_bytes_atomic(b"x", f"{scheme}://{absent}/out/x.json", options)
    with pytest.raises(OutputPathError, match=f"bucket '{absent}' does not exist"):
        lease.acquire(f"{scheme}://{absent}/out", "run-a", options, wait=0)
    with pytest.raises(SourceNotFoundError, match=absent):
        listing.list_images(f"{scheme}://{absent}/drop", options)


def test_listing_is_recursive_keeps_the_scheme_and_an_etag_that_changes(remote):
    scheme, bucket, options = remote
    source = f"{scheme}://{bucket}/drop"
    for name in ("a.jpg", "sub/b.PNG", "sub/deeper/c.jpeg", "notes.txt"):
        storage.write_bytes_atomic(name.encode(), f"{source}/{name}", options)

    found = listing.list_images(source, options).images

    assert found["uri"].to_pylist() == [
        f"{source}/a.jpg",
        f"{source}/sub/b.PNG",
        f"{source}/sub/deeper/c.jpeg",
    ]
    assert found["size"].to_pylist() == [5, 9, 17]
    etags = found["etag"].to_pylist()
    assert all(etags)
    storage.write_bytes_atomic(b"changed", f"{source}/a.jpg", options)
    assert listing.list_images(source, options).images["etag"][0].as_py() != etags[0]
    assert listing.list_images(f"{source}/empty", options).images.num_rows == 0


def test_delta_commits_are_whole_deduplicated_and_readable(remote):
    from deltalake import DeltaTable

    scheme, bucket, options = remote
    url = f"{scheme}://{bucket}/out/predictions"
    rows = pa.table({"uri": [f"img-{i}" for i in range(6)], "labelset": ["ls"] * 6})

    assert tables.insert_new(url, rows, ["uri"], options, app_id="run-1") == 6
    assert tables.insert_new(url, rows, ["uri"], options, app_id="run-1") == 0  # a retry
    start = threading.Barrier(4)

    def race(name: str) -> None:  # each racer: six rows it shares with the others, two its own
        uris = [f"img-{i}" for i in range(4, 10)] + [f"{name}-0", f"{name}-1"]
        start.wait()
        tables.insert_new(url, pa.table({"uri": uris, "labelset": ["ls"] * 8}), ["uri"], options)

    racers = [threading.Thread(target=race, args=(f"racer{n}",)) for n in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()

    read = DeltaTable(tables.table_uri(url), storage_options=tables.delta_options(options, url))
    uris = read.to_pyarrow_table()["uri"].to_pylist()
    own = [f"racer{n}-{k}" for n in range(4) for k in range(2)]
    assert sorted(uris) == sorted([f"img-{i}" for i in range(10)] + own)  # no commit lost
    assert tables.committed(url, "run-1", options)


def test_azure_wrong_key_is_refused_naming_the_fix(azure_container, monkeypatch):
    """Azurite answers a wrong key with 403 AuthorizationFailure, a refusal (AccessDenied); Azure
    itself answers AuthenticationFailed, NoCredentials (see the translation test below)."""
    from adlfs import AzureBlobFileSystem

    from tests.conftest import AZURITE_KEY

    good = storage.url_to_fs(f"az://{azure_container}")[0].connection_string
    wrong_key = AZURITE_KEY[:-8] + "AAAAAAA="
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", good.replace(AZURITE_KEY, wrong_key))
    AzureBlobFileSystem.clear_instance_cache()

    with pytest.raises(AccessDenied, match="AZURE_STORAGE_CONNECTION_STRING") as refused:
        storage.write_bytes_atomic(b"x", f"az://{azure_container}/out/x.json")
    assert f"az://{azure_container}/out/x.json" in str(refused.value)
    assert not errors.is_transient(refused.value)


def test_s3_wrong_key_is_no_credentials(s3_root, moto_endpoint):
    from tests.test_listing import _set_moto_auth

    _set_moto_auth(moto_endpoint, "0")
    try:
        bad = {"key": "AKIAWRONG", "secret": "wrong", "endpoint_url": moto_endpoint}
        with pytest.raises(NoCredentials, match="AWS_ACCESS_KEY_ID"):
            storage.write_bytes_atomic(b"x", f"{s3_root}/out/x.json", bad)
    finally:
        _set_moto_auth(moto_endpoint, "inf")


def _gcs_http_error(code: int):
    from gcsfs.retry import HttpError

    return HttpError({"code": code, "message": f"status {code}"})


def _azure_error(name: str, status: int | None = None, error_code: str | None = None):
    import azure.core.exceptions as azure

    error = getattr(azure, name)(message=f"{name} {status}")
    error.status_code = status
    error.error_code = error_code
    return error


def _s3_error(code: str, status: int):
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {
        "HTTPStatusCode": status}}  # fmt: skip
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("url", "make", "kind"),
    [
        ("gs://b/k", lambda: _gcs_http_error(503), Transient),
        ("gs://b/k", lambda: _gcs_http_error(429), Transient),
        ("gs://b/k", lambda: _gcs_http_error(401), NoCredentials),
        ("gs://b/k", lambda: _gcs_http_error(403), AccessDenied),
        ("gs://b/k", lambda: _gcs_http_error(400), StorageError),
        (
            "az://c/k",
            lambda: _azure_error("ClientAuthenticationError", 403, "AuthenticationFailed"),
            NoCredentials,
        ),  # fmt: skip
        (
            "az://c/k",
            lambda: _azure_error("ClientAuthenticationError", 403, "AuthorizationFailure"),
            AccessDenied,
        ),  # fmt: skip
        ("az://c/k", lambda: _azure_error("HttpResponseError", 403), AccessDenied),
        ("az://c/k", lambda: _azure_error("HttpResponseError", 503), Transient),
        ("az://c/k", lambda: _azure_error("ServiceRequestError"), Transient),
        (
            "az://c/k",
            lambda: _azure_error("ResourceNotFoundError", 404, "ContainerNotFound"),
            MissingBucketError,
        ),  # fmt: skip
        ("az://c/k", lambda: _azure_error("ResourceNotFoundError", 404, "BlobNotFound"), NotFound),
        ("s3://b/k", lambda: _s3_error("SlowDown", 503), Transient),
        ("s3://b/k", lambda: _s3_error("NoSuchBucket", 404), MissingBucketError),
        ("s3://b/k", lambda: _s3_error("InvalidAccessKeyId", 403), NoCredentials),
        ("s3://b/k", lambda: _s3_error("AccessDenied", 403), AccessDenied),
        ("/tmp/x", lambda: ConnectionResetError(104, "reset"), Transient),
        ("/tmp/x", lambda: PermissionError(13, "denied"), AccessDenied),
    ],
)
def test_each_store_translates_its_library_errors_into_kinds(url, make, kind):
    translated = stores.store_for(url).translate(make(), url, "write")

    assert type(translated) is kind
    assert url in str(translated)
    assert errors.is_transient(translated) == (kind is Transient)


def test_one_is_transient_reads_the_kind():
    assert errors.is_transient(Transient("s3://b: 503"))
    assert not errors.is_transient(NotFound("s3://b/k: not found"))
    assert not errors.is_transient(StorageError("s3://b: unknown"))
    assert not errors.is_transient(OutputBusyError("busy"))
    assert errors.is_transient(RuntimeError("not inmap's: a bug or an outage elsewhere"))


def test_each_store_gives_delta_rs_the_same_location_and_identity(monkeypatch):
    from tests.conftest import AZURITE_KEY, azurite_connection_string

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    gcs = tables.delta_options({}, "gs://b/out")
    key = json.loads(gcs["google_service_account_key"])
    assert key["gcs_base_url"] == "http://127.0.0.1:4443" and key["disable_oauth"] is True
    assert gcs["allow_http"] == "true"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert tables.delta_options({}, "gs://b/out") == {}  # credentials from the environment

    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azurite_connection_string("http://127.0.0.1:1/acct")
    )
    monkeypatch.delenv("AZURITE_BLOB_STORAGE_URL", raising=False)
    assert tables.delta_options({}, "az://c/out") == {
        "azure_storage_account_name": "devstoreaccount1",
        "azure_storage_account_key": AZURITE_KEY,
        "azure_storage_endpoint": "http://127.0.0.1:1/acct",
        "allow_http": "true",
    }
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", "http://127.0.0.1:1")
    assert tables.delta_options({}, "az://c/out")["azure_storage_use_emulator"] == "true"
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.delenv("AZURITE_BLOB_STORAGE_URL")
    assert tables.delta_options({"account_name": "acct"}, "abfs://c/out") == {
        "azure_storage_account_name": "acct"
    }
    assert tables.delta_options({"anon": True}, "/tmp/out") is None
    assert tables.delta_options({"anon": True}, "s3://b/out")["AWS_SKIP_SIGNATURE"] == "true"


def test_storage_options_and_block_credentials_merge_deeply_once():
    user = {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"endpoint_url": "http://e"}}
    block = {"key": "AKID", "secret": "s", "client_kwargs": {"region_name": "eu-west-1"}}

    merged = merge_options(user, block)

    assert merged["client_kwargs"] == {"endpoint_url": "http://e", "region_name": "eu-west-1"}
    assert merged["key"] == "AKID" and merged["endpoint_url"] == "http://127.0.0.1:9000"
    assert user["client_kwargs"] == {"endpoint_url": "http://e"}  # inputs untouched
    assert merge_options(None, None) is None


# --- end to end: the inmap flow, as tests/test_s3.py runs it on S3 ------------------------------


def _upload_drop(source: str, images, count: int) -> None:
    for path in images[:count]:
        storage.write_bytes_atomic(path.read_bytes(), f"{source}/2026-11-28/{path.name}")
    storage.write_bytes_atomic(images[0].read_bytes()[:3000], f"{source}/2026-11-28/torn.jpeg")
    storage.write_bytes_atomic(b"", f"{source}/2026-11-28/empty.jpg")


def _label(source: str, classes: str, output: str):
    from flows.inmap_flow import inmap_flow

    return inmap_flow(
        source=source,
        classes=classes,
        output=output,
        model="inmap-tiny",
        pretrained=None,
        device="cpu",
        shard_size=4,
    )


def _read(table: str) -> pa.Table:
    from deltalake import DeltaTable

    options = tables.delta_options(None, table)
    return DeltaTable(tables.table_uri(table), storage_options=options).to_pyarrow_table()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("source_store", "output_store"), [("gs", "gs"), ("az", "az"), ("gs", "az"), ("az", "gs")]
)
def test_a_drop_is_labelled_from_and_into_gcs_and_azure(
    source_store, output_store, request, real_images
):
    places = {
        "gs": lambda: f"gs://{request.getfixturevalue('gcs_bucket')}",
        "az": lambda: f"az://{request.getfixturevalue('azure_container')}",
    }
    source_root = places[source_store]()
    output_root = source_root if output_store == source_store else places[output_store]()
    source, output = f"{source_root}/drops", f"{output_root}/inmap"
    _upload_drop(source, real_images, 6)
    classes = f"{source_root}/classes.txt"
    storage.write_bytes_atomic(b"tench\ngoldfish\nshark\nbird\nfrog\n", classes)

    [summary] = _label(source, classes, output)

    assert (summary.embedded, summary.failed, summary.predicted) == (6, 2, 6)
    predictions = _read(f"{output}/predictions")
    assert predictions.num_rows == 6
    assert all(uri.startswith(f"{source}/2026-11-28/") for uri in predictions["uri"].to_pylist())
    keys = zip(predictions["uri"].to_pylist(), predictions["etag"].to_pylist(), strict=True)
    assert len(set(keys)) == 6
    errors_table = _read(f"{output}/errors")
    assert sorted(uri.rsplit("/", 1)[1] for uri in errors_table["uri"].to_pylist()) == [
        "empty.jpg",
        "torn.jpeg",
    ]
    assert storage.read_bytes(f"{source}/2026-11-28/empty.jpg") == b""  # sources untouched

    [again] = _label(source, classes, output)  # nothing new: nothing embedded or labelled
    assert (again.embedded, again.predicted) == (0, 0)
    assert _read(f"{output}/predictions").num_rows == 6


def test_an_azure_connection_string_is_a_secret_refused_as_a_parameter():
    from inmap.credentials import refuse_secrets

    with pytest.raises(errors.CredentialsRefusedError, match="connection_string"):
        refuse_secrets({"connection_string": "AccountName=a;AccountKey=k", "account_name": "a"})
    assert refuse_secrets({"account_name": "a", "endpoint_url": "http://e"})
