"""The `inmap` flow: prepare the job, take the output's lease, label each partition.

A partition is one source prefix, run as the subflow `label-partition` with its own state in the
UI: list, embed, learn the vision proxy, predict, commit in one transaction. A backfill (a list of
prefixes) runs them one after the other, each committed on its own, so a failed partition never
blocks the others and a rerun resumes from the content-addressed shards already written.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from inmap import layout, lease, maintenance, progress
from inmap.errors import InmapError, InputError, StorageError, UnreadableImagesError
from inmap.job import Job
from inmap.options import RunnerOptions, RunRequest, takes_options
from inmap.report import RunSummary, prediction_statistics, unknown_count
from tasks import credentials, stages

# inmap's own INFO lines (adaptive refinement, repairs) reach run logs with
# PREFECT_LOGGING_EXTRA_LOGGERS=inmap, set by the command line and deployments.serve.
logging.getLogger("inmap").setLevel(logging.INFO)


def _gpu_annotation():
    """On a Dask cluster whose workers declare `--resources GPU=1`, each embedding task holds one
    GPU: a worker takes one shard at a time, and several GPUs work as several workers. Only with
    --dask-gpus, since tasks asking for a resource no worker has cannot run (the preflight refuses
    such a cluster; workers lost mid-run fail the run after LOST_WORKERS_SECONDS)."""
    runner = FlowRunContext.get().task_runner
    if not getattr(runner, "gpus", False):
        return nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def make_task_runner(options: RunnerOptions):
    """The task runner for `inmap_flow.with_options(task_runner=...)`.

    `thread`: Prefect's thread pool, one process. `dask`: prefect-dask on an existing cluster at
    `dask_address` (checked before any work: flows/dask_runner.py), or a local cluster of
    `dask_workers` single-threaded processes. With `dask_gpus`, a local cluster is dask-cuda's
    LocalCUDACluster: one worker per visible GPU, each pinned to its device.
    """
    if options.runner == "thread":
        return ThreadPoolTaskRunner(max_workers=4)
    from flows.dask_runner import InmapDaskTaskRunner

    if options.dask_address:
        return InmapDaskTaskRunner(address=options.dask_address, gpus=options.dask_gpus)
    if options.dask_gpus:
        return InmapDaskTaskRunner(
            cluster_class=_local_cuda_cluster(),
            cluster_kwargs={"threads_per_worker": 1, "resources": {"GPU": 1}},
            gpus=True,
        )
    cluster_kwargs = {"n_workers": options.workers, "threads_per_worker": 1, "processes": True}
    return InmapDaskTaskRunner(cluster_kwargs=cluster_kwargs)


def _local_cuda_cluster():
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise InputError(
            "--dask-gpus on this machine starts one Dask worker per GPU with dask-cuda, which is "
            "not installed: pip install 'inmap[cuda]' (or give --dask-address of a cluster whose "
            "workers declare --resources GPU=1)"
        ) from None
    return LocalCUDACluster


def task_runner_from_env():
    """The task runner that INMAP_TASK_RUNNER, INMAP_DASK_ADDRESS, INMAP_DASK_WORKERS and
    INMAP_DASK_GPU_RESOURCES name (RunnerOptions.ENVIRONMENT). Deployments load this module afresh
    in each flow-run process, so the serving process's environment is how it picks Dask."""
    return make_task_runner(RunnerOptions.from_environment(os.environ))


# persist_result=False and a JSON serializer: a failing flow run would otherwise still write its
# exception, pickled, under PREFECT_HOME/storage.
@flow(name="label-partition", flow_run_name="{job.source}", persist_result=False,
      result_serializer="json", validate_parameters=False)  # fmt: skip
def label_partition(job: Job) -> RunSummary:
    """List, embed, learn, predict and commit one source prefix."""
    summary = RunSummary.start(job)
    timed = _stage_timer(summary.stage_seconds)
    try:
        with timed("list"):
            found = stages.list_images(job)
        with timed("embed"):
            plan = stages.plan_embedding(found.images, job)
            progress.announce("embed", sum(len(shard.uris) for shard in plan.shards))
            with _gpu_annotation():
                shards = stages.embed_shard.map(plan.shards, unmapped(job)).result()
        _count_embedding(summary, found, plan, shards)
        # Read the index again only if this run added to it.
        index = stages.index_embeddings(job) if plan.shards else plan.index
        todo = stages.plan_predictions(found.images, index, job)
        if todo:
            to_predict = sum(p.images for p in todo)
            with timed("learn"), _gpu_annotation():  # on a worker: where the GPUs are
                choice = stages.vision_proxy.submit(found.images, index, to_predict, job)
                choice = choice.result()
            progress.announce("predict", to_predict)
            with timed("predict"):
                parts = stages.predict_shard.map(todo, unmapped(choice.proxy), unmapped(job))
                parts = parts.result()
            with timed("commit"):
                stages.commit_predictions(parts, job)
            _count_predictions(summary, choice, parts)
        summary.finished_at = _now()
        stages.record_run(summary, job)
    except Exception as error:
        _record_failure(summary, job, error)
        raise
    _publish(summary)
    return summary


@flow(name="inmap", persist_result=False, result_serializer="json", log_prints=True,
      task_runner=task_runner_from_env())  # fmt: skip
@takes_options(RunRequest)
def inmap_flow(**parameters) -> list[RunSummary]:
    """Label every image under `source` (a prefix, or a list of prefixes for a backfill) that has
    no prediction yet for these classes, model and prompts, and write the predictions to
    `output`. Secrets never go in `storage_options`: see `credentials_block`."""
    try:
        return _label_request(RunRequest.parse(parameters))
    except InmapError as error:
        # The one-line reason is the state's message: `prefect deployment run --watch` and the
        # UI show it. A caller in Python still gets the error itself.
        return Failed(message=f"{type(error).__name__}: {error}", data=error)


def _label_request(request: RunRequest) -> list[RunSummary]:
    run_id = str(flow_run.get_id() or layout.new_run_id())
    job = stages.prepare_job(request, run_id)
    partitions = request.partitions
    runner = FlowRunContext.get().task_runner  # each partition's tasks run where the run's do
    get_run_logger().info("task runner: %s", type(runner).__name__)
    _check_cluster(runner, job, partitions)
    summaries, failures = [], []
    with _held_lease(job, request.lease_wait, request.lease_ttl) as job:
        stages.tidy_output(job)
        for number, prefix in enumerate(partitions):
            partition_id = run_id if len(partitions) == 1 else f"{run_id}-p{number:04d}"
            partition = label_partition.with_options(task_runner=runner.duplicate())
            try:
                summaries.append(partition(job.for_partition(prefix, partition_id)))
            except Exception as error:  # one bad partition must not stop a backfill
                if len(partitions) == 1:
                    raise
                get_run_logger().error("partition %s failed: %s", prefix, error)
                failures.append(f"{prefix}: {error}")
    if failures:
        raise InmapError(f"{len(failures)} of {len(partitions)} partitions failed: {failures}")
    return summaries


def _check_cluster(runner, job: Job, partitions: list[str]) -> None:
    """Before any work: refuse, in seconds and in one line, an existing Dask cluster that cannot
    run this job (inmap.cluster.preflight); the partitions' runners inherit what it expects."""
    from flows.dask_runner import InmapDaskTaskRunner

    if isinstance(runner, InmapDaskTaskRunner):
        runner.expect(local_paths=[*partitions, job.output], device=job.model.device)
        runner.preflight()


@contextmanager
def _held_lease(job: Job, wait: float, ttl: float):
    """Hold the output's lease in this (the flow's) process for the whole run; tasks check it
    before committing. The block's secrets are loaded here for the lease alone."""
    options = credentials.attach(job).options
    held = lease.acquire(job.output, job.run_id, options, wait=wait, ttl=ttl)
    if held.previous is not None:  # a run that died holding it never recorded itself
        try:
            maintenance.record_interrupted_run(job.output, held.previous, job.run_id, options)
        except StorageError as error:
            get_run_logger().warning("could not record the interrupted run: %s", error)
    try:
        yield replace(job, lease=held.url)
    finally:
        held.release()


def _count_embedding(summary: RunSummary, found, plan, shards) -> None:
    summary.listed = len(found)
    summary.cached = plan.cached + sum(s.embedded for s in shards if s.cached)
    summary.embedded = sum(s.embedded for s in shards if not s.cached)
    for shard in shards:  # so an operator sees which hosts and devices did the embedding
        if not shard.cached and shard.embedded:
            where = shard.embedded_on or "unknown"
            summary.embedded_on[where] = summary.embedded_on.get(where, 0) + shard.embedded
    summary.failed = sum(s.failed for s in shards) + found.problems.num_rows
    unreadable = [item for s in shards for item in s.unreadable]
    summary.unreadable = len(unreadable)
    if found.images.num_rows:
        summary.listing_mark = found.images["uri"][-1].as_py()
    if unreadable:
        shown = "; ".join(f"{uri}: {reason}" for uri, reason in unreadable[:3])
        raise UnreadableImagesError(
            f"{len(unreadable)} image(s) under {summary.source} could not be read even after "
            f"retrying, so this partition commits nothing (a rerun resumes from the embeddings "
            f"already made), e.g. {shown}"
        )


def _count_predictions(summary: RunSummary, choice, parts) -> None:
    histogram, changed, warnings = prediction_statistics(parts)
    summary.predicted = sum(part.num_rows for part in parts)
    summary.unknowns = unknown_count(parts)
    summary.label_histogram = dict(histogram.most_common())
    summary.changed_from_zero_shot = changed
    summary.warnings = warnings
    summary.proxy_id = choice.proxy.proxy_id
    summary.proxy_learned = choice.learned
    summary.proxy_reason = choice.reason
    summary.proxy_images = choice.proxy.n_images
    logger = get_run_logger()
    for warning in warnings:
        logger.warning(warning)


def _record_failure(summary: RunSummary, job: Job, error: Exception) -> None:
    """Record a failed run in the runs table, if storage lets us; never hides the error."""
    summary.status, summary.error, summary.finished_at = "failed", str(error)[:2000], _now()
    summary.listing_mark = None  # a cursor never moves past a failed run
    try:
        stages.record_run.fn(summary, credentials.attach(job))
    except Exception as record_error:
        get_run_logger().warning("could not record the failed run: %s", record_error)


def _publish(summary: RunSummary) -> None:
    create_markdown_artifact(
        summary.markdown(),
        key=f"inmap-summary-{summary.labelset}"[:50].lower(),
        description=f"inmap run over {summary.source}",
    )
    get_run_logger().info(summary.line())


def _stage_timer(seconds: dict[str, float]):
    @contextmanager
    def timed(stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start

    return timed


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)
