"""Prefect tasks, one per stage. Each is a few lines around `inmap.pipeline`.

Retries go on the stages that touch storage or the network. Caching is by content: embedding shards
and proxies are content-addressed files whose existence is the cache, and the text proxy is cached
by Prefect on its inputs and this module's source.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from inmap import pipeline, storage
from inmap.encoder import ModelNotFoundError, WeightsUnavailableError
from inmap.pipeline import ClassesError, ModelSpec, ProxyArtifact, ShardPlan, ShardResult
from inmap.proxy import ProxyConfig

# Mistakes in the input do not go away by waiting: an unknown model, weights that cannot be
# downloaded (which already retried inside the Hugging Face client), a bad class list.
NOT_TRANSIENT = (ModelNotFoundError, WeightsUnavailableError, ClassesError)


def is_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry everything but input mistakes."""
    try:
        state.result(raise_on_failure=True)
    except NOT_TRANSIENT:
        return False
    except Exception:
        return True
    return True


# Object stores fail transiently; back off a little more each time.
STORAGE_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": is_transient,
}


@task(name="list-images", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def list_images(source: str, storage_options: dict | None) -> pa.Table:
    return storage.list_images(source, storage_options)


@task(name="plan-shards", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def plan_shards(
    manifest: pa.Table, output: str, spec: ModelSpec, shard_size: int, storage_options: dict | None
) -> tuple[list[ShardPlan], int]:
    return pipeline.plan_embedding(manifest, output, spec, shard_size, storage_options)


@task(
    name="embed-shard",
    cache_policy=NO_CACHE,  # the content-addressed shard file is the cache
    task_run_name="embed-{plan.shard_id}",
    **STORAGE_RETRIES,
)
def embed_shard(
    plan: ShardPlan,
    output: str,
    spec: ModelSpec,
    batch_size: int,
    run_id: str,
    storage_options: dict | None,
) -> ShardResult:
    return pipeline.embed_shard(
        plan, output, spec, batch_size=batch_size, run_id=run_id, storage_options=storage_options
    )


@task(name="build-text-proxy", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def build_text_proxy(
    classes: Sequence[str], spec: ModelSpec, templates: str | Sequence[str]
) -> np.ndarray:
    return pipeline.build_text_proxy(classes, spec, templates)


@task(name="index-embeddings", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def index_embeddings(output: str, spec: ModelSpec, storage_options: dict | None) -> pa.Table:
    return pipeline.embedding_index(output, spec, storage_options)


@task(name="learn-proxy", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def learn_proxy(
    manifest: pa.Table,
    index: pa.Table,
    text_proxy: np.ndarray,
    classes: Sequence[str],
    config: ProxyConfig,
    max_train_images: int | None,
    output: str,
    spec: ModelSpec,
    storage_options: dict | None,
) -> ProxyArtifact:
    rows = pipeline.training_rows(manifest, index, max_train_images)
    return pipeline.learn_proxy(
        rows, text_proxy, classes, config, output, spec, storage_options=storage_options
    )


@task(name="plan-predictions", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def plan_predictions(
    manifest: pa.Table, index: pa.Table, output: str, labelset: str, storage_options: dict | None
) -> list[tuple[str, pa.Table]]:
    return pipeline.plan_predictions(manifest, index, output, labelset, storage_options)


@task(
    name="predict-shard",
    cache_policy=NO_CACHE,
    task_run_name="predict-{shard_uri}",
    **STORAGE_RETRIES,
)
def predict_shard(
    shard_uri: str,
    wanted: pa.Table,
    proxy: ProxyArtifact,
    output: str,
    spec: ModelSpec,
    labelset: str,
    run_id: str,
    config: ProxyConfig,
    top_k: int,
    storage_options: dict | None,
) -> str | None:
    return pipeline.predict_shard(
        shard_uri,
        wanted,
        proxy,
        output,
        spec,
        labelset=labelset,
        run_id=run_id,
        config=config,
        top_k=top_k,
        storage_options=storage_options,
    )


@task(name="commit-run", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def commit_run(
    output: str,
    run_id: str,
    labelset: str,
    staged_parts: list[str | None],
    summary: dict,
    storage_options: dict | None,
) -> str:
    return pipeline.commit_run(output, run_id, labelset, staged_parts, summary, storage_options)
