"""A served `inmap/label-bucket` run killed with its serving process (SIGKILL to the process
group, as when a machine or container dies): the restarted serve marks it Crashed, which frees the
deployment's concurrency slot, and the next run starts at once, takes the output's lease once the
killed run's expires (90 s), and labels every image exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, api_request, one_row_per_image, read_delta, wait_for

pytestmark = pytest.mark.slow

IMAGES = 40
# The tiny random model's embeddings are nearly parallel, so at the paper's lr the fit stops early
# within a second or two; at lr 0.01 it takes nearly all of its steps, minutes even on a quiet CPU.
SLOW_LEARNING = {"iters": 1_000_000, "lr": 0.01}
QUICK_LEARNING = {"iters": 50}
RUNNING_WITHIN = 150  # seconds from the kill until the next run is Running


@pytest.fixture
def server_env(monkeypatch, request) -> dict:
    """The real Prefect server of `prefect_server`, with queued runs re-checking their
    concurrency slot every 10 s (as the README advises)."""
    monkeypatch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "10")
    return request.getfixturevalue("prefect_server")


def call(api: str, path: str, body: dict | None = None):
    return api_request(f"{api}{path}", "GET" if body is None else "POST", body)


def state_of(api: str, run_id: str) -> tuple[str, str]:
    state = call(api, f"/flow_runs/{run_id}")["state"]
    return state["type"], state.get("message") or ""


def start_serve(env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.serve", "--cron", ""],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def gone(pid: int) -> bool:
    """True once `pid` is dead (no longer there, or a zombie nobody reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_next_run_starts_soon_after_a_killed_one(server_env, real_images, tmp_path):
    api = server_env["PREFECT_API_URL"]
    source = tmp_path / "images"
    source.mkdir()
    for path in real_images[:: len(real_images) // IMAGES][:IMAGES]:
        shutil.copy(path, source / path.name)
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\nbird\nreptile\ndog\ncat\ninsect\nvehicle\nbuilding\n")
    output = tmp_path / "out"
    params = {
        "source": str(source),
        "classes": str(classes),
        "output": str(output),
        "model": "inmap-tiny",
        "pretrained": None,
        "device": "cpu",
        **SLOW_LEARNING,
    }

    serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    serve = start_serve(server_env, serve_log)
    try:
        deployment = {}

        def served() -> bool:
            deployment.update(call(api, "/deployments/name/inmap/label-bucket"))
            return True

        wait_for(served, 120, "label-bucket to be served", serve)

        def trigger(parameters: dict) -> str:
            run = call(
                api, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
            )
            return run["id"]

        killed = trigger(params)

        def learning() -> bool:
            progress_filter = {"artifacts": {"type": {"any_": ["progress"]}}}
            progress = call(api, "/artifacts/filter", progress_filter)
            return any(
                (a.get("description") or "").startswith("learning the vision proxy")
                for a in progress
            )

        wait_for(lambda: state_of(api, killed)[0] == "RUNNING", 180, "the first run to run", serve)
        wait_for(learning, 180, "the first run to start learning", serve)
        learning_tasks = call(
            api, "/task_runs/filter", {"task_runs": {"name": {"like_": "vision-proxy"}}}
        )
        assert [t["state"]["type"] for t in learning_tasks] == ["RUNNING"]
        assert state_of(api, killed)[0] == "RUNNING"
        holder = json.loads(max((output / "_lease").glob("*.json")).read_text())

        os.killpg(serve.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        serve.wait(30)
        wait_for(lambda: gone(holder["pid"]), 30, f"the run's process {holder['pid']} to die")

        serve = start_serve(server_env, serve_log)
        following = trigger({**params, **QUICK_LEARNING})
        wait_for(
            lambda: state_of(api, following)[0] == "RUNNING",
            RUNNING_WITHIN - (time.monotonic() - killed_at),
            f"the next run to be Running within {RUNNING_WITHIN}s of the kill",
            serve,
        )
        running_after = time.monotonic() - killed_at
        killed_state = state_of(api, killed)
        wait_for(
            lambda: state_of(api, following)[0] in ("COMPLETED", "FAILED", "CRASHED"),
            300,
            "the next run to finish",
            serve,
        )
        finished_after = time.monotonic() - killed_at
        # The killed run's partition subflow is no deployment run: the zombie automation crashes
        # it once its heartbeats have been missing for 90 s.
        partition = {}

        def partition_crashed() -> bool:
            runs = call(
                api, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [killed]}}}
            )
            partition.update(runs[0]["state"])
            return partition["type"] == "CRASHED"

        wait_for(partition_crashed, 180 - (time.monotonic() - killed_at), "the subflow to crash")
        print(
            f"\nkilled run: {killed_state[0]} ({killed_state[1]})"
            f"\nnext run Running {running_after:.1f}s after the kill, "
            f"finished {finished_after:.1f}s after the kill"
            f"\nkilled run's subflow {partition['type']} ({partition['message']}) "
            f"{time.monotonic() - killed_at:.1f}s after the kill"
        )
        assert killed_state[0] == "CRASHED", killed_state
        assert state_of(api, following)[0] == "COMPLETED", state_of(api, following)
        assert state_of(api, killed)[0] == "CRASHED"

        predictions = read_delta(output / "predictions")
        assert predictions.height == IMAGES and one_row_per_image(predictions)
        assert predictions["uri"].n_unique() == IMAGES
        assert set(predictions["run_id"].to_list()) == {following}
        runs = read_delta(output / "runs")
        # The run that took the expired lease over recorded the dead one as interrupted.
        assert dict(zip(runs["run_id"], runs["status"], strict=True)) == {
            following: "completed",
            killed: "interrupted",
        }
    finally:
        stop(serve)
        serve_log.close()
