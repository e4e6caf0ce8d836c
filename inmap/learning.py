"""Learning: the text proxy of the classes, and the vision proxy over the embedded images.

Both are content-addressed Parquet files under the output, whose existence is the cache; nothing
is pickled. A text proxy is named by the classes, the templates and the model's weights; a vision
proxy by the images it was learned on, the classes, the model, the hyper-parameters and the text
proxy. A file that cannot be read is moved aside and computed again.

`choose_proxy` decides, per run, whether to learn a new vision proxy or reuse the labelset's
latest one (`Job.relearn`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from inmap import __version__, layout, storage
from inmap.config import ProxyConfig
from inmap.job import Job
from inmap.listing import source_uri
from inmap.pairs import first_per_key, semi_join
from inmap.proxy import fit_vision_proxy
from inmap.schemas import (
    PROXY_SCHEMA,
    TEXT_PROXY_SCHEMA,
    embedding_matrix,
    json_metadata,
    with_json_metadata,
)

logger = logging.getLogger(__name__)
GROWTH_TO_RELEARN = 0.10  # relearn="grown": relearn once the archive grew by more than this


@dataclass
class ProxyArtifact:
    """A learned vision proxy as saved under `proxies/`."""

    proxy_id: str
    uri: str
    classes: list[str]
    vision_proxy: np.ndarray  # (C, d) float32
    text_proxy: np.ndarray  # (C, d) float32
    hyperparameters: dict[str, object]  # the ProxyConfig it was learned with
    stats: dict[str, object] = field(default_factory=dict)
    # Attached for one run by `vision_proxy`, never saved: the negative vocabulary's (V, d) text
    # embeddings for inmap.openset.unknown_scores, and the unknown-score threshold chosen from the
    # drop (None when the run's `unknown` is "off").
    vocabulary: np.ndarray | None = None
    unknown_threshold: float | None = None

    @property
    def tau_t(self) -> float:  # temperatures for calibrated scores
        return float(self.hyperparameters.get("tau_t", ProxyConfig.tau_t))

    @property
    def tau_i(self) -> float:
        return float(self.hyperparameters.get("tau_i", ProxyConfig.tau_i))

    @property
    def n_images(self) -> int:
        """Images it was learned on (a sample, above `max_train_images`)."""
        return int(self.stats.get("n_images", 0))

    @property
    def archive_images(self) -> int:
        """Embedded images of the source when it was learned, sampled or not."""
        return int(self.stats.get("archive_images", self.n_images))


@dataclass
class ProxyChoice:
    """The proxy a run predicts with, and why."""

    proxy: ProxyArtifact
    learned: bool
    reason: str


# --- text proxy ----------------------------------------------------------------------------------


def text_proxy_id(job: Job) -> str:
    from inmap.text import resolve_templates

    prompts = [template("{}") for template in resolve_templates(job.templates)]
    return layout.digest(
        [list(job.classes), job.model.name, job.model.weights_id, prompts, __version__]
    )[:24]


def build_text_proxy(job: Job, on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(C, d) unit-norm text proxies of the job's classes, read from the cache or computed."""
    text_id = text_proxy_id(job)
    uri = layout.text_proxy_uri(job.output, text_id)
    cached = _read_cached(uri, job)
    if cached is not None:
        matrix = np.stack(cached["text_proxy"].to_numpy(zero_copy_only=False)).astype(np.float32)
        if cached["class_name"].to_pylist() == list(job.classes):
            return matrix
        logger.warning("text proxy %s does not hold these classes; computing it again", uri)
    from inmap.encoder import load_encoder
    from inmap.text import text_proxy

    encoder = load_encoder(job.model)
    proxy = text_proxy(
        encoder.model,
        encoder.tokenizer,
        list(job.classes),
        templates=job.templates,
        on_progress=on_progress,
    )
    matrix = np.ascontiguousarray(proxy.float().cpu().numpy())
    _write_text_embeddings(list(job.classes), matrix, uri, job, text_proxy_id=text_id)
    return matrix


def _write_text_embeddings(names: list[str], matrix: np.ndarray, uri: str, job: Job, **ids):
    """One text-embedding cache file (a text proxy, or the vocabulary): a row per name."""
    table = pa.table(
        {
            "class_id": pa.array(range(len(names)), pa.int32()),
            "class_name": names,
            "text_proxy": list(matrix),
        }
    )
    schema = with_json_metadata(
        TEXT_PROXY_SCHEMA,
        **ids,
        model=job.model.name,
        weights_id=job.model.weights_id,
        templates=job.templates,
        inmap_version=__version__,
    )
    storage.write_parquet_atomic(table.cast(schema), uri, job.options)


# Vocabulary embeddings by content id: the same words, model and templates give the same matrix.
_VOCABULARY_MEMO: dict[str, np.ndarray] = {}


def vocabulary_id(job: Job, words: list[str]) -> str:
    from inmap.text import resolve_templates

    prompts = [template("{}") for template in resolve_templates(job.templates)]
    return layout.digest(
        ["vocabulary", words, job.model.name, job.model.weights_id, prompts, __version__]
    )[:24]


def build_vocabulary(job: Job) -> np.ndarray:
    """(V, d) unit text embeddings of the shipped vocabulary without the words that name a listed
    class (inmap.openset), embedded like the text proxy and cached the same way."""
    from inmap.openset import vocabulary_words

    words = vocabulary_words(job.classes)
    if not words:
        return np.zeros((0, 0), np.float32)
    vocab_id = vocabulary_id(job, words)
    uri = layout.text_proxy_uri(job.output, vocab_id)
    cached = _read_cached(uri, job)
    if cached is not None and cached["class_name"].to_pylist() == words:
        return np.stack(cached["text_proxy"].to_numpy(zero_copy_only=False)).astype(np.float32)
    if vocab_id not in _VOCABULARY_MEMO:  # one process embeds it once, whatever the output
        from inmap.encoder import load_encoder
        from inmap.text import text_proxy

        encoder = load_encoder(job.model)
        embedded = text_proxy(
            encoder.model, encoder.tokenizer, words, templates=job.templates, batch_size=100
        )
        _VOCABULARY_MEMO[vocab_id] = np.ascontiguousarray(embedded.float().cpu().numpy())
    matrix = _VOCABULARY_MEMO[vocab_id]
    _write_text_embeddings(words, matrix, uri, job, vocabulary_id=vocab_id)
    return matrix


def unknown_mode(job: Job) -> str:
    """The run's `unknown` option: "off" (scores only) or "auto" (also flags, `is_unknown`)."""
    return job.settings.unknown


def attach_open_set(proxy: ProxyArtifact, rows: pa.Table, job: Job) -> ProxyArtifact:
    """The proxy with the run's vocabulary and, for unknown="auto", the unknown-score threshold
    chosen from the scores of the images in `rows` (the drop the proxy is for), without labels."""
    from inmap.openset import unknown_scores, unknown_threshold

    vocabulary = build_vocabulary(job)
    threshold = None
    if unknown_mode(job) == "auto" and rows.num_rows:
        scores = [
            unknown_scores(X, proxy.text_proxy, proxy.vision_proxy, vocabulary).numpy()
            for X in _shard_stream(rows, job.options)()
            if len(X)
        ]
        threshold = unknown_threshold(np.concatenate(scores)) if scores else None
    return replace(proxy, vocabulary=vocabulary if len(vocabulary) else None,
                   unknown_threshold=threshold)  # fmt: skip


def _read_cached(uri: str, job: Job) -> pa.Table | None:
    """A cached Parquet file, or None when it is absent or broken (then moved aside)."""
    try:
        return storage.read_parquet(uri, storage_options=job.options)
    except storage.CorruptFileError as error:
        moved = storage.move_aside(uri, job.options)
        logger.warning("%s; moved it to %s and computing it again", error, moved)
    except storage.NotFound:
        pass
    return None


# --- vision proxy --------------------------------------------------------------------------------


def training_rows(
    index: pa.Table, job: Job, manifest: pa.Table | None = None
) -> tuple[pa.Table, int]:
    """(the (uri, etag, shard_uri) rows to learn on, how many there were before sampling): the
    embedded images of the listed source (of the source prefix, when the listing is only what is
    new), each once, or a uniform sample of `job.settings.max_train_images` of them."""
    if manifest is not None and job.settings.listing == "full":
        rows = semi_join(index, manifest)
    else:
        source = source_uri(job.source, job.options)
        under = pc.starts_with(index["uri"], source.rstrip("/") + "/")
        rows = index.filter(pc.or_(under, pc.equal(index["uri"], source)))  # a folder, or a file
    rows = first_per_key(rows)  # an image may sit in two shards (see embedding_index)
    archive = rows.num_rows
    limit = job.settings.max_train_images
    if limit is not None and rows.num_rows > limit:
        chosen = sorted(random.Random(0).sample(range(rows.num_rows), limit))
        rows = rows.take(pa.array(chosen))
    return rows, archive


def choose_proxy(
    job: Job, archive_images: int, to_predict: int, latest_proxy_id: str | None
) -> tuple[ProxyArtifact | None, str]:
    """(the labelset's latest proxy, or None to learn one; why).

    `job.settings.relearn`: "grown" (default) reuses the latest proxy unless the archive grew by
    more than 10% since it was learned or this drop alone is more than 10% of what it was learned
    on; "always" learns every run; "never" reuses whenever there is a proxy."""
    if job.settings.relearn == "always":
        return None, "relearn='always'"
    if latest_proxy_id is None:
        return None, "this labelset had none yet"
    latest = _read_proxy(layout.proxy_uri(job.output, latest_proxy_id), job)
    if latest is None:
        return None, f"the latest proxy {latest_proxy_id} is missing or unreadable"
    if job.settings.relearn == "never":
        return latest, "relearn='never'"
    if latest.hyperparameters != asdict(job.hyperparameters):
        return None, "the hyper-parameters differ from those of the latest proxy"
    learned_on = max(latest.archive_images, 1)
    if archive_images > learned_on * (1 + GROWTH_TO_RELEARN):
        return None, (
            f"the archive grew from {learned_on} to {archive_images} embedded images, "
            f"more than {GROWTH_TO_RELEARN:.0%}"
        )
    if to_predict > learned_on * GROWTH_TO_RELEARN:
        return None, (
            f"this drop ({to_predict} images) is more than {GROWTH_TO_RELEARN:.0%} of the "
            f"{learned_on} images the latest proxy was learned from"
        )
    return latest, (
        f"learned when the archive had {learned_on} images; it has {archive_images} and this "
        f"drop {to_predict}, within {GROWTH_TO_RELEARN:.0%}"
    )


def learn_proxy(
    rows: pa.Table,
    text_proxy: np.ndarray,
    job: Job,
    archive_images: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> ProxyArtifact:
    """Learn the vision proxy over the embeddings in `rows` and save it, or read it back if the
    same images, classes and settings were learned before."""
    if rows.num_rows == 0:
        raise ValueError("no embedded images to learn a vision proxy from")
    pairs = sorted(zip(rows["uri"].to_pylist(), rows["etag"].to_pylist(), strict=True))
    proxy_id = layout.digest(
        [
            pairs,
            list(job.classes),
            job.model.key,
            asdict(job.hyperparameters),
            job.fit.precision,  # rounding: the one run option that changes the proxy
            hashlib.sha256(np.ascontiguousarray(text_proxy)).hexdigest(),
        ]
    )[:16]
    uri = layout.proxy_uri(job.output, proxy_id)
    cached = _read_proxy(uri, job)
    if cached is not None:
        return cached
    fit = fit_vision_proxy(
        _shard_stream(rows, job.options),
        torch.from_numpy(text_proxy),
        job.hyperparameters,
        job.fit,
        on_step=on_step,
    )
    vision_proxy = fit.vision_proxy.float().cpu().numpy()
    stats = {
        "n_images": fit.n_images,
        "archive_images": archive_images or fit.n_images,
        "iterations": fit.iterations,
        "converged": fit.converged,
        "refined_by": fit.refined_by,
        "zero_shot_agreement": fit.zero_shot_agreement,
    }
    table = pa.table(
        {
            "class_id": pa.array(range(len(job.classes)), pa.int32()),
            "class_name": list(job.classes),
            "vision_proxy": list(vision_proxy),
            "text_proxy": list(text_proxy.astype(np.float32)),
            "pseudo_label_mass": pa.array(fit.class_marginal.float().numpy(), pa.float32()),
            "zero_shot_count": fit.zero_shot_counts.numpy(),
            "predicted_count": fit.predicted_counts.numpy(),
        },
    )
    schema = with_json_metadata(
        PROXY_SCHEMA,
        proxy_id=proxy_id,
        labelset=job.labelset,
        model=job.model.name,
        pretrained=job.model.pretrained,
        weights_id=job.model.weights_id,
        hyperparameters=asdict(job.hyperparameters),
        precision=job.fit.precision,
        stats=stats,
        inmap_version=__version__,
    )
    storage.write_parquet_atomic(table.cast(schema), uri, job.options)
    return ProxyArtifact(
        proxy_id,
        uri,
        list(job.classes),
        vision_proxy,
        text_proxy,
        asdict(job.hyperparameters),
        stats,
    )


def load_proxy(uri: str, storage_options: dict | None = None) -> ProxyArtifact:
    return _proxy_from_table(uri, storage.read_parquet(uri, storage_options=storage_options))


def _proxy_from_table(uri: str, table: pa.Table) -> ProxyArtifact:
    meta = json_metadata(table.schema)
    hyper = dict(meta.get("hyperparameters") or {})  # type: ignore[arg-type]
    return ProxyArtifact(
        proxy_id=str(meta["proxy_id"]),
        uri=uri,
        classes=table["class_name"].to_pylist(),
        vision_proxy=np.stack(table["vision_proxy"].to_numpy(zero_copy_only=False)).astype(
            np.float32
        ),
        text_proxy=np.stack(table["text_proxy"].to_numpy(zero_copy_only=False)).astype(np.float32),
        hyperparameters=hyper,
        stats=dict(meta.get("stats", {})),  # type: ignore[arg-type]
    )


def _read_proxy(uri: str, job: Job) -> ProxyArtifact | None:
    table = _read_cached(uri, job)
    if table is None:
        return None
    try:
        return _proxy_from_table(uri, table)
    except (KeyError, ValueError) as error:
        moved = storage.move_aside(uri, job.options)
        logger.warning("proxy %s is unusable (%s); moved it to %s", uri, error, moved)
        return None


def _shard_stream(rows: pa.Table, storage_options: dict | None):
    """A callable giving a fresh iterator of (n_i, d) arrays, one per shard, filtered to `rows`."""
    shard_uris = sorted(set(rows["shard_uri"].to_pylist()))

    def stream():
        for shard_uri in shard_uris:
            shard = storage.read_parquet(shard_uri, ["uri", "etag", "embedding"], storage_options)
            wanted = rows.filter(pc.equal(rows["shard_uri"], shard_uri))
            yield embedding_matrix(semi_join(shard, wanted))

    return stream


def vision_proxy(
    manifest: pa.Table,
    index: pa.Table,
    to_predict: int,
    job: Job,
    on_step: Callable[[int, int], None] | None = None,
) -> ProxyChoice:
    """The vision proxy to predict with: the labelset's latest, or one learned now (see
    `choose_proxy`), over the embedded images of the source."""
    from inmap.report import latest_proxy_id

    rows, archive = training_rows(index, job, manifest)
    latest, reason = choose_proxy(job, archive, to_predict, latest_proxy_id(job))
    if latest is not None:
        return ProxyChoice(attach_open_set(latest, rows, job), False, reason)
    text_proxy = build_text_proxy(job)
    learned = learn_proxy(rows, text_proxy, job, archive, on_step)
    return ProxyChoice(attach_open_set(learned, rows, job), True, reason)
