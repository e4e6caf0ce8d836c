"""Prefect tasks, one per stage, each one call into `inmap`. Tasks take `(item, job)`.

Every task touching storage retries transient failures; input mistakes (`InputError`) and runs
that cannot commit (`UnreadableImagesError`, `OutputBusyError`) are never retried. Nothing is
cached or persisted by Prefect: the caches are content-addressed files under the output, whose
existence is the cache, and no task result is ever written (so no pickle either).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from inmap import (
    embedding,
    errors,
    failures,
    learning,
    lease,
    listing,
    maintenance,
    prediction,
    prepare,
    progress,
    report,
    storage,
    tables,
)
from inmap.credentials import merge_options
from inmap.job import Job
from inmap.options import MaintainRequest, RunRequest
from tasks import credentials
from tasks.progress import stage_progress


def is_transient(task, task_run, state) -> bool:
    """Prefect retry condition: the error's kind decides (`inmap.errors.is_transient`)."""
    try:
        state.result(raise_on_failure=True)
    except Exception as error:
        return errors.is_transient(error)
    return True


def stage(name: str, **options) -> Callable:
    """A Prefect task that retries storage failures, caches and persists nothing, and runs with
    the job's block credentials attached (loaded here, inside the task)."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def with_credentials(*args, **kwargs):
            args = [credentials.attach(a) if isinstance(a, Job) else a for a in args]
            kwargs = {k: credentials.attach(v) if isinstance(v, Job) else v
                      for k, v in kwargs.items()}  # fmt: skip
            return function(*args, **kwargs)

        settings = {
            "name": name,
            "cache_policy": NO_CACHE,
            "persist_result": False,
            "result_serializer": "json",  # never a pickle, even if something persisted
            "retries": 3,
            "retry_delay_seconds": [2, 10, 30],
            "retry_condition_fn": is_transient,
            **options,
        }
        return task(**settings)(with_credentials)

    return decorate


@stage("prepare-job")
def prepare_job(request: RunRequest, run_id: str) -> Job:
    block = credentials.block_options(request.credentials_block)
    return prepare.prepare_job(request, run_id, block)


@stage("tidy-output")
def tidy_output(job: Job) -> list[str]:
    """Under the lease: remove temporary files that crashed writers left (older than an hour)."""
    return storage.sweep_temporary_files(job.output)


@stage("list-images")
def list_images(job: Job) -> listing.Listing:
    mark = report.listing_mark(job) if job.settings.listing == "after-last" else None
    found = listing.list_images(job.source, job.options, start_after=mark)
    progress.reporter("list", job.source)(len(found), len(found))
    failures.record_listing_problems(found.problems, job)
    return found


@stage("plan-embedding")
def plan_embedding(manifest: pa.Table, job: Job) -> embedding.EmbeddingPlan:
    index = embedding.embedding_index(job)
    return embedding.plan_embedding(manifest, index, failures.known_failures(job), job)


@stage("embed-shard", task_run_name="embed-{plan.shard_id}")
def embed_shard(plan: embedding.ShardPlan, job: Job) -> embedding.ShardResult:
    lease.verify(job.lease, job.options)  # a run taken over stops here, wherever its tasks run
    with stage_progress("embed", plan.shard_id, f"embedding shard {plan.shard_id}") as on_progress:
        return embedding.embed_shard(plan, job, on_progress)


@stage("index-embeddings")
def index_embeddings(job: Job) -> pa.Table:
    lease.verify(job.lease, job.options)
    tables.compact_if_fragmented(embedding.index_uri(job), job.options)
    return embedding.embedding_index(job)


@stage("plan-predictions")
def plan_predictions(
    manifest: pa.Table, index: pa.Table, job: Job
) -> list[prediction.PredictionPlan]:
    return prediction.plan_predictions(manifest, index, prediction.done_predictions(job))


@stage("vision-proxy")
def vision_proxy(
    manifest: pa.Table, index: pa.Table, to_predict: int, job: Job
) -> learning.ProxyChoice:
    with stage_progress("learn", job.run_id, "learning the vision proxy (steps)") as on_step:
        return learning.vision_proxy(manifest, index, to_predict, job, on_step)


@stage("predict-shard", task_run_name="predict-{plan.shard_id}")
def predict_shard(
    plan: prediction.PredictionPlan, proxy: learning.ProxyArtifact, job: Job
) -> pa.Table:
    table = prediction.predict_shard(plan, proxy, job)
    progress.reporter("predict", plan.shard_uri)(plan.images, plan.images)
    return table


@stage("commit-predictions")
def commit_predictions(parts: list[pa.Table], job: Job) -> int:
    lease.verify(job.lease, job.options)
    return prediction.commit_predictions(parts, job)


@stage("record-run")
def record_run(summary: report.RunSummary, job: Job) -> None:
    lease.verify(job.lease, job.options)  # a run taken over is not recorded as completed
    report.record_run(summary, job)


@stage("maintain")
def maintain(request: MaintainRequest) -> list[str]:
    block = credentials.block_options(request.credentials_block)
    options = merge_options(request.storage_options, block)
    return maintenance.maintain(request.output, options, retention_hours=request.retention_hours)
