"""Prediction: label each embedding shard's new images, and commit a partition in one transaction.

The predictions table (`OUT/predictions`, Delta, partitioned by labelset) holds one row per
(labelset, uri, etag), ever. A partition's rows are committed by one MERGE that inserts only rows
not already there, tagged with the run's application transaction id: a retried commit is a no-op,
and a second writer racing on the same rows inserts nothing twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from inmap import layout, storage, tables
from inmap.job import Job
from inmap.learning import ProxyArtifact
from inmap.openset import unknown_scores
from inmap.pairs import anti_join, first_per_key, semi_join
from inmap.proxy import predict
from inmap.schemas import PREDICTIONS_SCHEMA, embedding_matrix

KEYS = ("labelset", "uri", "etag")


@dataclass(frozen=True)
class PredictionPlan:
    """The images of one embedding shard to label."""

    shard_uri: str
    wanted: pa.Table  # (uri, etag)

    @property
    def images(self) -> int:
        return self.wanted.num_rows

    @property
    def shard_id(self) -> str:
        return layout.shard_id_of(self.shard_uri)


def done_predictions(job: Job) -> pa.Table:
    """(uri, etag) already predicted for the job's labelset: two columns of one partition."""
    done = tables.read(
        layout.predictions_dir(job.output),
        job.options,
        columns=["uri", "etag"],
        partition=("labelset", job.labelset),
    )
    if done is None:
        return pa.table({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string())})
    return done


def plan_predictions(manifest: pa.Table, index: pa.Table, done: pa.Table) -> list[PredictionPlan]:
    """(embedding shard, its images to label) for listed, embedded images with no prediction."""
    # Each image once: it may sit in two shards (see embedding_index).
    located = first_per_key(semi_join(index, anti_join(manifest, done)))
    return [
        PredictionPlan(shard_uri, located.filter(pc.equal(located["shard_uri"], shard_uri))
                       .select(["uri", "etag"]))
        for shard_uri in sorted(set(located["shard_uri"].to_pylist()))
    ]  # fmt: skip


def predict_shard(plan: PredictionPlan, proxy: ProxyArtifact, job: Job) -> pa.Table:
    """`PREDICTIONS_SCHEMA` rows for the wanted images of one shard (not yet committed)."""
    shard = storage.read_parquet(plan.shard_uri, ["uri", "etag", "embedding"], job.options)
    shard = semi_join(shard, plan.wanted)
    if shard.num_rows == 0:
        return PREDICTIONS_SCHEMA.empty_table()
    features = torch.from_numpy(embedding_matrix(shard))
    classes = np.asarray(proxy.classes, dtype=object)
    k = min(job.settings.top_k, len(classes))
    device = job.fit.device
    # Scores are probabilities at each proxy's own temperature: tau_i for the vision proxy it was
    # learned with, tau_t (CLIP's 1/100) for the text proxy.
    inmap_pred = predict(features, proxy.vision_proxy, top_k=k, tau=proxy.tau_i, device=device)
    zero_shot = predict(features, proxy.text_proxy, top_k=1, tau=proxy.tau_t, device=device)
    top_ids = inmap_pred.top_k_ids.numpy()
    # How likely each image is none of the listed classes (inmap.openset); flagged only when the
    # run chose a threshold (unknown="auto").
    unknown = unknown_scores(features, proxy.text_proxy, proxy.vision_proxy, proxy.vocabulary)
    threshold = proxy.unknown_threshold
    n = shard.num_rows
    is_unknown = (
        pa.nulls(n, pa.bool_()) if threshold is None else pa.array((unknown > threshold).numpy())
    )
    now = datetime.now(timezone.utc)
    return pa.table(
        {
            "uri": shard["uri"],
            "etag": shard["etag"],
            "label": classes[inmap_pred.class_ids.numpy()].tolist(),
            "class_id": pa.array(inmap_pred.class_ids.numpy(), pa.int32()),
            "score": pa.array(inmap_pred.scores.numpy(), pa.float32()),
            "zero_shot_label": classes[zero_shot.class_ids.numpy()].tolist(),
            "zero_shot_class_id": pa.array(zero_shot.class_ids.numpy(), pa.int32()),
            "zero_shot_score": pa.array(zero_shot.scores.numpy(), pa.float32()),
            "top_k_labels": [classes[row].tolist() for row in top_ids],
            "top_k_class_ids": [row.tolist() for row in top_ids],
            "top_k_scores": [row.tolist() for row in inmap_pred.top_k_scores.numpy()],
            "run_id": [job.run_id] * n,
            "model": [job.model.name] * n,
            "pretrained": [job.model.pretrained or "none"] * n,
            "proxy_id": [proxy.proxy_id] * n,
            "predicted_at": [now] * n,
            "labelset": [job.labelset] * n,
            "unknown_score": pa.array(unknown.numpy(), pa.float32()),
            "is_unknown": is_unknown,
        },
        schema=PREDICTIONS_SCHEMA,
    )


def commit_predictions(parts: Sequence[pa.Table], job: Job) -> int:
    """Commit a partition's predictions in one Delta transaction; returns the rows inserted.

    Only rows whose (labelset, uri, etag) is not in the table are inserted, and the commit is
    tagged with the run id, so retrying it is a no-op."""
    parts = [part for part in parts if part.num_rows]
    if not parts:
        return 0
    rows = pa.concat_tables(parts)
    return tables.insert_new(
        layout.predictions_dir(job.output),
        rows,
        KEYS,
        job.options,
        app_id=commit_id(job),
        partition_by=["labelset"],
    )


def commit_id(job: Job) -> str:
    """The application transaction id of a partition run's predictions commit."""
    return f"inmap-predictions-{job.run_id}"
