"""Security: secrets never reach Prefect or the output, nothing is pickled, a model is known by
the content of its weights, and broken links are recorded rather than skipped.

Secrets. Every test makes its own markers (a key id "AKIAMARKER<10 random>", a secret
"SECRETMARKER-<uuid>"), so tests that share a server never see one another's. What is asserted:
- the marker secret appears nowhere: in no file under PREFECT_HOME (the sqlite database with its
  -wal/-shm files, storage/, logs), in no API payload (flow runs, task runs, deployments, logs,
  artifacts, variables, events, and block documents as read without include_secrets), in no
  process's stdout/stderr (server, serve, the flow-run processes it starts, the CLI,
  `prefect deployment run --watch`), and in no object or file under the output (Parquet files are
  decoded too, since a compressed page would hide a plain byte search);
- the marker key id is not a secret in prefect-aws (AwsCredentials.aws_access_key_id is a plain
  str): the block document read through the API shows it, and so does the event Prefect's server
  emits when the block is saved (prefect.block-document.created carries the document's non-secret
  fields, in the events API and the database's events table). It must appear nowhere else: not in
  any other database row (the block document's own row is encrypted), flow-run or deployment
  parameters, logs, other events, process output or the output. With credentials from the
  environment there is no block, and the key id must appear nowhere at all.
A secret the user puts into a run's parameters themselves (`inmap_flow(storage_options=...)`,
`prefect deployment run --params`) is refused by inmap, but Prefect has stored the parameters by
then: see test_secret_in_deployment_run_parameters_never_reaches_prefects_database.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
import warnings
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.conftest import (
    REPO_ROOT,
    api_request,
    free_port,
    http_ok,
    one_row_per_image,
    read_delta,
    wait_for,
)

BLOCK = "test-s3"
DEPLOYMENT = "inmap/label-bucket"
TINY = {"model": "inmap-tiny", "pretrained": None, "device": "cpu"}
TINY_CLI = ["--model", "inmap-tiny", "--pretrained", "none", "--device", "cpu", "--iters", "50"]
SAFE_WAYS = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "--credentials-block", "credentials_block")


def new_markers() -> tuple[str, str]:
    """(key id, secret): unique to the calling test."""
    return f"AKIAMARKER{uuid.uuid4().hex[:10].upper()}", f"SECRETMARKER-{uuid.uuid4()}"


# --- where a secret could end up -----------------------------------------------------------------


def variants(marker: str) -> list[bytes]:
    """The marker as bytes, and the part of its base64 encoding fixed at each alignment."""
    raw = marker.encode()
    found = [raw]
    for pad in (b"", b"x", b"xy"):
        encoded = base64.b64encode(pad + raw)
        found.append(encoded[4 if pad else 0 : -4])
    return found


def places_with(marker: str, places: dict[str, bytes]) -> list[str]:
    needles = variants(marker)
    return sorted(name for name, data in places.items() if any(n in data for n in needles))


def files_under(root: Path, label: str) -> dict[str, bytes]:
    """Every file under `root` (Parquet files with their decoded values appended)."""
    return {
        f"{label}/{path.relative_to(root)}": readable(path.name, path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def bucket_objects(fs: s3fs.S3FileSystem, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, read back (Parquet decoded too)."""
    return {f"s3://{key}": readable(key, fs.cat(key)) for key in sorted(fs.find(bucket))}


def readable(name: str, data: bytes) -> bytes:
    if not name.endswith(".parquet"):
        return data
    return data + b"\n" + b"\n".join(parquet_values(data))


def parquet_values(data: bytes) -> list[bytes]:
    """Schema metadata and every string or binary value of a Parquet file, as bytes."""
    table = pq.read_table(io.BytesIO(data))
    values = [k + b"=" + v for k, v in (table.schema.metadata or {}).items()]
    for column in table.columns:
        values += _leaf_bytes(column.combine_chunks() if column.num_chunks else pa.array([]))
    return values


def _leaf_bytes(array: pa.Array) -> list[bytes]:
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaf_bytes(array.flatten())
    if pa.types.is_struct(kind):
        return [v for i in range(kind.num_fields) for v in _leaf_bytes(array.field(i))]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [v.encode() for v in array.to_pylist() if v is not None]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return [v for v in array.to_pylist() if v is not None]
    return []


def api(env: dict, method: str, path: str, body: object = None) -> object:
    url = path if path.startswith("http") else env["PREFECT_API_URL"] + path
    return api_request(url, method, body)


def _every_page(env: dict, path: str, body: dict | None = None) -> list:
    rows, offset = [], 0
    while True:
        page = api(env, "POST", path, {**(body or {}), "limit": 200, "offset": offset})
        rows += page
        if len(page) < 200:
            return rows
        offset += 200


def api_payloads(env: dict) -> dict[str, bytes]:
    """What anyone with access to the API can read (block documents without include_secrets)."""
    payloads = {}
    for name in ("flow_runs", "task_runs", "deployments", "logs", "artifacts", "variables"):
        payloads[f"POST /api/{name}/filter"] = json.dumps(_every_page(env, f"/{name}/filter"))
    documents = _every_page(env, "/block_documents/filter")
    payloads["POST /api/block_documents/filter"] = json.dumps(documents)
    for document in documents:
        one = api(env, "GET", f"/block_documents/{document['id']}")
        payloads[f"GET /api/block_documents/{document['id']}"] = json.dumps(one)
    events, page = [], api(env, "POST", "/events/filter", {"limit": 50})
    while True:
        events += page["events"]
        if not page.get("next_page"):
            break
        page = api(env, "GET", page["next_page"])
    for event in events:
        payloads[f"event {event['event']} {event['id']}"] = json.dumps(event)
    return {name: text.encode() for name, text in payloads.items()}


def database_rows(home: Path) -> dict[str, bytes]:
    """Every row of Prefect's database, read through sqlite (so the WAL is included), labelled
    by table (and by event name for the events table)."""
    rows = {}
    with closing(sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        tables = [t for (t,) in db.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            for number, row in enumerate(db.execute(f'select * from "{table}"')):
                label = f"prefect.db {table} row {number}"
                if table == "events":
                    label = f"prefect.db events row {number} ({row['event']})"
                rows[label] = repr(tuple(row)).encode()
    return rows


def is_block_document(place: str) -> bool:
    """The block document itself, or the events Prefect emits about one (which carry its
    non-secret fields)."""
    return "/block_documents" in place or "prefect.block-document." in place


# --- processes and servers -----------------------------------------------------------------------


@dataclass
class Processes:
    """Every process a test starts, and where its stdout/stderr went."""

    logs: Path
    outputs: dict[str, Path] = field(default_factory=dict)

    def _log(self, name: str) -> Path:
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"{len(self.outputs):02d}-{name}.log"
        self.outputs[name] = path
        return path

    def run(self, name: str, args: list[str], env: dict, timeout: float = 500):
        completed = subprocess.run(
            args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
        )
        self._log(name).write_text(
            f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
        )
        return completed

    @contextmanager
    def started(self, name: str, args: list[str], env: dict):
        log = open(self._log(name), "w")
        process = subprocess.Popen(
            args, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield process
        finally:
            stop(process)
            log.close()

    def output_of(self) -> dict[str, bytes]:
        return {f"output of {name}": path.read_bytes() for name, path in self.outputs.items()}


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def without_aws_credentials(env: dict) -> dict:
    """`env` with no AWS credentials at all: no keys, no profile, no files, no instance role."""
    env = {k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_DEFAULT_REGION"}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@contextmanager
def prefect_server_at(home: Path, processes: Processes):
    """`prefect server start` with PREFECT_HOME at `home`; yields the env of its clients."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": "",
    }
    args = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(port), "--no-ui", "--analytics-off"]  # fmt: skip
    with processes.started("prefect server", args, env) as server:
        api_url = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: http_ok(f"{api_url}/health"), 120, "prefect server", server)
        yield {**env, "PREFECT_API_URL": api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}


@contextmanager
def serving(env: dict, processes: Processes):
    """`python -m deployments.serve --cron ''` until the three deployments are registered."""
    args = [sys.executable, "-m", "deployments.serve", "--cron", ""]
    with processes.started("deployments.serve", args, env) as serve:

        def registered() -> bool:
            names = {d["name"] for d in api(env, "POST", "/deployments/filter", {})}
            return {"label-bucket", "backfill", "maintain"} <= names

        wait_for(registered, 180, "deployments to be served", serve)
        yield serve


def run_deployment(processes: Processes, name: str, env: dict, params: dict):
    """`prefect deployment run inmap/label-bucket --params ... --watch`, and its flow run."""
    args = [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT,
            "--params", json.dumps(params), "--watch"]  # fmt: skip
    completed = processes.run(name, args, env)
    found = re.search(r"UUID: ([0-9a-f-]{36})", completed.stdout)
    assert found, completed.stdout + completed.stderr
    return completed, api(env, "GET", f"/flow_runs/{found.group(1)}")


def label_cli(processes: Processes, name: str, env: dict, *args: str):
    return processes.run(
        name, [sys.executable, "-m", "inmap.cli", "label", *args, *TINY_CLI, "--no-progress"], env
    )


def upload_drop(fs: s3fs.S3FileSystem, bucket: str, real_images, count: int = 4) -> None:
    for path in real_images[:count]:
        fs.pipe(f"{bucket}/incoming/{path.name}", path.read_bytes())
    fs.pipe(f"{bucket}/classes.txt", b"fish\nbird\nreptile\n")


@dataclass
class Served:
    """A Prefect server, and deployments.serve with no AWS credentials in its environment; the
    AwsCredentials block BLOCK holds `key_id` and `secret`."""

    env: dict
    home: Path
    processes: Processes
    key_id: str
    secret: str


@pytest.fixture(scope="class")
def served(tmp_path_factory, moto_endpoint):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials

    root = tmp_path_factory.mktemp("served")
    processes = Processes(root / "logs")
    key_id, secret = new_markers()
    with prefect_server_at(root / "prefect-home", processes) as env:
        env = without_aws_credentials(env)
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            credentials = AwsCredentials(aws_access_key_id=key_id, aws_secret_access_key=secret)
            credentials.save(BLOCK, overwrite=True)
        with serving(env, processes):
            yield Served(env, root / "prefect-home", processes, key_id, secret)


def secret_everywhere(
    env: dict, home: Path, processes: Processes, outputs: dict[str, bytes]
) -> dict[str, bytes]:
    """Every place this file checks for a secret: the raw files under PREFECT_HOME, the rows of
    its database, the API, every process's output, and the output."""
    return {
        **files_under(home, "PREFECT_HOME"),
        **database_rows(home),
        **api_payloads(env),
        **processes.output_of(),
        **outputs,
    }


def without_raw_database(places: dict[str, bytes]) -> dict[str, bytes]:
    """`places` less the raw database files, whose rows `database_rows` labels one by one."""
    return {k: v for k, v in places.items() if not re.search(r"/prefect\.db(-wal|-shm)?$", k)}


# --- 1. secrets never enter Prefect --------------------------------------------------------------


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_cli_refuses_secret_storage_options_in_one_line_naming_the_safe_ways(tmp_path, shape):
    key_id, secret = new_markers()
    options = (
        {"key": key_id, "secret": secret}
        if shape == "flat"
        else {"client_kwargs": {"aws_secret_access_key": secret}}
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    completed = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "label", str(tmp_path / "src"), "--classes", "c.txt",
         "--output", str(tmp_path / "out"), "--storage-options", json.dumps(options)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith("inmap: error: storage_options hold secret field(s) ")
    expected = "key, secret" if shape == "flat" else "client_kwargs.aws_secret_access_key"
    assert expected in line and all(way in line for way in SAFE_WAYS)
    everything = completed.stdout + completed.stderr
    assert secret not in everything and key_id not in everything
    assert not (tmp_path / "out").exists()
    home = tmp_path / "prefect-home"
    assert places_with(secret, files_under(home, "PREFECT_HOME") if home.exists() else {}) == []


@pytest.mark.usefixtures("prefect_harness")
def test_flow_refuses_secret_storage_options_before_any_work(tmp_path):
    from flows.inmap_flow import inmap_flow
    from inmap.errors import CredentialsRefusedError

    key_id, secret = new_markers()
    # The source does not exist: had anything been listed first, the error would say so.
    with pytest.raises(CredentialsRefusedError) as refused:
        inmap_flow(
            source=str(tmp_path / "no-such-source"),
            classes=["fish", "bird"],
            output=str(tmp_path / "out"),
            storage_options={"key": key_id, "secret": secret},
            **TINY,
        )
    message = str(refused.value)
    assert "storage_options hold secret field(s) key, secret" in message
    assert all(way in message for way in SAFE_WAYS)
    assert secret not in message and key_id not in message
    assert not (tmp_path / "out").exists()


def _block_id(env: dict) -> str:
    [document] = [d for d in api(env, "POST", "/block_documents/filter", {}) if d["name"] == BLOCK]
    return document["id"]


@pytest.mark.slow
class TestServedWithACredentialsBlock:
    """Deployments served by a process with no AWS credentials; the block holds them."""

    def test_serve_refuses_secret_storage_options_and_stores_nothing(self, served, moto_endpoint):
        key_id, secret = new_markers()
        options = {"endpoint_url": moto_endpoint, "key": key_id, "secret": secret}
        completed = served.processes.run(
            "refused serve",
            [sys.executable, "-m", "deployments.serve", "--cron", "", "--storage-options",
             json.dumps(options)],
            served.env,
            timeout=180,
        )  # fmt: skip
        assert completed.returncode != 0
        # One line, no traceback.
        assert completed.stderr.startswith(
            "deployments.serve: error: storage_options hold secret field(s) key, secret"
        )
        assert "Traceback" not in completed.stderr and len(completed.stderr.splitlines()) == 1
        everywhere = secret_everywhere(served.env, served.home, served.processes, {})
        assert places_with(secret, everywhere) == []
        assert places_with(key_id, everywhere) == []

    def test_a_deployment_run_with_a_secret_parameter_is_refused_before_it_is_stored(
        self, served, s3_bucket, s3_storage_options, moto_endpoint, real_images
    ):
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
        upload_drop(fs, s3_bucket, real_images)
        _, secret = new_markers()
        params = {
            "source": f"s3://{s3_bucket}/incoming",
            "classes": f"s3://{s3_bucket}/classes.txt",
            "output": f"s3://{s3_bucket}/inmap",
            **TINY,
            "storage_options": {"endpoint_url": moto_endpoint, "secret": secret},
            "credentials_block": BLOCK,
        }
        args = [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT,
                "--params", json.dumps(params)]  # fmt: skip
        completed = served.processes.run("secret params", args, served.env)
        # The deployment's parameter schema forbids secret option names: the server refuses to
        # create the run, so nothing is stored and nothing runs.
        assert completed.returncode != 0
        assert "storage_options" in completed.stdout + completed.stderr
        assert not fs.exists(f"{s3_bucket}/inmap"), "refused before any work"
        runs = api(served.env, "POST", "/flow_runs/filter", {"limit": 200})
        assert secret not in json.dumps(runs)

    def test_secret_in_deployment_run_parameters_never_reaches_prefects_database(
        self, served, s3_bucket, moto_endpoint
    ):
        _, secret = new_markers()
        params = {
            "source": f"s3://{s3_bucket}/incoming",
            "classes": ["fish", "bird"],
            "output": f"s3://{s3_bucket}/inmap",
            **TINY,
            "storage_options": {"endpoint_url": moto_endpoint, "secret": secret},
        }
        args = [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT,
                "--params", json.dumps(params)]  # fmt: skip
        refused = served.processes.run("secret params (stored?)", args, served.env)
        assert refused.returncode != 0
        stored = {**files_under(served.home, "PREFECT_HOME"), **api_payloads(served.env)}
        assert places_with(secret, stored) == []

    def test_credentials_block_labels_s3_and_its_secrets_go_nowhere(
        self,
        served,
        s3_bucket,
        s3_storage_options,
        s3_endpoint_options,
        moto_endpoint,
        real_images,
    ):
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
        upload_drop(fs, s3_bucket, real_images)
        env, processes = served.env, served.processes
        # Without the block, these processes have no way to reach the bucket.
        probe = processes.run(
            "no-credentials probe",
            [sys.executable, "-c", "import s3fs, sys; "
             f"s3fs.S3FileSystem(endpoint_url={moto_endpoint!r}).ls(sys.argv[1])", s3_bucket],
            env, timeout=120,
        )  # fmt: skip
        assert probe.returncode != 0 and "NoCredentialsError" in probe.stderr

        endpoint = json.dumps(s3_endpoint_options)
        cli = label_cli(
            processes, "inmap label --credentials-block", env, f"s3://{s3_bucket}/incoming",
            "--classes", f"s3://{s3_bucket}/classes.txt", "--output", f"s3://{s3_bucket}/by-cli",
            "--storage-options", endpoint, "--credentials-block", BLOCK,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "4 predicted, 4 embedded" in cli.stdout

        params = {
            "source": f"s3://{s3_bucket}/incoming",
            "classes": f"s3://{s3_bucket}/classes.txt",
            "output": f"s3://{s3_bucket}/by-deployment",
            **TINY,
            "storage_options": s3_endpoint_options,
            "credentials_block": BLOCK,
        }
        completed, flow_run = run_deployment(processes, "credentials_block run", env, params)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        for output in ("by-cli", "by-deployment"):
            predictions = read_delta(f"s3://{s3_bucket}/{output}/predictions", s3_storage_options)
            assert predictions.height == 4 and one_row_per_image(predictions)
        # A run that fails after loading the block (a missing bucket) records its failure with it.
        missing = {**params, "source": f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/incoming"}
        _, failed_run = run_deployment(processes, "failing block run", env, missing)
        assert failed_run["state"]["type"] == "FAILED"
        assert "does not exist" in failed_run["state"]["message"]
        runs = read_delta(f"s3://{s3_bucket}/by-deployment/runs", s3_storage_options)
        assert sorted(runs["status"].to_list()) == ["completed", "failed"]

        everywhere = secret_everywhere(env, served.home, processes, bucket_objects(fs, s3_bucket))
        assert places_with(served.secret, everywhere) == []
        # The key id is not a secret in prefect-aws: the block document shows it, and so do the
        # events Prefect emits about the document (prefect.block-document.created); nowhere else.
        shown = places_with(served.key_id, without_raw_database(everywhere))
        assert shown and all(is_block_document(place) for place in shown), shown
        document = json.loads(everywhere[f"GET /api/block_documents/{_block_id(env)}"])
        assert document["data"]["aws_secret_access_key"] == "********"
        for run in (flow_run, failed_run):
            assert run["parameters"]["credentials_block"] == BLOCK


@pytest.mark.slow
def test_environment_credentials_label_s3_and_go_nowhere(
    tmp_path, s3_bucket, s3_storage_options, s3_endpoint_options, real_images
):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    upload_drop(fs, s3_bucket, real_images)
    key_id, secret = new_markers()
    processes = Processes(tmp_path / "logs")
    home = tmp_path / "prefect-home"
    with prefect_server_at(home, processes) as server_env:
        # The serving and CLI processes have the credentials in their environment (moto accepts
        # any); the run's parameters never do.
        env = {**without_aws_credentials(server_env),
               "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}  # fmt: skip
        endpoint = json.dumps(s3_endpoint_options)
        cli = label_cli(
            processes, "inmap label (env credentials)", env, f"s3://{s3_bucket}/incoming",
            "--classes", f"s3://{s3_bucket}/classes.txt", "--output", f"s3://{s3_bucket}/by-cli",
            "--storage-options", endpoint,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr
        params = {
            "source": f"s3://{s3_bucket}/incoming",
            "classes": f"s3://{s3_bucket}/classes.txt",
            "output": f"s3://{s3_bucket}/by-deployment",
            **TINY,
            "storage_options": s3_endpoint_options,
        }
        with serving(env, processes):
            completed, _ = run_deployment(processes, "env credentials run", env, params)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        for output in ("by-cli", "by-deployment"):
            predictions = read_delta(f"s3://{s3_bucket}/{output}/predictions", s3_storage_options)
            assert predictions.height == 4
        everywhere = secret_everywhere(server_env, home, processes, bucket_objects(fs, s3_bucket))
    assert places_with(secret, everywhere) == []
    assert places_with(key_id, everywhere) == []


def attached_job(secret: str):
    from inmap.job import Job
    from inmap.model import resolve_model

    job = Job(source="s3://bucket/drop", output="s3://bucket/out", classes=("cat", "dog"),
              model=resolve_model("inmap-tiny", None, "cpu"), run_id="r")  # fmt: skip
    return job.with_credentials({"key": "AKIAMARKER0000000000", "secret": secret})


def test_job_credentials_never_pickle():
    _, secret = new_markers()
    job = attached_job(secret)
    assert job.options["secret"] == secret
    data = pickle.dumps(job)
    assert secret.encode() not in data and pickle.loads(data).credentials is None


def test_job_credentials_never_reach_prefect_as_a_subflow_parameter():
    from flows.inmap_flow import label_partition

    _, secret = new_markers()
    stored = json.dumps(label_partition.serialize_parameters({"job": attached_job(secret)}))
    assert "s3://bucket/drop" in stored and secret not in stored


# --- 2. no pickle --------------------------------------------------------------------------------

PICKLE_STARTS = (b"\x80\x04\x95", b"\x80\x05\x95")
BASE64_PICKLE_STARTS = (b"gASV", b"gAWV")
BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def is_pickle(data: bytes) -> bool:
    """A complete, well-formed pickle starts at data[0] (checked by pickletools, never loaded):
    every opcode parses, the stack and memo stay consistent, and STOP ends it."""
    try:
        pickletools.dis(data, out=io.StringIO())
    except Exception:
        return False
    return True


def pickles_in(places: dict[str, bytes]) -> list[str]:
    """'place @offset' of each real pickle stream, raw or base64, in `places`."""
    found = []
    for name, data in places.items():
        for start in PICKLE_STARTS:
            for hit in re.finditer(re.escape(start), data):
                if is_pickle(data[hit.start() :]):
                    found.append(f"{name} @{hit.start()}")
        for start in BASE64_PICKLE_STARTS:
            for hit in re.finditer(re.escape(start), data):
                body = BASE64_RUN.match(data, hit.start()).group().rstrip(b"=")
                body = body[: len(body) - (len(body) % 4 == 1)]
                decoded = base64.b64decode(body + b"=" * (-len(body) % 4))
                if is_pickle(decoded):
                    found.append(f"{name} @{hit.start()} (base64)")
    return found


def test_pickle_scanner_finds_planted_pickles_and_ignores_lookalikes(tmp_path):
    random_bytes = os.urandom(4096)
    real = pickle.dumps({"planted": [1, 2.5, "x"]}, protocol=4)
    (tmp_path / "blob.bin").write_bytes(random_bytes + real + random_bytes)
    encoded = base64.b64encode(pickle.dumps(("planted", 5), protocol=5)).decode()
    (tmp_path / "state.json").write_text(json.dumps({"data": encoded, "type": "pickle"}))
    # Look-alikes: the 3-byte start in random data, and a truncated pickle.
    (tmp_path / "vectors.f16").write_bytes(random_bytes + b"\x80\x04\x95" + random_bytes)
    (tmp_path / "cut.bin").write_bytes(real[: len(real) // 2])
    assert is_pickle(real) and not is_pickle(real[:-1])

    found = pickles_in(files_under(tmp_path, "tmp"))

    assert found == [f"tmp/blob.bin @{len(random_bytes)}", "tmp/state.json @10 (base64)"]


@pytest.mark.slow
def test_no_pickle_under_prefect_home_or_the_output_after_good_and_failing_runs(
    prefect_server, image_folder, tmp_path
):
    processes = Processes(tmp_path / "logs")
    output = tmp_path / "out"
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\nbird\ndog\n")
    common = ["--classes", str(classes), "--output", str(output)]
    good = label_cli(processes, "good run", prefect_server, str(image_folder), *common)
    assert good.returncode == 0, good.stdout + good.stderr
    missing = label_cli(
        processes, "missing source", prefect_server, str(tmp_path / "gone"), *common
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr
    # Failures inside tasks, past the command line's own checks (which refuse both at once).
    for what, source, classes_list, error in [
        ("duplicate classes", image_folder, ["cat", "dog", "cat"], "ClassesError"),
        ("missing source", tmp_path / "gone", ["cat", "dog"], "SourceNotFoundError"),
    ]:
        script = (
            "import sys\nfrom flows.inmap_flow import inmap_flow\n"
            f"inmap_flow(source={str(source)!r}, classes={classes_list!r}, "
            f"output={str(output)!r}, model='inmap-tiny', pretrained=None, device='cpu')"
        )
        failed = processes.run(what, [sys.executable, "-c", script], prefect_server)
        assert failed.returncode != 0 and error in failed.stderr, failed.stderr[-2000:]
    states = [r["state"]["type"] for r in api(prefect_server, "POST", "/flow_runs/filter", {})]
    assert states.count("COMPLETED") >= 2 and states.count("FAILED") >= 2, states

    home = Path(prefect_server["PREFECT_HOME"])
    places = {**files_under(home, "PREFECT_HOME"), **files_under(output, "output")}
    assert any(name.endswith(".parquet") for name in places)
    assert pickles_in({**places, **api_payloads(prefect_server)}) == []


# --- 3. model identity is content ----------------------------------------------------------------

CLASSES = ["fish", "bird", "dog", "car", "food"]


def five_images(tmp_path: Path, real_images) -> Path:
    folder = tmp_path / "five"
    folder.mkdir()
    for path in real_images[:: len(real_images) // 5][:5]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture
def checkpoint_cache(tmp_path, monkeypatch):
    """The checkpoint sha256 cache in a fresh XDG_CACHE_HOME."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.mark.usefixtures("prefect_harness", "checkpoint_cache")
def test_a_checkpoint_replaced_at_the_same_path_re_embeds_and_relabels_everything(
    tmp_path, real_images
):
    import numpy as np
    import torch

    from flows.inmap_flow import inmap_flow
    from inmap.encoder import RandomWeightsWarning, load_encoder
    from inmap.learning import load_proxy
    from inmap.model import file_sha256
    from inmap.schemas import embedding_matrix, json_metadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        tiny = load_encoder("inmap-tiny", None, device="cpu")
    weights = tmp_path / "weights.pt"
    torch.save(tiny.model.state_dict(), weights)
    source, output = five_images(tmp_path, real_images), tmp_path / "out"
    params = {"source": str(source), "classes": CLASSES, "output": str(output),
              "model": "inmap-tiny", "pretrained": str(weights), "device": "cpu"}  # fmt: skip
    [first] = inmap_flow(**params)
    assert (first.embedded, first.predicted) == (5, 5)

    generator = torch.Generator().manual_seed(1)
    torch.save(
        {name: value + 0.05 * torch.randn(value.shape, generator=generator)
         if value.is_floating_point() else value
         for name, value in tiny.model.state_dict().items()},
        weights,
    )  # fmt: skip
    [second] = inmap_flow(**params)

    assert (second.embedded, second.cached, second.predicted) == (5, 0, 5)
    assert second.weights_id == f"sha256:{file_sha256(str(weights))}" != first.weights_id
    assert second.labelset != first.labelset and second.proxy_id != first.proxy_id
    model_dirs = sorted(p for p in (output / "embeddings").iterdir() if p.is_dir())
    assert len(model_dirs) == 2
    shards = {d: pq.read_table(next(d.glob("*.parquet"))) for d in model_dirs}
    by_weights = {json_metadata(t.schema)["weights_id"]: t for t in shards.values()}
    assert set(by_weights) == {first.weights_id, second.weights_id}
    old, new = (embedding_matrix(by_weights[s.weights_id]) for s in (first, second))
    assert not np.allclose(old, new, atol=1e-3), "the new weights embedded anew"

    predictions = read_delta(output / "predictions")
    newest = predictions.filter(predictions["labelset"] == second.labelset)
    assert newest.height == 5 and set(newest["proxy_id"]) == {second.proxy_id}
    assert set(newest["run_id"]) == {second.run_id}
    proxy = load_proxy(str(output / "proxies" / f"{second.proxy_id}.parquet"))
    metadata = json_metadata(pq.read_schema(output / "proxies" / f"{second.proxy_id}.parquet"))
    assert metadata["weights_id"] == second.weights_id and proxy.n_images == 5


@pytest.mark.usefixtures("checkpoint_cache")
def test_a_checkpoint_replaced_with_its_size_and_mtime_kept_is_still_known_by_its_bytes(
    tmp_path,
):
    import torch

    from inmap.encoder import RandomWeightsWarning, load_encoder
    from inmap.model import resolve_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        state = load_encoder("inmap-tiny", None, device="cpu").model.state_dict()
    weights, staged = tmp_path / "weights.pt", tmp_path / "staging" / "weights.pt"
    staged.parent.mkdir()
    torch.save(state, weights)
    first = resolve_model("inmap-tiny", str(weights), "cpu")
    before = weights.stat()
    perturbed = copy.deepcopy(state)  # keeps shared storages shared, so the size is the same
    for value in perturbed.values():
        if value.is_floating_point():
            value.add_(0.05)
    torch.save(perturbed, staged)
    os.utime(staged, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` would
    os.replace(staged, weights)
    assert weights.stat().st_size == before.st_size
    assert weights.stat().st_mtime_ns == before.st_mtime_ns

    second = resolve_model("inmap-tiny", str(weights), "cpu")

    assert second.weights_id != first.weights_id and second.key != first.key


@pytest.mark.usefixtures("prefect_harness")
def test_no_weights_spelled_none_or_as_a_string_share_one_embedding_cache(tmp_path, real_images):
    from flows.inmap_flow import inmap_flow

    source, output = five_images(tmp_path, real_images), tmp_path / "out"
    params = {"source": str(source), "classes": CLASSES, "output": str(output),
              "model": "inmap-tiny", "device": "cpu"}  # fmt: skip
    [first] = inmap_flow(**params, pretrained=None)
    [second] = inmap_flow(**params, pretrained="none")
    assert (first.embedded, second.embedded, second.cached) == (5, 0, 5)
    assert second.labelset == first.labelset and second.predicted == 0
    assert len([p for p in (output / "embeddings").iterdir() if p.is_dir()]) == 1


# --- 4. broken links are error rows --------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_broken_symlinks_named_like_images_become_list_error_rows(tmp_path, real_images):
    from flows.inmap_flow import inmap_flow

    source = tmp_path / "drop"
    source.mkdir()
    for path in real_images[:3]:
        shutil.copy(path, source / path.name)
    (source / "ghost.jpg").symlink_to(source / "deleted.jpg")
    (source / "sub").mkdir()
    (source / "sub" / "loop.png").symlink_to(source / "sub" / "loop.png")
    (source / "notes.txt").symlink_to(source / "nowhere.txt")  # not an image name: not listed

    [summary] = inmap_flow(
        source=str(source), classes=CLASSES, output=str(tmp_path / "out"), **TINY
    )

    assert (summary.listed, summary.predicted, summary.failed) == (3, 3, 2)
    errors = read_delta(tmp_path / "out" / "errors").sort("uri")
    assert errors["uri"].to_list() == [str(source / "ghost.jpg"), str(source / "sub" / "loop.png")]
    assert set(errors["stage"]) == {"list"}
    ghost, loop = errors["error"].to_list()
    assert "broken symbolic link" in ghost and "deleted.jpg" in ghost
    assert "symbolic link loop" in loop
