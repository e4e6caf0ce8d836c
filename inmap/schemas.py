"""Arrow schemas for every file and table inmap writes, declared once.

Readers and writers import these; nobody rebuilds a column list by hand. Shards and proxies are
plain Parquet files; predictions, errors, runs and the embedding index are Delta Lake tables. All
open in polars, pandas, duckdb and pyarrow alike.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

# Float16 halves the size of the largest artifact; CLIP embeddings lose nothing that matters
# (cosine error ~1e-4) in half precision.
EMBEDDING_VALUE_TYPE = pa.float16()

# One row per listed object.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),  # etag, or "size-mtime" where there is none
        pa.field("size", pa.int64()),
    ]
)


# Entries named like images that are not readable files (broken or looping symbolic links).
LISTING_PROBLEMS_SCHEMA = pa.schema(
    [pa.field("uri", pa.string(), nullable=False), pa.field("error", pa.string(), nullable=False)]
)

# Beside the embedding shards of one model: which shard holds each image (no vectors).
EMBEDDING_INDEX_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("shard_bytes", pa.int64(), nullable=False),  # the shard file's size, to verify it
    ]
)

TIMESTAMP = pa.timestamp("us", tz="UTC")


def embedding_schema(dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """Schema of an embedding shard of `dim`-dimensional unit-norm embeddings.

    Shard-level facts (model, pretrained tag, preprocessing, library version) go in `metadata`.
    """
    return pa.schema(
        [
            pa.field("uri", pa.string(), nullable=False),
            pa.field("etag", pa.string(), nullable=False),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("embedding", pa.list_(EMBEDDING_VALUE_TYPE, dim), nullable=False),
        ],
        metadata=metadata,
    )


# Images that could not be listed, read or decoded: never dropped silently.
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # "decode" | "read" | "missing" | "list"
        pa.field("error", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("recorded_at", TIMESTAMP),
    ]
)

# One row per class of a cached text proxy; model, templates and id in the schema metadata.
TEXT_PROXY_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("text_proxy", pa.list_(pa.float32()), nullable=False),
    ]
)

# One row per class; hyper-parameters and pseudo-label statistics go in the schema metadata.
PROXY_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("vision_proxy", pa.list_(pa.float32()), nullable=False),
        pa.field("text_proxy", pa.list_(pa.float32()), nullable=False),
        pa.field("pseudo_label_mass", pa.float32()),  # estimated class marginal, sums to 1
        pa.field("zero_shot_count", pa.int64()),
        pa.field("predicted_count", pa.int64()),
    ]
)

# One row per (labelset, uri, etag), ever: the Delta table under OUT/predictions.
PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("zero_shot_label", pa.string()),
        pa.field("zero_shot_class_id", pa.int32()),
        pa.field("zero_shot_score", pa.float32()),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_class_ids", pa.list_(pa.int32())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
        pa.field("run_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("pretrained", pa.string()),
        pa.field("proxy_id", pa.string()),
        pa.field("predicted_at", TIMESTAMP),
        pa.field("labelset", pa.string(), nullable=False),  # classes + model + templates; partition
        # Open set (inmap.openset): how likely the image is none of the listed classes, in [0, 1];
        # `is_unknown` is null unless the run chose a threshold (unknown="auto"). Last, and
        # nullable, so that tables written before them take them by schema evolution.
        pa.field("unknown_score", pa.float32()),
        pa.field("is_unknown", pa.bool_()),
    ]
)

# One row per partition run (a report; the commit is the predictions transaction).
RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "completed" | "failed" | "interrupted"
        pa.field("source", pa.string()),
        pa.field("labelset", pa.string()),
        pa.field("model", pa.string()),
        pa.field("pretrained", pa.string()),
        pa.field("weights_id", pa.string()),
        pa.field("started_at", TIMESTAMP),
        pa.field("finished_at", TIMESTAMP),
        pa.field("listed", pa.int64()),
        pa.field("embedded", pa.int64()),
        pa.field("cached", pa.int64()),
        pa.field("failed", pa.int64()),
        pa.field("unreadable", pa.int64()),
        pa.field("predicted", pa.int64()),
        pa.field("changed_from_zero_shot", pa.int64()),
        pa.field("proxy_id", pa.string()),
        pa.field("proxy_learned", pa.bool_()),
        pa.field("proxy_reason", pa.string()),
        pa.field("proxy_images", pa.int64()),  # embedded images the proxy was learned over
        pa.field("listing_mark", pa.string()),  # the greatest uri listed (cursor listing)
        pa.field("warnings", pa.list_(pa.string())),
        pa.field("error", pa.string()),
        pa.field("stage_seconds", pa.string()),  # JSON {stage: seconds}
        pa.field("unknowns", pa.int64()),  # images flagged is_unknown; null when unknown="off"
        pa.field("embedded_on", pa.string()),  # JSON {"host device": images embedded there}
    ]
)


def with_json_metadata(schema: pa.Schema, **entries: object) -> pa.Schema:
    """Return `schema` with each entry stored as a JSON string under its key."""
    metadata = dict(schema.metadata or {})
    metadata.update({key.encode(): json.dumps(value).encode() for key, value in entries.items()})
    return schema.with_metadata(metadata)


def json_metadata(schema: pa.Schema) -> dict[str, object]:
    """Decode the metadata written by `with_json_metadata`; non-JSON entries come back as str."""
    decoded: dict[str, object] = {}
    for key, value in (schema.metadata or {}).items():
        try:
            decoded[key.decode()] = json.loads(value)
        except ValueError:
            decoded[key.decode()] = value.decode(errors="replace")
    return decoded


def embedding_matrix(embeddings: pa.Table | pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, d) float32 array from an `embedding` fixed-size-list column (or a table holding one)."""
    column = embeddings["embedding"] if isinstance(embeddings, pa.Table) else embeddings
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        size = getattr(column.type, "list_size", 0)
        return np.zeros((0, max(size, 0)), np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1).astype(np.float32)
