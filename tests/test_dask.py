"""Scale-out: the flow on a local Dask cluster of 2 worker processes gives the same outputs as the
thread pool. Both run through the `inmap label` command against a real Prefect server, so that the
Dask workers report to it instead of each starting an ephemeral server of its own.
(tests/test_cluster.py runs an existing cluster of separate processes, also with the command's
own temporary server.)"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from tests.conftest import REPO_ROOT, read_delta

pytestmark = pytest.mark.slow


def label(source, output, env, *runner_args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "inmap.cli",
            "label",
            str(source),
            "--classes",
            str(REPO_ROOT / "examples" / "classes.txt"),
            "--output",
            str(output),
            "--model",
            "inmap-tiny",
            "--pretrained",
            "none",
            "--device",
            "cpu",
            "--shard-size",
            "4",
            "--no-progress",
            *runner_args,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def read(output, what: str) -> pl.DataFrame:
    if what == "embeddings":
        return pl.read_parquet(output / what / "*" / "*.parquet").sort("uri")
    return read_delta(output / what).sort("uri")


def test_dask_cluster_run_equals_thread_pool_run(prefect_server, image_folder, tmp_path):
    threads = label(image_folder, tmp_path / "threads", prefect_server, "--task-runner", "thread")
    assert threads.returncode == 0, threads.stdout + threads.stderr
    dask = label(image_folder, tmp_path / "dask", prefect_server, "--dask-workers", "2")
    assert dask.returncode == 0, dask.stdout + dask.stderr
    # Dask's scheduler logs its life on the console; the thread run starts none.
    assert "distributed.scheduler" in dask.stdout + dask.stderr
    assert "distributed.scheduler" not in threads.stdout + threads.stderr

    thread_embeddings = read(tmp_path / "threads", "embeddings")
    dask_embeddings = read(tmp_path / "dask", "embeddings")
    assert thread_embeddings["uri"].to_list() == dask_embeddings["uri"].to_list()
    assert thread_embeddings.height == 12
    np.testing.assert_allclose(
        np.stack(thread_embeddings["embedding"].to_numpy()).astype(np.float32),
        np.stack(dask_embeddings["embedding"].to_numpy()).astype(np.float32),
        atol=2e-3,
    )
    columns = ["uri", "label", "class_id", "zero_shot_label", "top_k_labels"]
    assert (
        read(tmp_path / "threads", "predictions")
        .select(columns)
        .equals(read(tmp_path / "dask", "predictions").select(columns))
    )
    assert read(tmp_path / "threads", "errors")["uri"].to_list() == (
        read(tmp_path / "dask", "errors")["uri"].to_list()
    )
