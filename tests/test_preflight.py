"""The cluster preflight's refusals, one line naming the worker, against a stand-in for a Dask
client whose workers answer with what `inmap.cluster`'s own probe reports (tests/test_cluster.py
runs it against real `dask scheduler` and `dask worker` processes)."""

from __future__ import annotations

import socket
import time

import pytest

import inmap
from inmap import cluster
from tests.conftest import free_port


class StandInClient:
    """Workers {address: (name, resources)}; each answers by running the probe here, then
    `answer` edits what it said."""

    def __init__(self, workers: dict, answer=None, delay: float = 0.0):
        self.workers, self.answer, self.delay = workers, answer or (lambda a, facts: facts), delay
        self.scheduler = type("Scheduler", (), {"address": "tcp://10.0.0.1:8786"})()

    def wait_for_workers(self, n, timeout=None):
        if not self.workers:
            raise TimeoutError(f"only 0 workers after {timeout}s")

    def scheduler_info(self, n_workers=-1):
        return {"workers": {a: {"name": n, "resources": r} for a, (n, r) in self.workers.items()}}

    def run(self, function, *args, on_error="raise"):
        time.sleep(self.delay)
        return {address: self.answer(address, function(*args)) for address in self.workers}


TWO = {"tcp://10.0.0.2:1": ("gpu-a", {"GPU": 1}), "tcp://10.0.0.3:1": ("cpu-b", {})}


def test_a_cluster_that_can_run_the_job_passes(tmp_path):
    facts = cluster.preflight(StandInClient(TWO), gpus=True, local_paths=[str(tmp_path)])
    assert [f.name for f in facts] == ["gpu-a", "cpu-b"]
    assert {f.inmap_version for f in facts} == {inmap.__version__}


def test_another_inmap_version_on_a_worker_is_named():
    def older(address, facts):
        return {**facts, "inmap_version": "0.0.1"} if "10.0.0.3" in address else facts

    with pytest.raises(cluster.ClusterError, match=r"worker cpu-b .* has inmap 0\.0\.1"):
        cluster.preflight(StandInClient(TWO, older))


def test_a_path_a_worker_does_not_see_is_named(tmp_path):
    def unmounted(address, facts):
        return {**facts, "missing_paths": [str(tmp_path)]} if "10.0.0.2" in address else facts

    with pytest.raises(cluster.ClusterError, match=f"worker gpu-a .* does not see {tmp_path}"):
        cluster.preflight(StandInClient(TWO, unmounted), local_paths=[str(tmp_path / "new-out")])


def test_a_relative_path_is_refused_before_asking_the_workers():
    with pytest.raises(cluster.ClusterError, match="out is a relative path"):
        cluster.preflight(StandInClient(TWO), local_paths=["out"])


def test_gpus_without_a_gpu_worker_are_refused():
    cpu_only = {"tcp://10.0.0.3:1": ("cpu-b", {})}
    with pytest.raises(cluster.ClusterError, match="declares a GPU resource"):
        cluster.preflight(StandInClient(cpu_only), gpus=True)


def test_the_embedded_server_with_workers_elsewhere_is_refused_naming_prefect_api_url():
    def elsewhere(address, facts):
        return {**facts, "host": "gpu-node-7"}

    with pytest.raises(cluster.ClusterError, match="PREFECT_API_URL") as refused:
        cluster.preflight(StandInClient(TWO, elsewhere), api_url="http://127.0.0.1:8123/api",
                          api_embedded=True)  # fmt: skip
    assert "gpu-node-7" in str(refused.value) and "\n" not in str(refused.value)


def test_an_api_the_workers_cannot_reach_is_named():
    closed = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(cluster.ClusterError, match="cannot reach the Prefect API"):
        cluster.preflight(StandInClient(TWO), api_url=closed)
    with socket.socket() as listening:  # and one they can
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        cluster.preflight(StandInClient(TWO), api_url=f"http://127.0.0.1:{port}/api")


def test_cuda_asked_of_workers_without_it_is_refused():
    with pytest.raises(cluster.ClusterError, match="--device cuda: Dask worker gpu-a"):
        cluster.preflight(
            StandInClient(TWO, lambda a, facts: {**facts, "cuda": False}), device="cuda"
        )
    cluster.preflight(StandInClient(TWO, lambda a, facts: {**facts, "cuda": True}), device="cuda")


def test_no_worker_and_a_silent_cluster_fail_in_bounded_time():
    with pytest.raises(cluster.ClusterError, match="no Dask worker joined"):
        cluster.preflight(StandInClient({}), timeout=1)
    started = time.monotonic()
    with pytest.raises(cluster.ClusterError, match="did not all answer within 1s"):
        cluster.preflight(StandInClient(TWO, delay=30), timeout=1)
    assert time.monotonic() - started < 5
