"""Checks on a Dask cluster before any work, so that a run on it fails in seconds, with one line
naming the worker, instead of hanging or failing late.

`preflight(client, ...)` asks every worker, in one bounded round trip, for the inmap it imports,
its host, which of the run's local paths it sees, whether it reaches the run's Prefect API, and
(for `--device cuda`) whether it has CUDA; and it reads from the scheduler which workers declare a
`GPU` resource. `bound_lost_workers` makes the scheduler fail tasks that wait with no worker left,
so a cluster that loses all its workers mid-run fails in bounded time.

The probes run where inmap may be missing, so they are pickled by value (defined in a function)
and import nothing from inmap themselves. This module never imports Prefect: the flow layer
passes the API URL in.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from inmap import storage
from inmap.errors import InmapError, InputError

PREFLIGHT_SECONDS = 60.0  # waiting for a first worker, and for every worker's answer
LOST_WORKERS_SECONDS = 60.0  # a task waiting this long with no worker (able to run it) fails
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})


class ClusterError(InputError):
    """The Dask cluster cannot run this job as set up; the message names the worker."""


class ClusterLostError(InmapError):
    """The cluster lost the workers that could run the job's tasks, mid-run."""


@dataclass(frozen=True)
class WorkerFacts:
    """What one worker said about itself."""

    address: str
    name: str
    host: str  # socket.gethostname() on the worker
    inmap_version: str | None  # None: it cannot import inmap
    import_error: str | None
    missing_paths: tuple[str, ...]
    api_error: str | None  # why it cannot open a connection to the Prefect API, if it cannot
    cuda: bool | None  # None: not asked
    gpu_resource: float

    @property
    def label(self) -> str:
        return self.address if self.name == self.address else f"{self.name} ({self.address})"


def preflight(
    client,
    *,
    gpus: bool = False,
    device: str | None = "auto",
    local_paths: Sequence[str] = (),
    api_url: str | None = None,
    api_embedded: bool = False,
    timeout: float = PREFLIGHT_SECONDS,
) -> list[WorkerFacts]:
    """Refuse, with a `ClusterError` naming the worker, a cluster that cannot run this job.

    - every worker imports inmap at this process's version;
    - with `gpus`, at least one worker declares a `GPU` resource (`dask worker --resources GPU=1`);
    - every local path in `local_paths` is absolute and exists on every worker (for one not
      created yet, such as a new output, its nearest existing parent);
    - every worker can connect to `api_url`; with `api_embedded` (this process's temporary
      server), the cluster must be on this machine;
    - with `device` "cuda"/"cuda:N", every worker that may embed has CUDA.

    Returns the facts of every worker. Takes at most about `timeout` seconds per step."""
    from inmap import __version__

    address = _scheduler_address(client)
    try:
        _bounded(lambda: client.wait_for_workers(1, timeout=timeout), timeout + 5)
    except (TimeoutError, OSError) as error:
        raise ClusterError(
            f"no Dask worker joined the scheduler at {address} within {timeout:.0f}s ({error}); "
            f"start some with `dask worker {address}`"
        ) from None
    workers = _bounded(lambda: client.scheduler_info(n_workers=-1)["workers"], timeout)
    gpu_workers = [a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) > 0]
    if gpus and not gpu_workers:
        raise ClusterError(
            f"--dask-gpus: none of the {len(workers)} Dask worker(s) at {address} declares a GPU "
            "resource; start each GPU worker with `dask worker ... --resources GPU=1`, or drop "
            "--dask-gpus"
        )
    local = [p for p in local_paths if p and storage.is_local(p)]
    for path in local:
        if not os.path.isabs(os.path.expanduser(path.removeprefix("file://"))):
            raise ClusterError(
                f"{path} is a relative path, which each Dask worker would resolve in its own "
                f"working directory; give {_local_path(path)}"
            )
    paths = sorted({_nearest_existing(_local_path(p)) for p in local})
    wants_cuda = bool(device) and str(device).startswith("cuda")
    api = _host_port(api_url) if api_url else None
    probe = _worker_probe()
    answers = _bounded(
        lambda: client.run(probe, paths, api, wants_cuda, on_error="return"),
        timeout,
        f"the Dask workers at {address} did not all answer within {timeout:.0f}s",
    )
    facts = [
        _facts(worker_address, workers.get(worker_address, {}), answer)
        for worker_address, answer in sorted(answers.items())
    ]
    for fact in facts:
        if fact.inmap_version is None:
            raise ClusterError(
                f"Dask worker {fact.label} on {fact.host} cannot import inmap "
                f"({fact.import_error}); install inmap=={__version__} in the environment that "
                "runs `dask worker` there"
            )
        if fact.inmap_version != __version__:
            raise ClusterError(
                f"Dask worker {fact.label} on {fact.host} has inmap {fact.inmap_version}, this "
                f"client {__version__}; install inmap=={__version__} on every worker"
            )
        if fact.missing_paths:
            raise ClusterError(
                f"Dask worker {fact.label} on {fact.host} does not see {fact.missing_paths[0]}; a "
                "local path must be on a filesystem every worker mounts at the same path (or use "
                "an object store)"
            )
    local_host = socket.gethostname()
    remote = [f for f in facts if f.host != local_host]
    if api_embedded and remote:
        raise ClusterError(
            f"Dask worker {remote[0].label} runs on {remote[0].host}, but this run's Prefect API "
            "is a temporary server inside this process that other machines cannot reach; set "
            "PREFECT_API_URL to a Prefect server every worker can reach (`prefect server start "
            "--host 0.0.0.0`)"
        )
    for fact in facts:
        if fact.api_error:
            raise ClusterError(
                f"Dask worker {fact.label} on {fact.host} cannot reach the Prefect API at "
                f"{api_url} ({fact.api_error}); set PREFECT_API_URL to an address of the server "
                "that every worker can reach"
            )
    if wants_cuda:
        candidates = [f for f in facts if not gpus or f.gpu_resource > 0]
        for fact in candidates:
            if not fact.cuda:
                raise ClusterError(
                    f"--device {device}: Dask worker {fact.label} on {fact.host} has no CUDA; "
                    "use --device auto, or run only GPU workers"
                )
    return facts


def bound_lost_workers(client, seconds: float = LOST_WORKERS_SECONDS) -> None:
    """Make the scheduler fail a task that has waited `seconds` with no worker that can run it
    (all workers lost, or none with the resources it asks for), unless the scheduler's operator
    set `distributed.scheduler.no-workers-timeout` already."""
    client.run_on_scheduler(_no_workers_timeout_setter(), seconds)


def lost_workers_error(error: BaseException, address: str | None = None) -> ClusterLostError | None:
    """Our error for Dask's "no worker" failures (None for any other error)."""
    from distributed.scheduler import NoValidWorkerError, NoWorkerError

    where = f" at {address}" if address else ""
    if isinstance(error, NoWorkerError):
        return ClusterLostError(
            f"the Dask cluster{where} has had no worker for {error.timeout:.0f}s while task "
            f"{error.task} waited; the run stopped (a rerun resumes from the shards already made)"
        )
    if isinstance(error, NoValidWorkerError):
        needs = error.resource_restrictions or error.worker_restrictions or error.host_restrictions
        return ClusterLostError(
            f"no Dask worker{where} able to run task {error.task} (it needs {needs}) joined within "
            f"{error.timeout:.0f}s; the run stopped (a rerun resumes from the shards already made)"
        )
    return None


def _facts(address: str, info: dict, answer) -> WorkerFacts:
    name = str(info.get("name", address))
    gpu = float((info.get("resources") or {}).get("GPU", 0))
    if isinstance(answer, BaseException):  # the probe itself failed there
        return WorkerFacts(address, name, str(info.get("host", "?")), None,
                           f"{type(answer).__name__}: {answer}", (), None, None, gpu)  # fmt: skip
    return WorkerFacts(
        address=address,
        name=name,
        host=answer["host"],
        inmap_version=answer["inmap_version"],
        import_error=answer["import_error"],
        missing_paths=tuple(answer["missing_paths"]),
        api_error=answer["api_error"],
        cuda=answer["cuda"],
        gpu_resource=gpu,
    )


def _worker_probe() -> Callable:
    """The function each worker runs. Defined here, inside a function, so that it is pickled by
    value: a worker without inmap can still run it and say so."""

    def probe(paths, api, wants_cuda):
        import os
        import socket

        facts = {"host": socket.gethostname(), "inmap_version": None, "import_error": None,
                 "missing_paths": [p for p in paths if not os.path.exists(p)],
                 "api_error": None, "cuda": None}  # fmt: skip
        try:
            import inmap

            facts["inmap_version"] = inmap.__version__
        except Exception as error:
            facts["import_error"] = f"{type(error).__name__}: {error}"
        if api:
            try:
                socket.create_connection(tuple(api), timeout=5).close()
            except OSError as error:
                facts["api_error"] = str(error) or type(error).__name__
        if wants_cuda:
            try:
                import torch

                facts["cuda"] = bool(torch.cuda.is_available())
            except Exception:
                facts["cuda"] = False
        return facts

    return probe


def _no_workers_timeout_setter() -> Callable:
    def set_timeout(seconds, dask_scheduler=None):
        if dask_scheduler.no_workers_timeout is None:
            dask_scheduler.no_workers_timeout = seconds
        return dask_scheduler.no_workers_timeout

    return set_timeout


def _bounded(call: Callable, timeout: float, message: str | None = None):
    """`call()`, or a `ClusterError` after `timeout` seconds (the call is left to a daemon thread,
    so that nothing waits on a cluster that never answers, not even interpreter exit)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="inmap-preflight", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ClusterError(message or f"the Dask cluster did not answer within {timeout:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _scheduler_address(client) -> str:
    try:
        return client.scheduler.address
    except AttributeError:
        return "?"


def _local_path(url: str) -> str:
    return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))


def _nearest_existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists here (an output not created yet)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "127.0.0.1", port


def absolute_local(url: str) -> str:
    """A local path as an absolute path (a Dask worker resolves a relative one in its own working
    directory); any other URL as it is."""
    if not url or not storage.is_local(url):
        return url
    return _local_path(url)
