"""The `inmap` flow: list, plan, embed, learn the vision proxy, predict, commit, summarise.

One source prefix is one partition with its own run; a list of prefixes (a backfill) runs them one
after the other, each committed on its own, so a failed partition never blocks the others and a
rerun resumes from the content-addressed shards already written.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from contextlib import contextmanager, nullcontext

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from inmap import pipeline
from inmap.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED
from inmap.pipeline import ModelSpec
from inmap.proxy import ProxyConfig
from tasks import stages

# inmap's own progress lines (embedding, text proxy, proxy learning) are INFO: show them. With
# PREFECT_LOGGING_EXTRA_LOGGERS=inmap (set by the CLI and deployments.serve) they reach run logs.
logging.getLogger("inmap").setLevel(logging.INFO)


@contextmanager
def _timed(stage_seconds: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - start


# Set by `make_task_runner(..., gpu_resources=True)`, i.e. `inmap label --dask-gpus`.
GPU_RESOURCES_ENV = "INMAP_DASK_GPU_RESOURCES"


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


def label_partition(
    source: str,
    classes: list[str],
    output: str,
    spec: ModelSpec,
    templates: str | list[str],
    shard_size: int,
    batch_size: int,
    config: ProxyConfig,
    max_train_images: int | None,
    top_k: int,
    storage_options: dict | None,
    run_id: str,
) -> dict:
    logger = get_run_logger()
    seconds: dict[str, float] = {}
    labelset = pipeline.labelset_id(classes, spec, templates)
    pipeline.ensure_writable(output, run_id, storage_options)

    with _timed(seconds, "list"):
        manifest = stages.list_images(source, storage_options)
    logger.info("listed %d images under %s", len(manifest), source)

    with _timed(seconds, "embed"):
        plans, cached = (
            stages.plan_shards(manifest, output, spec, shard_size, storage_options)
            if len(manifest)
            else ([], 0)
        )
        logger.info("%d images already embedded; %d shards to embed", cached, len(plans))
        with _gpu_annotation():
            shard_futures = stages.embed_shard.map(
                plans, *map(unmapped, (output, spec, batch_size, run_id, storage_options))
            )
        shard_results = shard_futures.result()

    counts = {
        "listed": len(manifest),
        "cached": cached + sum(r.embedded for r in shard_results if r.cached),
        "embedded": sum(r.embedded for r in shard_results if not r.cached),
        "failed": sum(r.failed for r in shard_results),
        "predicted": 0,
    }
    proxy = None
    staged: list[str | None] = []
    predicted_labels: Counter[str] = Counter()
    changed = 0
    warnings: list[str] = []
    # One index of the embeddings after this run's embedding, for learning and for prediction.
    index = stages.index_embeddings(output, spec, storage_options)
    todo = stages.plan_predictions(manifest, index, output, labelset, storage_options)
    if todo:
        with _timed(seconds, "text proxy"):
            text_proxy = stages.build_text_proxy(classes, spec, templates)
        with _timed(seconds, "learn"):
            proxy = stages.learn_proxy(
                manifest,
                index,
                text_proxy,
                classes,
                config,
                max_train_images,
                output,
                spec,
                storage_options,
            )
        with _timed(seconds, "predict"):
            staged = stages.predict_shard.map(
                [shard for shard, _ in todo],
                [wanted for _, wanted in todo],
                *map(
                    unmapped,
                    (proxy, output, spec, labelset, run_id, config, top_k, storage_options),
                ),
            ).result()
        counts["predicted"] = sum(len(wanted) for _, wanted in todo)
        predicted_labels, changed, warnings = pipeline.staged_statistics(staged, storage_options)
        for warning in warnings:
            logger.warning(warning)
    elif not len(manifest):
        logger.warning("no images found under %s: nothing to label", source)
    else:
        logger.info("every listed image already has a prediction for these classes and model")

    summary = {
        "source": source,
        "output": output,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "labelset": labelset,
        "counts": counts,
        "label_histogram": dict(predicted_labels.most_common()),
        "changed_from_zero_shot": changed,
        "warnings": warnings,
        "proxy_id": proxy.proxy_id if proxy else None,
        "proxy_stats": proxy.stats if proxy else None,
        "stage_seconds": seconds,
    }
    with _timed(seconds, "commit"):
        summary["summary_uri"] = stages.commit_run(
            output, run_id, labelset, staged, summary, storage_options
        )
    create_markdown_artifact(
        pipeline.summary_markdown(summary),
        key=f"inmap-summary-{labelset}"[:50].lower(),
        description=f"inmap run over {source}",
    )
    logger.info(
        "labelled %d images (%d embedded, %d cached, %d failed) in %.1fs",
        counts["predicted"],
        counts["embedded"],
        counts["cached"],
        counts["failed"],
        sum(seconds.values()),
    )
    return summary


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


@flow(name="inmap", task_runner=task_runner_from_env(), log_prints=True)
def inmap_flow(
    source: str | list[str],
    classes: list[str] | str,
    output: str,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    templates: str | list[str] = "paper",
    shard_size: int = 2000,
    batch_size: int = 64,
    device: str = "auto",
    hyperparameters: ProxyConfig = ProxyConfig(),  # noqa: B008 - frozen dataclass, safe default
    max_train_images: int | None = 200_000,
    top_k: int = 5,
    storage_options: dict | None = None,
) -> list[dict]:
    """Label every image under `source` (a prefix, or a list of prefixes for a backfill)
    that has no prediction yet for these classes and this model, and write the predictions
    under `output`."""
    spec = ModelSpec(model, pretrained, device)
    context = FlowRunContext.get()
    if context is not None:
        get_run_logger().info("task runner: %s", type(context.task_runner).__name__)
    class_names = pipeline.load_classes(classes, storage_options)
    partitions = [source] if isinstance(source, str) else list(source)
    run_id = str(flow_run.get_id() or pipeline.new_run_id())
    summaries, failures = [], []
    for number, prefix in enumerate(partitions):
        partition_run_id = run_id if len(partitions) == 1 else f"{run_id}-p{number:04d}"
        try:
            summaries.append(
                label_partition(
                    prefix,
                    class_names,
                    output,
                    spec,
                    templates,
                    shard_size,
                    batch_size,
                    hyperparameters,
                    max_train_images,
                    top_k,
                    storage_options,
                    partition_run_id,
                )
            )
        except Exception as error:  # one bad partition must not stop a backfill
            if len(partitions) == 1:
                raise
            get_run_logger().error("partition %s failed: %s", prefix, error)
            failures.append(f"{prefix}: {error}")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(partitions)} partitions failed: {failures}")
    return summaries
