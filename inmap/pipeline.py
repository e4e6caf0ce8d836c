"""The pipeline's stages as plain functions: list, plan, embed, learn, predict, commit.

Prefect tasks in `tasks/` are thin wrappers around these, so every stage runs and tests without
Prefect. Output layout under `output`:

    embeddings/<model_key>/<shard_id>.parquet       content-addressed; existence is the cache
    errors/<shard_id>.parquet                       images that could not be read or decoded
    proxies/<proxy_id>.parquet                      vision proxy artifact (one row per class)
    predictions/<labelset>/<run_id>/part-*.parquet  one row per image, committed runs only
    runs/<run_id>.json                              run summary, written last: the commit marker
    _staging/<run_id>/                              a run's predictions before commit

A run's predictions are written to `_staging/` and moved under `predictions/` only once every shard
succeeded; the summary in `runs/` is written last. `read_predictions` reads committed runs only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from inmap import __version__, storage
from inmap.proxy import ProxyConfig, fit_vision_proxy, predict
from inmap.schemas import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    PREDICTIONS_SCHEMA,
    PROXY_SCHEMA,
    json_metadata,
    with_json_metadata,
)


class ClassesError(ValueError):
    """The class list is missing, empty, malformed or has duplicates."""


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP model embeds the images; part of every cache key."""

    model: str
    pretrained: str | None
    device: str = "auto"

    @property
    def key(self) -> str:
        """A short, path-safe name for this model's embedding space."""
        tag = self.pretrained or "random"
        readable = f"{self.model}-{tag}".replace("/", "_").replace(":", "_")[-48:]
        return f"{readable}-{_digest([self.model, self.pretrained])[:8]}"


@dataclass(frozen=True)
class ShardPlan:
    """A shard of images to embed, named by the hash of its content and of how it is embedded."""

    shard_id: str
    uris: tuple[str, ...]
    etags: tuple[str, ...]


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    embedding_shard_uri: str
    embedded: int
    failed: int
    cached: bool


@dataclass
class ProxyArtifact:
    proxy_id: str
    uri: str
    classes: list[str]
    vision_proxy: np.ndarray  # (C, d) float32
    text_proxy: np.ndarray  # (C, d) float32
    stats: dict[str, object] = field(default_factory=dict)


def _digest(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# --- classes -------------------------------------------------------------------------------------


def load_classes(classes: Sequence[str] | str, storage_options: dict | None = None) -> list[str]:
    """Class names from a list, or from the URL of a text file (one per line) or a JSON list."""
    source = "the classes parameter"
    if isinstance(classes, str):
        source = classes
        if not storage.exists(classes, storage_options):
            raise ClassesError(f"classes file {classes} does not exist")
        text = storage.read_bytes(classes, storage_options).decode("utf-8-sig")
        if classes.lower().endswith(".json") or text.lstrip().startswith("["):
            try:
                names = json.loads(text)
            except ValueError as error:
                raise ClassesError(f"classes file {classes} is not valid JSON: {error}") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ClassesError(f"classes file {classes} must hold a JSON list of strings")
        else:
            names = text.splitlines()
            # A trailing newline is normal; an empty line in the middle is a mistake.
            while names and not names[-1].strip():
                names.pop()
            for number, name in enumerate(names, start=1):
                if not name.strip():
                    raise ClassesError(f"classes file {classes} line {number} is empty")
    else:
        names = list(classes)
    names = [name.strip() for name in names]
    if not names:
        raise ClassesError(f"{source} holds no class names")
    if any(not name for name in names):
        raise ClassesError(f"{source} has an empty class name")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name.lower() in seen:
            raise ClassesError(
                f"{source} names {name!r} twice (entries {seen[name.lower()] + 1} and {index + 1})"
            )
        seen[name.lower()] = index
    if len(names) < 2:
        raise ClassesError(f"{source} must name at least 2 classes to choose between")
    return names


def labelset_id(classes: Sequence[str], spec: ModelSpec, templates: str | Sequence[str]) -> str:
    """The identity of 'these classes, by this model, with these prompts'."""
    return _digest([list(classes), spec.model, spec.pretrained, templates])[:16]


# --- listing and planning ------------------------------------------------------------------------


def embedding_dir(output: str, spec: ModelSpec) -> str:
    return storage.join(output, "embeddings", spec.key)


def embedding_index(output: str, spec: ModelSpec, storage_options: dict | None = None) -> pa.Table:
    """(uri, etag, shard_uri) of every image already embedded with `spec` under `output`."""
    shard_uris = storage.glob(
        storage.join(embedding_dir(output, spec), "*.parquet"), storage_options
    )
    tables = []
    for shard_uri in shard_uris:
        pairs = storage.read_table(
            shard_uri, columns=["uri", "etag"], storage_options=storage_options
        )
        tables.append(
            pairs.append_column("shard_uri", pa.array([shard_uri] * len(pairs), pa.string()))
        )
    if not tables:
        return pa.table({name: pa.array([], pa.string()) for name in ("uri", "etag", "shard_uri")})
    return pa.concat_tables(tables)


def known_failures(output: str, storage_options: dict | None = None) -> pa.Table:
    """(uri, etag) of images that failed to decode before; they are not retried until they change.

    Read failures are transient (network, permissions) and are retried on every run.
    """
    urls = storage.glob(storage.join(output, "errors", "*.parquet"), storage_options)
    if not urls:
        return empty_manifest().select(["uri", "etag"])
    errors = storage.read_table(
        urls, columns=["uri", "etag", "stage"], storage_options=storage_options
    )
    return errors.filter(pc.equal(errors["stage"], "decode")).select(["uri", "etag"])


def _pair_keys(table: pa.Table) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(table["uri"], table["etag"], "\x00")


def _in_right(left: pa.Table, right: pa.Table) -> pa.ChunkedArray:
    """Whether each row of `left` has its (uri, etag) in `right`; order and columns kept."""
    return pc.is_in(_pair_keys(left), value_set=_pair_keys(right).combine_chunks())


def anti_join(left: pa.Table, right: pa.Table) -> pa.Table:
    """Rows of `left` whose (uri, etag) is not in `right`."""
    if len(right) == 0 or len(left) == 0:
        return left
    return left.filter(pc.invert(_in_right(left, right)))


def semi_join(left: pa.Table, right: pa.Table) -> pa.Table:
    """Rows of `left` whose (uri, etag) is in `right`."""
    if len(right) == 0 or len(left) == 0:
        return left.slice(0, 0)
    return left.filter(_in_right(left, right))


def plan_shards(
    manifest: pa.Table,
    embedded: pa.Table,
    failed: pa.Table,
    spec: ModelSpec,
    preprocessing_id: str,
    shard_size: int,
) -> list[ShardPlan]:
    """Cut the images that have no embedding yet into shards of at most `shard_size`.

    Only new or changed objects are planned, so a new drop embeds only itself and a rerun after a
    crash resumes where it stopped. Sorting by uri keeps the plan, and so the shard ids, stable.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    pending = anti_join(anti_join(manifest, embedded), failed).sort_by("uri")
    uris = pending["uri"].to_pylist()
    etags = pending["etag"].to_pylist()
    plans = []
    for start in range(0, len(uris), shard_size):
        chunk_uris = tuple(uris[start : start + shard_size])
        chunk_etags = tuple(etags[start : start + shard_size])
        shard_id = _digest(
            [chunk_uris, chunk_etags, spec.model, spec.pretrained, preprocessing_id, __version__]
        )[:24]
        plans.append(ShardPlan(shard_id, chunk_uris, chunk_etags))
    return plans


def plan_embedding(
    manifest: pa.Table,
    output: str,
    spec: ModelSpec,
    shard_size: int,
    storage_options: dict | None = None,
) -> tuple[list[ShardPlan], int]:
    """Shards to embed for `manifest`, and how many listed images already have an embedding."""
    from inmap.encoder import load_encoder

    index = embedding_index(output, spec, storage_options)
    failed = known_failures(output, storage_options)
    preprocessing_id = load_encoder(
        spec.model, spec.pretrained, device=spec.device
    ).preprocessing_id
    plans = plan_shards(manifest, index, failed, spec, preprocessing_id, shard_size)
    return plans, len(semi_join(manifest, index))


# --- embedding -----------------------------------------------------------------------------------


def embed_shard(
    plan: ShardPlan,
    output: str,
    spec: ModelSpec,
    *,
    batch_size: int = 64,
    run_id: str = "",
    storage_options: dict | None = None,
) -> ShardResult:
    """Embed one shard into `embeddings/<model_key>/<shard_id>.parquet` unless it exists."""
    from inmap.encoder import embed_images, load_encoder  # torch model loading is lazy

    shard_uri = storage.join(embedding_dir(output, spec), f"{plan.shard_id}.parquet")
    errors_uri = storage.join(output, "errors", f"{plan.shard_id}.parquet")
    if storage.exists(shard_uri, storage_options):
        embedded = storage.read_table(shard_uri, columns=["uri"], storage_options=storage_options)
        return ShardResult(plan.shard_id, shard_uri, len(embedded), 0, cached=True)
    encoder = load_encoder(spec.model, spec.pretrained, device=spec.device)
    embeddings, errors = embed_images(
        encoder,
        list(zip(plan.uris, plan.etags, strict=True)),
        storage_options=storage_options,
        batch_size=batch_size,
    )
    if len(errors):
        errors = errors.set_column(
            errors.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * len(errors))
        )
        storage.write_parquet_atomic(errors.cast(ERRORS_SCHEMA), errors_uri, storage_options)
    # The shard is written last: its existence means the whole shard, errors included, is done.
    storage.write_parquet_atomic(embeddings, shard_uri, storage_options)
    return ShardResult(plan.shard_id, shard_uri, len(embeddings), len(errors), cached=False)


# --- learning ------------------------------------------------------------------------------------


def build_text_proxy(
    classes: Sequence[str], spec: ModelSpec, templates: str | Sequence[str] = "paper"
) -> np.ndarray:
    """(C, d) unit-norm text proxies of `classes` averaged over `templates`."""
    from inmap.encoder import load_encoder
    from inmap.text import text_proxy

    encoder = load_encoder(spec.model, spec.pretrained, device=spec.device)
    proxy = text_proxy(
        encoder.model, encoder.tokenizer, list(classes), templates=templates, device=encoder.device
    )
    return np.ascontiguousarray(proxy.float().cpu().numpy())


def _embedding_matrix(table: pa.Table) -> np.ndarray:
    """(n, d) float32 array from an embedding table's fixed-size-list column."""
    column = table["embedding"].combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(table), dim).astype(np.float32)


def training_rows(
    manifest: pa.Table, index: pa.Table, max_images: int | None, seed: int = 0
) -> pa.Table:
    """The (uri, etag, shard_uri) rows to learn on: all embedded listed images, or a sample."""
    rows = semi_join(index, manifest)
    if max_images is not None and len(rows) > max_images:
        chosen = sorted(random.Random(seed).sample(range(len(rows)), max_images))
        rows = rows.take(pa.array(chosen))
    return rows


def _shard_stream(rows: pa.Table, storage_options: dict | None):
    """A callable giving a fresh iterator of (n_i, d) tensors, one per shard, filtered to `rows`."""
    shard_uris = sorted(set(rows["shard_uri"].to_pylist()))

    def stream() -> Iterator[torch.Tensor]:
        for shard_uri in shard_uris:
            shard = storage.read_table(shard_uri, storage_options=storage_options)
            wanted = rows.filter(pc.equal(rows["shard_uri"], shard_uri))
            yield torch.from_numpy(_embedding_matrix(semi_join(shard, wanted)))

    return stream


def learn_proxy(
    rows: pa.Table,
    text_proxy_matrix: np.ndarray,
    classes: Sequence[str],
    config: ProxyConfig,
    output: str,
    spec: ModelSpec,
    *,
    storage_options: dict | None = None,
) -> ProxyArtifact:
    """Learn the vision proxy over the embeddings in `rows`, and save it as a proxy artifact."""
    if len(rows) == 0:
        raise ValueError("no embedded images to learn a vision proxy from")
    pairs = sorted(zip(rows["uri"].to_pylist(), rows["etag"].to_pylist(), strict=True))
    proxy_id = _digest(
        [
            pairs,
            list(classes),
            spec.key,
            asdict(config),
            hashlib.sha256(np.ascontiguousarray(text_proxy_matrix)).hexdigest(),
        ]
    )[:16]
    uri = storage.join(output, "proxies", f"{proxy_id}.parquet")
    if storage.exists(uri, storage_options):
        return load_proxy(uri, storage_options)  # same images, classes and settings: same proxy
    fit = fit_vision_proxy(
        _shard_stream(rows, storage_options), torch.from_numpy(text_proxy_matrix), config
    )
    vision_proxy = fit.vision_proxy.float().cpu().numpy()
    stats = {
        "n_images": fit.n_images,
        "iterations": fit.iterations,
        "converged": fit.converged,
        "zero_shot_agreement": fit.zero_shot_agreement,
    }
    marginal = fit.class_marginal.float().cpu().numpy()
    table = pa.table(
        {
            "class_id": pa.array(range(len(classes)), pa.int32()),
            "class_name": list(classes),
            "vision_proxy": list(vision_proxy),
            "text_proxy": list(text_proxy_matrix.astype(np.float32)),
            "pseudo_label_mass": pa.array(marginal, pa.float32()),
            "zero_shot_count": fit.zero_shot_counts.numpy(),
            "predicted_count": fit.predicted_counts.numpy(),
        },
    )
    schema = with_json_metadata(
        PROXY_SCHEMA,
        proxy_id=proxy_id,
        model=spec.model,
        pretrained=spec.pretrained,
        hyperparameters=asdict(config),
        stats=stats,
        inmap_version=__version__,
    )
    storage.write_parquet_atomic(table.cast(schema), uri, storage_options)
    return ProxyArtifact(proxy_id, uri, list(classes), vision_proxy, text_proxy_matrix, stats)


def load_proxy(uri: str, storage_options: dict | None = None) -> ProxyArtifact:
    table = storage.read_table(uri, storage_options=storage_options)
    meta = json_metadata(table.schema)
    return ProxyArtifact(
        proxy_id=str(meta["proxy_id"]),
        uri=uri,
        classes=table["class_name"].to_pylist(),
        vision_proxy=np.stack(table["vision_proxy"].to_numpy(zero_copy_only=False)).astype(
            np.float32
        ),
        text_proxy=np.stack(table["text_proxy"].to_numpy(zero_copy_only=False)).astype(np.float32),
        stats=dict(meta.get("stats", {})),  # type: ignore[arg-type]
    )


# --- prediction and commit -----------------------------------------------------------------------


def staging_dir(output: str, run_id: str) -> str:
    return storage.join(output, "_staging", run_id)


def predict_shard(
    shard_uri: str,
    wanted: pa.Table,
    proxy: ProxyArtifact,
    output: str,
    spec: ModelSpec,
    *,
    labelset: str,
    run_id: str,
    config: ProxyConfig = ProxyConfig(),  # noqa: B008 - frozen dataclass
    top_k: int = 5,
    storage_options: dict | None = None,
) -> str | None:
    """Predict the `wanted` images of one embedding shard; returns the staged part's URL."""
    shard = semi_join(storage.read_table(shard_uri, storage_options=storage_options), wanted)
    if len(shard) == 0:
        return None
    features = torch.from_numpy(_embedding_matrix(shard))
    classes = np.asarray(proxy.classes, dtype=object)
    k = min(top_k, len(classes))
    # Scores are probabilities at each proxy's own temperature: tau_i for the vision proxy it was
    # learned with, tau_t (CLIP's 1/100) for the text proxy.
    vision = torch.from_numpy(proxy.vision_proxy)
    inmap_pred = predict(features, vision, top_k=k, tau=config.tau_i)
    zero_shot = predict(features, torch.from_numpy(proxy.text_proxy), top_k=1, tau=config.tau_t)
    top_ids = inmap_pred.top_k_ids.numpy()
    n = len(shard)
    table = pa.table(
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
            "run_id": [run_id] * n,
            "model": [spec.model] * n,
            "pretrained": [spec.pretrained] * n,
            "proxy_id": [proxy.proxy_id] * n,
            "labelset": [labelset] * n,
        },
        schema=PREDICTIONS_SCHEMA,
    )
    name = shard_uri.rstrip("/").rsplit("/", 1)[-1]
    part_uri = storage.join(staging_dir(output, run_id), f"part-{name}")
    storage.write_parquet_atomic(table, part_uri, storage_options)
    return part_uri


def plan_predictions(
    manifest: pa.Table,
    index: pa.Table,
    output: str,
    labelset: str,
    storage_options: dict | None = None,
) -> list[tuple[str, pa.Table]]:
    """(embedding shard, its images to label) for the listed images with no committed prediction.

    `index` is `embedding_index` after this run's embedding.
    """
    done = committed_predictions(output, labelset, storage_options, columns=["uri", "etag"])
    located = semi_join(index, anti_join(manifest, done))
    return [
        (shard_uri, located.filter(pc.equal(located["shard_uri"], shard_uri)))
        for shard_uri in sorted(set(located["shard_uri"].to_pylist()))
    ]


def predictions_dir(output: str, labelset: str) -> str:
    return storage.join(output, "predictions", labelset)


def committed_predictions(
    output: str, labelset: str | None = None, storage_options: dict | None = None, columns=None
) -> pa.Table:
    """Predictions of committed runs only (those with a summary under `runs/`)."""
    committed = {
        url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
        for url in storage.glob(storage.join(output, "runs", "*.json"), storage_options)
    }
    pattern = storage.join(output, "predictions", labelset or "*", "*", "*.parquet")
    parts = [
        url for url in storage.glob(pattern, storage_options) if url.split("/")[-2] in committed
    ]
    if not parts:
        return PREDICTIONS_SCHEMA.empty_table().select(columns or PREDICTIONS_SCHEMA.names)
    return storage.read_table(parts, columns=columns, storage_options=storage_options)


def commit_run(
    output: str,
    run_id: str,
    labelset: str,
    staged_parts: Sequence[str | None],
    summary: dict[str, object],
    storage_options: dict | None = None,
) -> str:
    """Move a run's staged predictions into place, then write its summary: the commit marker."""
    final_dir = storage.join(predictions_dir(output, labelset), run_id)
    for part in staged_parts:
        if part:
            storage.move(part, storage.join(final_dir, part.rsplit("/", 1)[-1]), storage_options)
    summary_uri = storage.join(output, "runs", f"{run_id}.json")
    payload = {**summary, "run_id": run_id, "labelset": labelset, "committed_at": time.time()}
    storage.write_bytes_atomic(
        json.dumps(payload, indent=2, default=str).encode(), summary_uri, storage_options
    )
    return summary_uri


def ensure_writable(output: str, run_id: str, storage_options: dict | None = None) -> None:
    """Fail before any work if `output` cannot be written, naming it."""
    probe = storage.join(staging_dir(output, run_id), ".write-probe")
    storage.write_bytes_atomic(b"", probe, storage_options)
    storage.delete(probe, storage_options)


def empty_manifest() -> pa.Table:
    return MANIFEST_SCHEMA.empty_table()


def new_run_id() -> str:
    """A sortable run id for runs outside Prefect."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + hashlib.sha256(os.urandom(8)).hexdigest()[:8]


def staged_statistics(
    staged_parts: Sequence[str | None], storage_options: dict | None = None
) -> tuple[Counter[str], int, list[str]]:
    """A run's label histogram, how many labels differ from zero-shot, and its warnings."""
    from inmap.refine import disagreement_warning

    parts = [part for part in staged_parts if part]
    if not parts:
        return Counter(), 0, []
    columns = ["label", "class_id", "zero_shot_label", "zero_shot_class_id", "zero_shot_score"]
    table = storage.read_table(parts, columns=columns, storage_options=storage_options)
    changed = pc.sum(pc.not_equal(table["label"], table["zero_shot_label"])).as_py() or 0
    warning = disagreement_warning(
        table["zero_shot_class_id"].to_numpy(),
        table["zero_shot_score"].to_numpy(),
        table["class_id"].to_numpy(),
    )
    return Counter(table["label"].to_pylist()), int(changed), [warning] if warning else []


def summary_markdown(summary: dict) -> str:
    """The run summary as markdown: counts, time per stage, label histogram, warnings."""
    counts = summary["counts"]
    predicted = counts["predicted"]
    lines = [
        f"# inmap run over `{summary['source']}`",
        "",
        f"Model `{summary['model']}` / `{summary['pretrained']}`, labelset `{summary['labelset']}`,"
        f" proxy `{summary['proxy_id']}`.",
        "",
        "| listed | embedded | cached | failed | predicted |",
        "|---:|---:|---:|---:|---:|",
        f"| {counts['listed']} | {counts['embedded']} | {counts['cached']} | {counts['failed']}"
        f" | {predicted} |",
        "",
    ]
    if predicted:
        share = summary["changed_from_zero_shot"] / predicted
        lines += [f"InMaP changed the zero-shot label of {share:.1%} of predicted images.", ""]
    else:
        lines += ["No image needed a prediction in this run.", ""]
    for warning in summary.get("warnings", []):
        lines += [f"**Warning:** {warning}", ""]
    lines += ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {sec:.2f} |" for stage, sec in summary["stage_seconds"].items()]
    histogram = summary["label_histogram"]
    if histogram:
        lines += ["", "| label | images |", "|---|---:|"]
        lines += [f"| {label} | {n} |" for label, n in list(histogram.items())[:50]]
        if len(histogram) > 50:
            lines.append(f"| … {len(histogram) - 50} more labels | |")
    return "\n".join(lines) + "\n"
