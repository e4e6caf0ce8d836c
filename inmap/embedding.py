"""Embedding: plan shards of images that have no embedding yet, and embed one shard.

An embedding shard is one content-addressed Parquet file; it is written once, atomically, and its
existence is the cache. Beside the shards, a small Delta table (`_index`) holds (uri, etag, shard)
for every embedded image, so planning a run reads about 100 bytes per archived image and never a
vector. The index is derived: a shard written just before a crash, with no index rows yet, is
adopted at the next planning from its two small columns; index rows whose shard is gone or has
another size are ignored, and their images embedded again.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from inmap import failures, layout, storage, tables
from inmap.job import Job
from inmap.pairs import anti_join, semi_join
from inmap.schemas import EMBEDDING_INDEX_SCHEMA

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    """A shard of images to embed, named by the hash of its content and of how it is embedded."""

    shard_id: str
    uris: tuple[str, ...]
    etags: tuple[str, ...]
    retrying: tuple[str, ...] = ()  # uris whose read failed in an earlier run


@dataclass(frozen=True)
class EmbeddingPlan:
    shards: list[ShardPlan]
    cached: int  # listed images that already have an embedding
    known_failures: int  # listed images that failed to decode before, unchanged since
    index: pa.Table | None = None  # the embedding index it was planned from


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    embedded: int
    failed: int  # decode failures and vanished objects: error rows, never blocking
    cached: bool
    unreadable: tuple[tuple[str, str], ...] = ()  # (uri, reason) still unreadable after retries
    embedded_on: str = ""  # "host device" of the process that embedded it (empty when cached)


def index_uri(job: Job) -> str:
    return layout.index_uri(job.output, job.model)


def embedding_index(job: Job) -> pa.Table:
    """(uri, etag, shard_uri) of the images embedded with the job's model (`shard_uri`
    dictionary-encoded: one string per shard, not per image).

    Reads the index table and lists the shard files (sizes only); see the module docstring. Its
    memory is about the index's own: no join, no per-image strings built."""
    directory = layout.embedding_dir(job.output, job.model)
    files = {
        layout.shard_id_of(url): size
        for url, size in storage.list_files(directory, job.options).items()
        if layout.shard_id_of(url) is not None
    }
    index = tables.read(index_uri(job), job.options)
    if index is None:
        index = EMBEDDING_INDEX_SCHEMA.empty_table()
    shard_ids = pc.dictionary_encode(index["shard_id"]).combine_chunks()
    listed_sizes = pa.array([files.get(sid, -1) for sid in shard_ids.dictionary.to_pylist()],
                            pa.int64())  # fmt: skip
    # A row counts when its shard file is there with the size it was indexed with.
    valid = pc.equal(index["shard_bytes"], pc.take(listed_sizes, shard_ids.indices))
    index = index.filter(valid)
    # Files no index row vouches for: written just before a crash, or since damaged (another
    # size than indexed). Each is read (two small columns) and indexed, or moved aside.
    orphans = set(files) - set(pc.unique(index["shard_id"]).to_pylist())
    if orphans:
        adopted = _adopt(sorted(orphans), files, job)
        index = pa.concat_tables([index.cast(EMBEDDING_INDEX_SCHEMA), adopted])
    shard_ids = pc.dictionary_encode(index["shard_id"]).combine_chunks()
    shard_uris = pa.DictionaryArray.from_arrays(
        shard_ids.indices,
        pa.array([layout.shard_uri_in(directory, sid) for sid in shard_ids.dictionary.to_pylist()]),
    )
    return pa.table({"uri": index["uri"], "etag": index["etag"], "shard_uri": shard_uris})


def _adopt(shard_ids: list[str], sizes: dict[str, int], job: Job) -> pa.Table:
    """Index rows for shards with none (a crash between writing a shard and indexing it); a
    file that is not Parquet is moved aside, so its images are embedded again."""
    rows = []
    for shard_id in shard_ids:
        url = layout.shard_uri(job.output, job.model, shard_id)
        try:
            pairs = storage.read_parquet(url, ["uri", "etag"], job.options)
        except storage.CorruptFileError as error:
            moved = storage.move_aside(url, job.options)
            logger.warning("%s; moved it to %s and will embed its images again", error, moved)
            continue
        rows.append(_index_rows(pairs, shard_id, sizes[shard_id]))
    if not rows:
        return EMBEDDING_INDEX_SCHEMA.empty_table()
    adopted = pa.concat_tables(rows)
    tables.append(index_uri(job), adopted, job.options, app_id=None)
    logger.warning("indexed %d shard(s) written before an interruption", len(rows))
    return adopted


def _index_rows(pairs: pa.Table, shard_id: str, shard_bytes: int) -> pa.Table:
    n = pairs.num_rows
    return pa.table(
        {
            "uri": pairs["uri"],
            "etag": pairs["etag"],
            "shard_id": pa.array([shard_id] * n, pa.string()),
            "shard_bytes": pa.array([shard_bytes] * n, pa.int64()),
        },
        schema=EMBEDDING_INDEX_SCHEMA,
    )


def plan_embedding(
    manifest: pa.Table, index: pa.Table, known_failures: pa.Table, job: Job
) -> EmbeddingPlan:
    """Cut the listed images with no embedding yet into shards of at most `job.settings.shard_size`.

    Only new or changed objects are planned, so a new drop embeds only itself and a rerun after a
    crash resumes where it stopped. Sorting by uri keeps the plan, and so the shard ids, stable.
    Images that failed to decode before (`known_failures`, stage "decode") are skipped until they
    change; those whose read failed are tried again."""
    from inmap.encoder import preprocessing_id as preprocessing_of

    decode = failures.decode_failures(known_failures)
    pending = anti_join(anti_join(manifest, index), decode).sort_by("uri")
    cached = semi_join(manifest, index).num_rows
    skipped = semi_join(anti_join(manifest, index), decode).num_rows
    unread = set(
        known_failures.filter(pc.equal(known_failures["stage"], "read"))["uri"].to_pylist()
    )
    if pending.num_rows == 0:
        return EmbeddingPlan([], cached, skipped, index)
    preprocessing_id = preprocessing_of(job.model)
    uris = pending["uri"].to_pylist()
    etags = pending["etag"].to_pylist()
    shards = []
    for start in range(0, len(uris), job.settings.shard_size):
        chunk_uris = tuple(uris[start : start + job.settings.shard_size])
        chunk_etags = tuple(etags[start : start + job.settings.shard_size])
        shard_id = layout.shard_id(chunk_uris, chunk_etags, job.model, preprocessing_id)
        retrying = tuple(uri for uri in chunk_uris if uri in unread)
        shards.append(ShardPlan(shard_id, chunk_uris, chunk_etags, retrying))
    return EmbeddingPlan(shards, cached, skipped, index)


def embed_shard(
    plan: ShardPlan, job: Job, on_progress: Callable[[int, int], None] | None = None
) -> ShardResult:
    """Embed one shard unless its file exists, recording failures, then index it.

    Order: error rows first, then the shard file (its existence means the shard is done), then the
    index rows. A crash between any two is repaired by the next run. Images whose read failed
    after retrying are left out of the shard, so a later run plans them again."""
    from inmap.batches import embed_images
    from inmap.encoder import load_encoder

    url = layout.shard_uri(job.output, job.model, plan.shard_id)
    if storage.exists(url, job.options):
        try:
            rows = storage.parquet_rows(url, job.options)
        except storage.CorruptFileError as error:
            moved = storage.move_aside(url, job.options)
            logger.warning("%s; moved it to %s and embedding it again", error, moved)
        else:
            _index_shard(url, plan.shard_id, job)
            unreadable = _left_out_unread(url, rows, plan, job)
            return ShardResult(plan.shard_id, rows, 0, cached=True, unreadable=unreadable)
    encoder = load_encoder(job.model)
    result = embed_images(
        encoder,
        zip(plan.uris, plan.etags, strict=True),
        storage_options=job.options,
        throughput=job.throughput,
        on_progress=on_progress,
    )
    failures.record(result.failures, job)
    if result.embeddings.num_rows:  # a shard of failures only leaves error rows, no file
        storage.write_parquet_atomic(result.embeddings, url, job.options)
        _index_shard(url, plan.shard_id, job, result.embeddings.select(["uri", "etag"]))
    if plan.retrying:
        read_now = set(result.embeddings["uri"].to_pylist())
        failures.resolve([uri for uri in plan.retrying if uri in read_now], job)
    unreadable = tuple((uri, f.reason) for uri, _, f in result.failures if f.stage == "read")
    return ShardResult(
        plan.shard_id,
        result.embeddings.num_rows,
        len(result.failures) - len(unreadable),
        cached=False,
        unreadable=unreadable,
        embedded_on=f"{socket.gethostname()} {encoder.device}",
    )


def _left_out_unread(url: str, rows: int, plan: ShardPlan, job: Job) -> tuple:
    """The images an existing shard file left out because their read failed: a retried task
    finds the file its first attempt wrote, and must fail the partition as that attempt did."""
    if rows >= len(plan.uris):
        return ()
    present = set(storage.read_parquet(url, ["uri"], job.options)["uri"].to_pylist())
    left_out = {uri for uri in plan.uris if uri not in present}
    known = failures.known_failures(job)
    unread = known.filter(pc.equal(known["stage"], "read"))["uri"].to_pylist()
    reason = "its read failed (see `inmap errors`)"
    return tuple((uri, reason) for uri in sorted(left_out.intersection(unread)))


def _index_shard(url: str, shard_id: str, job: Job, pairs: pa.Table | None = None) -> None:
    """Index the shard at `url` once: the app transaction makes a repeat a no-op."""
    size = storage.size(url, job.options)
    app_id = f"inmap-index-{shard_id}-{size}"
    if tables.committed(index_uri(job), app_id, job.options):
        return
    if pairs is None:
        pairs = storage.read_parquet(url, ["uri", "etag"], job.options)
    tables.append(index_uri(job), _index_rows(pairs, shard_id, size), job.options, app_id=app_id)
