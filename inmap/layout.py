"""Where everything lives under the output, and how each thing is named.

    OUT/
      embeddings/<model key>/<shard id>.parquet   embedding shards, content-addressed
      embeddings/<model key>/_index/              Delta table of (uri, etag, shard id)
      text-proxies/<text proxy id>.parquet        text proxies, content-addressed
      proxies/<proxy id>.parquet                  vision proxy artifacts, content-addressed
      predictions/                                Delta table, partitioned by labelset
      errors/                                     Delta table of images that failed
      runs/                                       Delta table, one row per partition run
      _lease/<generation>.json                    the run lease, one file per generation

Names are hashes of what determines the content, so a name that exists is a cache hit. This module
is the only one that builds or parses these paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from inmap import __version__, storage

if TYPE_CHECKING:  # model.py brings torch and open_clip; reading results needs neither
    from inmap.model import ModelSpec


def digest(parts: object) -> str:
    """sha256 of a JSON rendering of `parts` (keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


EMBEDDINGS = "embeddings"
INDEX = "_index"
LEASE = "_lease"
SHARD_SUFFIX = ".parquet"
LEASE_SUFFIX = ".json"


def embeddings_root(output: str) -> str:
    """The folder holding one folder per model."""
    return storage.join(output, EMBEDDINGS)


def embedding_dir(output: str, model: ModelSpec) -> str:
    return storage.join(embeddings_root(output), model.key)


def shard_uri(output: str, model: ModelSpec, shard_id: str) -> str:
    return shard_uri_in(embedding_dir(output, model), shard_id)


def shard_uri_in(directory: str, shard_id: str) -> str:
    """The shard `shard_id` in a model's embedding folder."""
    return storage.join(directory, f"{shard_id}{SHARD_SUFFIX}")


def shard_id_of(url: str) -> str | None:
    """The shard id named by a file in an embedding folder; None for any other file."""
    name = storage.basename(url)
    return name.removesuffix(SHARD_SUFFIX) if name.endswith(SHARD_SUFFIX) else None


def index_uri(output: str, model: ModelSpec) -> str:
    """The embedding index (a Delta table) of one model."""
    return index_uri_in(embedding_dir(output, model))


def index_uri_in(directory: str) -> str:
    """The embedding index in a model's embedding folder."""
    return storage.join(directory, INDEX)


def lease_dir(output: str) -> str:
    return storage.join(output, LEASE)


def lease_uri(directory: str, generation: int) -> str:
    """Generation `generation` of the lease whose folder is `directory` (`lease_dir`)."""
    return storage.join(directory, f"{generation:012d}{LEASE_SUFFIX}")


def lease_generation(url: str) -> int | None:
    """The generation a lease file names; None for any other file."""
    stem = storage.basename(url).removesuffix(LEASE_SUFFIX)
    return int(stem) if url.endswith(LEASE_SUFFIX) and stem.isdigit() else None


def lease_dir_of(url: str) -> str:
    """The lease folder of the lease file `url`."""
    return url.rstrip("/").rsplit("/", 1)[0]


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
