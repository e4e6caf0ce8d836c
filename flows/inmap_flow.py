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
from typing import Annotated

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import WithJsonSchema

from inmap import layout, lease, progress
from inmap.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, ProxyConfig
from inmap.credentials import STORAGE_OPTIONS_SCHEMA
from inmap.decode import DEFAULT_PIXEL_BUDGET
from inmap.errors import InmapError, UnreadableImagesError
from inmap.job import Job, JobRequest
from inmap.report import RunSummary, prediction_statistics
from tasks import credentials, stages

# inmap's own INFO lines (adaptive refinement, repairs) reach run logs with
# PREFECT_LOGGING_EXTRA_LOGGERS=inmap, set by the command line and deployments.serve.
logging.getLogger("inmap").setLevel(logging.INFO)

GPU_RESOURCES_ENV = "INMAP_DASK_GPU_RESOURCES"  # set by `inmap label --dask-gpus`
# A deployment refuses secret option names before Prefect stores a run's parameters.
StorageOptions = Annotated[dict | None, WithJsonSchema(STORAGE_OPTIONS_SCHEMA)]


def _gpu_annotation():
    """On a Dask cluster whose workers declare `--resources GPU=1`, each embedding task holds one
    GPU: a worker takes one shard at a time, and several GPUs work as several workers. Off by
    default, since tasks asking for a resource no worker has would wait forever."""
    if os.environ.get(GPU_RESOURCES_ENV) != "1":
        return nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def make_task_runner(
    kind: str = "thread",
    *,
    dask_address: str | None = None,
    dask_workers: int = 2,
    gpu_resources: bool = False,
):
    """The task runner for `inmap_flow.with_options(task_runner=...)`.

    `thread`: Prefect's thread pool, one process. `dask`: prefect-dask on an existing cluster at
    `dask_address`, or a local cluster of `dask_workers` single-threaded processes.
    """
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=4)
    if kind != "dask":
        raise ValueError(f"unknown task runner {kind!r}: use 'thread' or 'dask'")
    from prefect_dask import DaskTaskRunner

    if gpu_resources:
        os.environ[GPU_RESOURCES_ENV] = "1"
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    cluster_kwargs = {"n_workers": dask_workers, "threads_per_worker": 1, "processes": True}
    if gpu_resources:
        cluster_kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_kwargs=cluster_kwargs)


def task_runner_from_env():
    """The task runner named by INMAP_TASK_RUNNER / INMAP_DASK_ADDRESS / INMAP_DASK_WORKERS.

    Deployments load this module afresh in each flow-run process, so the environment of the serving
    process is how a served deployment picks Dask.
    """
    env = os.environ.get
    address = env("INMAP_DASK_ADDRESS") or None
    return make_task_runner(
        "dask" if address else env("INMAP_TASK_RUNNER", "thread"),
        dask_address=address,
        dask_workers=int(env("INMAP_DASK_WORKERS", "2")),
        gpu_resources=env(GPU_RESOURCES_ENV) == "1",
    )


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
            with timed("learn"):
                choice = stages.vision_proxy(found.images, index, to_predict, job)
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
def inmap_flow(
    source: str | list[str],
    classes: list[str] | str,
    output: str,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    templates: str | list[str] = "paper",
    device: str = "auto",
    hyperparameters: ProxyConfig = ProxyConfig(),  # noqa: B008 - frozen dataclass, safe default
    precision: str = "float32",
    shard_size: int = 2000,
    batch_size: int = 64,
    max_train_images: int | None = 200_000,
    top_k: int = 5,
    relearn: str = "grown",
    listing: str = "full",
    read_retry_seconds: float = 120.0,
    pixel_budget: int = DEFAULT_PIXEL_BUDGET,
    storage_options: StorageOptions = None,
    credentials_block: str | None = None,
    lease_wait: float = lease.DEFAULT_WAIT,
) -> list[RunSummary]:
    """Label every image under `source` (a prefix, or a list of prefixes for a backfill) that has
    no prediction yet for these classes, model and prompts, and write the predictions to
    `output`. Secrets never go in `storage_options`: see `credentials_block`."""
    run_id = str(flow_run.get_id() or layout.new_run_id())
    request = JobRequest(
        source=source if isinstance(source, str) else tuple(source),
        classes=classes if isinstance(classes, str) else tuple(classes),
        output=output,
        run_id=run_id,
        model=model,
        pretrained=pretrained,
        device=device,
        templates=templates if isinstance(templates, str) else tuple(templates),
        hyperparameters=hyperparameters,
        precision=precision,
        batch_size=batch_size,
        shard_size=shard_size,
        top_k=top_k,
        max_train_images=max_train_images,
        relearn=relearn,
        listing=listing,
        read_retry_seconds=read_retry_seconds,
        pixel_budget=pixel_budget,
        storage_options=storage_options,
        credentials_block=credentials_block,
    )
    job = stages.prepare_job(request)
    partitions = request.partitions
    runner = FlowRunContext.get().task_runner  # each partition's tasks run where the run's do
    get_run_logger().info("task runner: %s", type(runner).__name__)
    summaries, failures = [], []
    with _held_lease(job, lease_wait) as job:
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


@contextmanager
def _held_lease(job: Job, wait: float):
    """Hold the output's lease in this (the flow's) process for the whole run; tasks check it
    before committing. The block's secrets are loaded here for the lease alone."""
    held = lease.acquire(job.output, job.run_id, credentials.attach(job).options, wait=wait)
    try:
        yield replace(job, lease=held.url)
    finally:
        held.release()


def _count_embedding(summary: RunSummary, found, plan, shards) -> None:
    summary.listed = len(found)
    summary.cached = plan.cached + sum(s.embedded for s in shards if s.cached)
    summary.embedded = sum(s.embedded for s in shards if not s.cached)
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
