"""prefect-dask's DaskTaskRunner, with what a run on a cluster needs before and during its work.

- **One Prefect API per run.** Task runs on Dask workers report to the API of the run that
  submitted them: its URL travels in the settings each task carries, and a local cluster's worker
  processes get it in their environment too. When that API is this process's temporary (embedded)
  server, its URL is made explicit, so no worker starts a server of its own.
- **Preflight.** On connecting to an existing cluster, `inmap.cluster.preflight` refuses in
  seconds, with one line naming the worker, a cluster that cannot run the job.
- **Bounded.** The scheduler fails a task that waits `LOST_WORKERS_SECONDS` with no worker able
  to run it, and the run stops with a `ClusterLostError` line instead of hanging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from inmap import cluster


class InmapDaskTaskRunner(DaskTaskRunner):
    """A DaskTaskRunner that checks its cluster first; `gpus`: embedding tasks hold a GPU."""

    def __init__(self, *args, gpus: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gpus = gpus
        self.local_paths: tuple[str, ...] = ()
        self.device: str | None = "auto"
        self.checked = False  # a preflight passed on this cluster already (in the parent run)

    def expect(self, *, local_paths: Sequence[str] = (), device: str | None = "auto") -> None:
        """What the job needs of every worker: checked by `preflight`, and by the duplicates."""
        self.local_paths = tuple(local_paths)
        self.device = device

    def preflight(self) -> None:
        """Check an existing cluster now, before any work (a local cluster started for this run
        is this machine's own processes, and is only started when tasks need it)."""
        if self.address and not self.checked:
            _ = self.client  # connects, and checks on the way

    def duplicate(self):
        twin = super().duplicate()
        twin.gpus, twin.local_paths, twin.device = self.gpus, self.local_paths, self.device
        twin.checked = self.checked
        return twin

    @property
    def client(self):
        if self._client is not None:
            return self._client
        api_url, embedded = prefect_api()
        if api_url:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            # Each task run carries the submitting context's settings: name the API there, so
            # that a worker never falls back to a temporary server of its own.
            self._exit_stack.enter_context(temporary_settings({PREFECT_API_URL: api_url}))
        if not self.address and self._cluster is None and api_url:  # a LocalCluster, started here
            env = {**dict(self.cluster_kwargs.get("env") or {}), "PREFECT_API_URL": api_url}
            self.cluster_kwargs = {**self.cluster_kwargs, "env": env}
        client = DaskTaskRunner.client.fget(self)
        cluster.bound_lost_workers(client)
        if self.address and not self.checked:
            cluster.preflight(
                client,
                gpus=self.gpus,
                device=self.device,
                local_paths=self.local_paths,
                api_url=api_url,
                api_embedded=embedded,
            )
            self.checked = True
        return client

    def __exit__(self, *exc_info) -> None:
        # A worker sends its task runs' states to the API as events, from a queue of its own;
        # flush them before the run ends, or a temporary server that stops with this process
        # never hears of the last ones.
        if self._client is not None:
            # A worker gone, or a client closing: the run's result stands.
            with contextlib.suppress(Exception):
                self._client.run(_flush_prefect_reports)
        super().__exit__(*exc_info)

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        future = super().submit(task, parameters, wait_for, dependencies)
        return ClusterFuture(
            wrapped_future=future.wrapped_future, task_run_id=future.task_run_id, runner=self
        )


def _flush_prefect_reports(seconds: float = 10.0) -> None:
    """On a worker: send what Prefect's background queues (events, logs) still hold."""
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=seconds)


class ClusterFuture(PrefectDaskFuture):
    """Dask's "no worker could run this" failures, as inmap's one-line `ClusterLostError`."""

    def __init__(self, wrapped_future, task_run_id, runner: InmapDaskTaskRunner):
        super().__init__(wrapped_future=wrapped_future, task_run_id=task_run_id)
        self._address = runner.address

    def result(self, timeout=None, raise_on_failure=True):
        try:
            return super().result(timeout=timeout, raise_on_failure=raise_on_failure)
        except Exception as error:
            ours = cluster.lost_workers_error(error, self._address)
            if ours is None:
                raise
            raise ours from None


def prefect_api() -> tuple[str | None, bool]:
    """This process's Prefect API URL, and whether it is the temporary server Prefect started
    inside this process (no PREFECT_API_URL given)."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return configured, False
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one `get_client()` started for this run, if any
    if server.running:
        return server.api_url, True
    return None, True
