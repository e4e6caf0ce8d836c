"""inmap on a Dask cluster laid out as an operator runs one: `dask scheduler` and `dask worker`
processes, each in its own working directory with its own Prefect home, a real Prefect server,
and a moto S3 bucket. The command line submits to the cluster with --dask-address.

The workers are not given PREFECT_API_URL: every task must report to the submitting run's API
through the settings it carries, and no worker may start a Prefect server of its own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs

from inmap import cluster
from tests.conftest import (
    REPO_ROOT,
    api_request,
    free_port,
    http_ok,
    prefect_server_command,
    read_delta,
    wait_for,
)

pytestmark = pytest.mark.slow

CLASSES = REPO_ROOT / "examples" / "classes.txt"
# The client claims CUDA (it has none); if it decided the device for the workers, they would be
# told "cuda" and fail, or record it.
CLIENT_CLAIMS_CUDA = (
    "import sys, torch; torch.cuda.is_available = lambda: True; "
    "from inmap.cli import main; sys.exit(main(sys.argv[1:]))"
)


class Processes:
    """Background processes this module started, each in its own session, stopped by pid."""

    def __init__(self, root: Path):
        self.root, self.started = root, {}

    def start(self, name: str, argv: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started[name] = process
        return process

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.started.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:  # it would not stop: take it down
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)

    def stop_all(self) -> None:
        for name in list(self.started):
            self.kill(name, signal.SIGTERM)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


def base_env(home: Path) -> dict:
    (home / "prefect-home").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_"))}
    return {
        **env,
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    started = Processes(tmp_path_factory.mktemp("processes"))
    yield started
    started.stop_all()


@pytest.fixture(scope="module")
def prefect_api(processes, tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    server = processes.start(
        "prefect-server",
        prefect_server_command(port),
        base_env(home),
        home,
    )
    api = f"http://127.0.0.1:{port}/api"
    wait_for(lambda: http_ok(f"{api}/health"), 120, "prefect server", server)
    return api


def start_cluster(processes, root: Path, name: str, workers: dict[str, str], **scheduler_env):
    """A scheduler and workers {name: python}, each in its own directory and Prefect home."""
    scheduler_file = root / f"{name}-scheduler.json"
    env = {**base_env(root / name), **scheduler_env}
    scheduler = processes.start(
        f"{name}-scheduler",
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        ],
        env,
        root / name,
    )
    wait_for(scheduler_file.exists, 60, "dask scheduler", scheduler)
    address = json.loads(scheduler_file.read_text())["address"]
    for worker, python in workers.items():
        processes.start(
            worker,
            [
                python,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--name",
                worker,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
            ],
            base_env(root / worker),
            root / worker,
        )
    return address


def worker_count(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=10) as client:
        return len(client.scheduler_info(n_workers=-1)["workers"])


@pytest.fixture(scope="module")
def dask_cluster(processes, tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes. The scheduler fails tasks that wait 20 s
    without any worker, as an operator may set it (inmap's own bound applies when none is set)."""
    root = tmp_path_factory.mktemp("cluster")
    address = start_cluster(
        processes,
        root,
        "main",
        {"worker-1": sys.executable, "worker-2": sys.executable},
        DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT="20s",
    )
    wait_for(lambda: worker_count(address) == 2, 120, "two dask workers")
    return {"address": address, "root": root}


@pytest.fixture(scope="module")
def bucket_images(moto_endpoint, real_images):
    """12 real JPEGs and one broken file in a fresh moto bucket."""
    import uuid

    fs = s3fs.S3FileSystem(
        skip_instance_cache=True, endpoint_url=moto_endpoint, key="testing", secret="testing"
    )
    bucket = f"cluster-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    for path in real_images[:: len(real_images) // 12][:12]:
        fs.pipe(f"{bucket}/drop/{path.name}", path.read_bytes())
    fs.pipe(f"{bucket}/drop/broken.jpg", real_images[0].read_bytes()[:1000])
    return bucket


def inmap_label(
    env: dict,
    source: str,
    output: str,
    *flags: str,
    cwd: Path = REPO_ROOT,
    python: tuple[str, ...] = ("-m", "inmap.cli"),
    timeout: float = 420,
):
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            *python,
            "label",
            source,
            "--classes",
            str(CLASSES),
            "--output",
            output,
            "--model",
            "inmap-tiny",
            "--pretrained",
            "none",
            "--no-progress",
            *flags,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    done.seconds = time.monotonic() - started
    return done


def client_env(prefect_api: str, home: Path) -> dict:
    return {**base_env(home), "PREFECT_API_URL": prefect_api}


def s3_flags(moto_endpoint: str) -> list[str]:
    return ["--storage-options", json.dumps({"endpoint_url": moto_endpoint})]


def shard_metadata(output: str, moto_endpoint: str) -> list[dict]:
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True, endpoint_url=moto_endpoint, key="testing", secret="testing"
    )
    found = []
    for path in fs.find(output.removeprefix("s3://") + "/embeddings"):
        if path.endswith(".parquet") and "/_index/" not in path:
            with fs.open(path, "rb") as f:
                metadata = pq.read_schema(f).metadata
            found.append(
                {
                    k.decode(): json.loads(v)
                    for k, v in metadata.items()
                    if k.decode() in ("host", "device")
                }
            )
    return found


def test_cluster_run_equals_the_thread_run_and_reports_to_the_server(
    dask_cluster, processes, prefect_api, bucket_images, moto_endpoint, tmp_path
):
    env = client_env(prefect_api, tmp_path / "client")
    source = f"s3://{bucket_images}/drop"
    threads = inmap_label(
        env, source, f"s3://{bucket_images}/threads", *s3_flags(moto_endpoint), "--shard-size", "3"
    )
    assert threads.returncode == 0, threads.stdout + threads.stderr
    dask = inmap_label(
        env,
        source,
        f"s3://{bucket_images}/dask",
        *s3_flags(moto_endpoint),
        "--shard-size",
        "3",
        "--dask-address",
        dask_cluster["address"],
        python=("-c", CLIENT_CLAIMS_CUDA),
    )
    assert dask.returncode == 0, dask.stdout + dask.stderr

    options = {"endpoint_url": moto_endpoint}
    columns = ["uri", "label", "class_id", "zero_shot_label", "top_k_labels"]
    thread_predictions = read_delta(f"s3://{bucket_images}/threads/predictions", options)
    dask_predictions = read_delta(f"s3://{bucket_images}/dask/predictions", options)
    assert thread_predictions.height == 12
    by_thread = thread_predictions.select(columns).sort("uri")
    by_dask = dask_predictions.select(columns).sort("uri")
    differ = by_thread.join(by_dask, on="uri", how="full").filter(
        pl.col("label") != pl.col("label_right")
    )
    assert by_thread.equals(by_dask), "\n".join(
        f"{r['uri']}: {r['label']} / {r['label_right']} (zero-shot {r['zero_shot_label']} / "
        f"{r['zero_shot_label_right']})"
        for r in differ.to_dicts()
    )

    # The shards were embedded by the workers, on the device each resolved for itself.
    shards = shard_metadata(f"s3://{bucket_images}/dask", moto_endpoint)
    assert len(shards) == 5 and {s["device"] for s in shards} == {"cpu"}, shards  # 13 images

    # Its task runs are on the server the run reported to: each shard (content-addressed, so the
    # same in both runs) was embedded by a completed task run of each run: 5 shards of 3 images.
    tasks = api_request(f"{prefect_api}/task_runs/filter", "POST", {})
    embedded = Counter(
        t["name"]
        for t in tasks
        if t["name"].startswith("embed-") and t["state_type"] == "COMPLETED"
    )
    assert len(embedded) == 5 and set(embedded.values()) == {2}, embedded

    assert_no_worker_started_a_server(processes)


def test_with_the_embedded_server_the_workers_report_to_it(
    dask_cluster, processes, tmp_path, real_images
):
    """No PREFECT_API_URL: the command line's temporary server is the run's API, and the workers
    (on this machine) report to it rather than each starting one of their own."""
    images = tmp_path / "images"
    images.mkdir()
    for path in real_images[2 :: len(real_images) // 6][:6]:
        shutil.copy(path, images / path.name)
    env = base_env(tmp_path / "client")
    done = inmap_label(env, str(images), str(tmp_path / "out"), "--shard-size", "3",
                       "--dask-address", dask_cluster["address"])  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert read_delta(tmp_path / "out" / "predictions").height == 6
    assert_no_worker_started_a_server(processes)
    # The client's own server recorded the task runs that the workers ran.
    database = tmp_path / "client" / "prefect-home" / "prefect.db"
    with sqlite3.connect(database) as db:
        names = db.execute(
            "SELECT name FROM task_run WHERE name LIKE 'embed-%' AND state_type = 'COMPLETED'"
        ).fetchall()
    with sqlite3.connect(database) as db:
        every = db.execute("SELECT name, state_type FROM task_run").fetchall()
    assert len(names) == 2, every


def assert_no_worker_started_a_server(processes) -> None:
    """Prefect says so on the worker's console when it starts a temporary server (its database
    would be the client's: the settings a task carries name the client's Prefect home)."""
    for worker in ("worker-1", "worker-2"):
        assert "Starting temporary server" not in processes.log(worker), processes.log(worker)


def test_dask_gpus_without_gpu_workers_is_refused_at_once(dask_cluster, prefect_api, tmp_path):
    (tmp_path / "images").mkdir()
    done = inmap_label(
        client_env(prefect_api, tmp_path),
        str(tmp_path / "images"),
        str(tmp_path / "out"),
        "--dask-address",
        dask_cluster["address"],
        "--dask-gpus",
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "declares a GPU resource" in done.stderr and "--resources GPU=1" in done.stderr
    assert not (tmp_path / "out" / "embeddings").exists()


def test_a_worker_without_inmap_is_named_within_a_minute(processes, prefect_api, tmp_path):
    bare_python = python_without_inmap(tmp_path / "bare-venv")
    address = start_cluster(processes, tmp_path, "bare", {"bare-worker": str(bare_python)})
    wait_for(lambda: worker_count(address) == 1, 60, "the worker without inmap")
    (tmp_path / "images").mkdir()
    done = inmap_label(
        client_env(prefect_api, tmp_path),
        str(tmp_path / "images"),
        str(tmp_path / "out"),
        "--dask-address",
        address,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bare-worker" in done.stderr and "cannot import inmap" in done.stderr, done.stderr
    assert done.seconds < 60
    processes.kill("bare-worker")
    processes.kill("bare-scheduler")


def test_relative_local_paths_are_the_clients(dask_cluster, prefect_api, tmp_path, real_images):
    """Given in the client's directory; every worker sees them there (a shared filesystem), not in
    its own working directory."""
    client_dir = tmp_path / "client"
    copy_images(real_images[7 :: len(real_images) // 4][:4], client_dir / "images")
    done = inmap_label(client_env(prefect_api, tmp_path), "images", "out", "--shard-size", "2",
                       "--dask-address", dask_cluster["address"], cwd=client_dir)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert read_delta(client_dir / "out" / "predictions").height == 4
    for worker in ("worker-1", "worker-2"):
        assert not (dask_cluster["root"] / worker / "out").exists()


def test_a_worker_killed_mid_run_loses_nothing(
    dask_cluster, processes, prefect_api, tmp_path, real_images
):
    images = copy_images(real_images[:40], tmp_path / "images")
    output = tmp_path / "out"
    run = start_label(prefect_api, tmp_path, images, output, dask_cluster["address"])
    wait_for(lambda: len(shard_files(output)) >= 2, 300, "the first shards", run)
    processes.kill("worker-2")
    log, _ = run.communicate(timeout=420)
    assert run.returncode == 0, log

    predictions = read_delta(output / "predictions")
    names = sorted(Path(uri).name for uri in predictions["uri"].to_list())
    assert names == sorted(p.name for p in images.iterdir())  # all 40, each once
    runs = read_delta(output / "runs")
    # A shard the killed worker had written before it died is found, not embedded again.
    assert runs["status"].to_list() == ["completed"]
    assert runs["embedded"][0] + runs["cached"][0] == 40


def test_a_cluster_that_loses_all_its_workers_fails_in_bounded_time(
    dask_cluster, processes, prefect_api, tmp_path, real_images
):
    images = copy_images(real_images[-40:], tmp_path / "images")
    output = tmp_path / "out"
    run = start_label(prefect_api, tmp_path, images, output, dask_cluster["address"])
    wait_for(lambda: shard_files(output), 300, "the first shard", run)
    for worker in [name for name in processes.started if name.startswith("worker-")]:
        processes.kill(worker)
    killed = time.monotonic()
    log, _ = run.communicate(timeout=180)
    assert run.returncode == 1, log
    assert time.monotonic() - killed < 120  # the scheduler's 20 s, then the run's own exit
    assert "has had no worker" in log, log


def copy_images(paths: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, folder / path.name)
    return folder


def shard_files(output: Path) -> list[Path]:
    return list((output / "embeddings").glob("*/*.parquet"))


def start_label(prefect_api: str, home: Path, images: Path, output: Path, address: str):
    """`inmap label` in the background: 2 images a shard, so that a run has many shards."""
    argv = [sys.executable, "-m", "inmap.cli", "label", str(images), "--classes", str(CLASSES),
            "--output", str(output), "--model", "inmap-tiny", "--pretrained", "none",
            "--no-progress", "--shard-size", "2", "--dask-address", address]  # fmt: skip
    return subprocess.Popen(argv, cwd=home, env=client_env(prefect_api, home), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def test_the_scheduler_gets_a_bound_on_waiting_without_workers(processes, tmp_path):
    from distributed import Client

    address = start_cluster(processes, tmp_path, "plain", {})
    with Client(address, timeout=10) as client:
        cluster.bound_lost_workers(client, 42)
        timeout = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.no_workers_timeout)
        assert timeout == 42
        with pytest.raises(cluster.ClusterError, match="no Dask worker joined"):
            cluster.preflight(client, timeout=2)
    processes.kill("plain-scheduler")


def python_without_inmap(venv: Path) -> Path:
    """A real Python environment with Dask and Prefect but no inmap: a virtualenv whose packages
    are the project's, less inmap's own (linked, so nothing is installed twice)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    shared = venv / "shared-packages"
    shared.mkdir()
    for entry in ours.iterdir():
        top = entry.name.split("-")[0].split(".")[0]
        if top in ("inmap", "flows", "tasks", "deployments") or top.startswith("__editable__"):
            continue
        (shared / entry.name).symlink_to(entry)
    (site / "shared-packages.pth").write_text(f"{shared}\n")
    python = venv / "bin" / "python"
    check = subprocess.run([python, "-c", "import distributed, inmap"], capture_output=True,
                           cwd=venv)  # fmt: skip
    assert b"No module named 'inmap'" in check.stderr, check.stderr
    return python
