"""The work-pool path, as the README gives it: against a fresh Prefect server, create the pool,
`prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml` from the repository
root, start a process worker in a directory of its own with only PREFECT_API_URL and the storage
credentials, and run `prefect deployment run inmap/label-bucket` over a moto bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import s3fs

from tests.conftest import REPO_ROOT, free_port, http_ok, one_row_per_image, read_delta, wait_for

pytestmark = pytest.mark.slow


def prefect(*args: str, env: dict, cwd=REPO_ROOT, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def clean_env(home) -> dict:
    """This process's environment less anything Prefect-, AWS- or inmap-specific."""
    drop = ("PREFECT_", "AWS_", "INMAP_", "PYTHONPATH")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("server")
    port = free_port()
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port), "--no-ui", "--analytics-off"],
        env=clean_env(home / "prefect-home"), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: http_ok(f"{api}/health"), 120, "prefect server", server)
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


def test_a_process_worker_runs_label_bucket_from_the_pool(
    fresh_server, moto_endpoint, s3_bucket, s3_storage_options, real_images, tmp_path
):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    for path in real_images[5 :: len(real_images) // 6][:6]:
        fs.pipe(f"{s3_bucket}/drops/{path.name}", path.read_bytes())
    fs.pipe(f"{s3_bucket}/classes.txt", b"fish\nbird\ndog\n")

    operator = clean_env(tmp_path / "operator") | {"PREFECT_API_URL": fresh_server}
    created = prefect("work-pool", "create", "inmap-pool", "--type", "process", env=operator)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file",
                       "deployments/prefect.yaml", env=operator)  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    # The worker: its own empty directory, the API URL and the storage credentials, nothing else.
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    worker_env = clean_env(worker_dir / "prefect-home") | {
        "PREFECT_API_URL": fresh_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "inmap-pool"],
        cwd=worker_dir, env=worker_env, stdout=worker_log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        params = {
            "source": f"s3://{s3_bucket}/drops",
            "classes": f"s3://{s3_bucket}/classes.txt",
            "output": f"s3://{s3_bucket}/inmap",
            "credentials_block": None,  # the worker's environment has the keys
            "storage_options": {"endpoint_url": moto_endpoint},
            "model": "inmap-tiny",
            "pretrained": None,
            "device": "cpu",
        }
        run = prefect("deployment", "run", "inmap/label-bucket", "--params", json.dumps(params),
                      "--watch", env=operator, timeout=420)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "worker.log").read_text()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        worker_log.close()
    predictions = read_delta(f"{params['output']}/predictions", {"endpoint_url": moto_endpoint})
    assert predictions.height == 6 and one_row_per_image(predictions)
    runs = read_delta(f"{params['output']}/runs", {"endpoint_url": moto_endpoint})
    assert runs["status"].to_list() == ["completed"]
