"""Where everything lives under the output, and how each thing is named.

    OUT/
      embeddings/<model key>/<shard id>.parquet   embedding shards, content-addressed
      text-proxies/<text proxy id>.parquet        text proxies, content-addressed
      proxies/<proxy id>.parquet                  vision proxy artifacts, content-addressed
      predictions/                                Delta table, partitioned by labelset
      errors/                                     Delta table of images that failed
      runs/                                       Delta table, one row per partition run

Names are hashes of what determines the content, so a name that exists is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence

from inmap import __version__, storage
from inmap.model import ModelSpec


def digest(parts: object) -> str:
    """sha256 of a JSON rendering of `parts` (keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def embedding_dir(output: str, model: ModelSpec) -> str:
    return storage.join(output, "embeddings", model.key)


def shard_uri(output: str, model: ModelSpec, shard_id: str) -> str:
    return storage.join(embedding_dir(output, model), f"{shard_id}.parquet")


def shard_id(
    uris: Sequence[str], etags: Sequence[str], model: ModelSpec, preprocessing_id: str
) -> str:
    """Names the embeddings of these images by this model and preprocessing."""
    return digest([list(uris), list(etags), model.name, model.weights_id, preprocessing_id,
                   __version__])[:24]  # fmt: skip


def labelset_id(classes: Sequence[str], model: ModelSpec, templates: object) -> str:
    """The identity of 'these classes, by this model, with these prompts'."""
    return digest([list(classes), model.name, model.weights_id, templates])[:16]


def text_proxy_uri(output: str, text_proxy_id: str) -> str:
    return storage.join(output, "text-proxies", f"{text_proxy_id}.parquet")


def proxy_uri(output: str, proxy_id: str) -> str:
    return storage.join(output, "proxies", f"{proxy_id}.parquet")


def errors_dir(output: str) -> str:
    return storage.join(output, "errors")


def predictions_dir(output: str) -> str:
    return storage.join(output, "predictions")


def runs_dir(output: str) -> str:
    return storage.join(output, "runs")


def new_run_id() -> str:
    """A sortable run id for runs outside Prefect."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(4).hex()
