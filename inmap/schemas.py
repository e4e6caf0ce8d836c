"""Parquet schemas for every file inmap writes, declared once.

Readers and writers import these; nobody rebuilds a column list by hand. All files are plain
Parquet, so they open in polars, pandas, duckdb and pyarrow alike.
"""

from __future__ import annotations

import json

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


# Images that could not be read or decoded: never dropped silently.
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("stage", pa.string()),  # "read" | "decode"
        pa.field("error", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
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

# One row per image.
PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
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
        pa.field("labelset", pa.string()),  # hash of classes + model + templates
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
