"""Labelled sets for `inmap eval`: features and true classes from an npz, Parquet, or a folder of
labelled images (embedded here), with the text proxy of their classes."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa

from inmap.errors import InputError
from inmap.schemas import embedding_matrix

logger = logging.getLogger(__name__)


class EvalInputError(InputError):
    """The labelled set given to `inmap eval` cannot be used; the message says why."""


@dataclass
class LabeledSet:
    """Unit-norm image features with their true class ids, and the text proxy of the classes."""

    features: np.ndarray  # (n, d)
    labels: np.ndarray  # (n,) int, in 0..C-1
    text_proxy: np.ndarray  # (C, d)
    classnames: list[str]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n, c = len(self.features), len(self.text_proxy)
        if len(self.labels) != n:
            raise EvalInputError(f"{n} feature rows but {len(self.labels)} labels")
        if n and (self.labels.min() < 0 or self.labels.max() >= c):
            raise EvalInputError(f"labels must be class ids in 0..{c - 1}")
        if self.features.shape[1] != self.text_proxy.shape[1]:
            raise EvalInputError(
                f"image features have dimension {self.features.shape[1]} but the text proxy has "
                f"{self.text_proxy.shape[1]}: they come from different models"
            )


_WNID_NAME = re.compile(r"^n\d{8}_(?P<name>.+)$")


def label_from_path(uri: str) -> str:
    """The class of a labelled image: from a `nXXXXXXXX_<class>.JPEG` file name when it has one,
    else the name of the folder holding the image. Underscores become spaces."""
    path = PurePosixPath(uri.split("://", 1)[-1])
    match = _WNID_NAME.match(path.stem)
    name = match["name"] if match else path.parent.name
    return name.replace("_", " ")


def class_ids(names: Sequence[str], classnames: Sequence[str]) -> np.ndarray:
    """Map label names to class ids, case- and underscore-insensitively; unknown names fail."""

    def key(name: str) -> str:
        return name.replace("_", " ").strip().lower()

    index: dict[str, int] = {}
    for i, name in enumerate(classnames):
        index.setdefault(key(name), i)
    unknown = sorted({n for n in names if key(n) not in index})
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5])
        raise EvalInputError(
            f"{len(unknown)} label(s) are not among the {len(classnames)} class names, e.g. "
            f"{shown}; pass --classes with the full list of class names"
        )
    return np.array([index[key(n)] for n in names], dtype=np.int64)


@dataclass(frozen=True)
class Embedder:
    """The model that embeds labelled images and class names (when they are not given)."""

    model: str | None = None  # default inmap.config.DEFAULT_MODEL
    pretrained: str | None = "default"  # "default": DEFAULT_PRETRAINED; None / "none": random
    device: str = "auto"
    templates: str | tuple[str, ...] = "paper"
    batch_size: int = 64

    def encoder(self):
        from inmap.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
        from inmap.encoder import load_encoder

        pretrained = DEFAULT_PRETRAINED if self.pretrained == "default" else self.pretrained
        return load_encoder(self.model or DEFAULT_MODEL, pretrained, device=self.device)


def _build_text_proxy(classnames: Sequence[str], embedder: Embedder) -> np.ndarray:
    """(C, d) zero-shot weights of `classnames` from the model's text tower."""
    from inmap.text import text_proxy

    encoder = embedder.encoder()
    proxy = text_proxy(
        encoder.model, encoder.tokenizer, list(classnames), templates=embedder.templates
    )
    return proxy.float().cpu().numpy()


def load_labeled_set(
    source: str,
    *,
    classes: Sequence[str] | None = None,
    text_proxy: str | None = None,
    embedder: Embedder = Embedder(),  # noqa: B008 - frozen dataclass
    storage_options: dict | None = None,
) -> LabeledSet:
    """Load features and labels from `source`:

    - an `.npz` with `image_features`, `labels` (class ids) and `classnames`, and optionally
      `text_proxy` (else it is built with `model`);
    - Parquet (a file or a folder of shards) with an `embedding` column and a `label` column
      (class name or id), or a `uri` column whose paths carry the labels (`label_from_path`);
    - a folder of images labelled by sub-folder or `nXXXXXXXX_<class>.JPEG` names, embedded with
      the `embedder`'s model.

    Class names come from `classes`, the npz, or the sorted distinct labels. `text_proxy` is an
    optional `.npy` (C, d) array of zero-shot weights in class-name order; without it they are
    built from the class names with the `embedder`'s model and templates."""
    from inmap import storage

    if source.endswith(".npz"):
        with np.load(source, allow_pickle=False) as data:
            missing = {"image_features", "labels"} - set(data.files)
            if missing:
                raise EvalInputError(f"{source} lacks {sorted(missing)} (has {data.files})")
            arrays = {key: data[key] for key in data.files}
        classnames = list(classes or arrays.get("classnames", []))
        if not classnames:
            raise EvalInputError(f"{source} has no `classnames`; pass --classes")
        text = _load_text_proxy(text_proxy, classnames) if text_proxy else arrays.get("text_proxy")
        if text is None:
            text = _build_text_proxy(classnames, embedder)
        return LabeledSet(arrays["image_features"], arrays["labels"], text, classnames)

    parquet = (
        [source]
        if source.endswith(".parquet")
        else sorted(
            url for url in storage.list_files(source, storage_options) if url.endswith(".parquet")
        )
    )
    if parquet:
        table = pa.concat_tables(
            storage.read_parquet(url, storage_options=storage_options) for url in parquet
        )
        if "embedding" not in table.column_names:
            raise EvalInputError(f"{source} has no `embedding` column ({table.column_names})")
        features = embedding_matrix(table)
        if "label" in table.column_names:
            raw = table["label"].to_pylist()
        elif "uri" in table.column_names:
            raw = [label_from_path(uri) for uri in table["uri"].to_pylist()]
        else:
            raise EvalInputError(f"{source} has neither a `label` nor a `uri` column")
    else:
        from inmap.batches import Throughput, embed_images
        from inmap.listing import list_images

        manifest = list_images(source, storage_options).images
        if len(manifest) == 0:
            raise EvalInputError(f"no .npz, Parquet or images found at {source}")
        encoder = embedder.encoder()
        items = zip(manifest["uri"].to_pylist(), manifest["etag"].to_pylist(), strict=True)
        embedded = embed_images(
            encoder,
            items,
            storage_options=storage_options,
            throughput=Throughput(embedder.batch_size),
        )
        if embedded.failures:
            uri, _, failure = embedded.failures[0]
            logger.warning(
                "%d image(s) could not be read or decoded and are left out, e.g. %s: %s",
                len(embedded.failures), uri, failure.reason,
            )  # fmt: skip
        table = embedded.embeddings
        features = embedding_matrix(table)
        raw = [label_from_path(uri) for uri in table["uri"].to_pylist()]
    if all(isinstance(v, int | np.integer) for v in raw):
        if not classes:
            raise EvalInputError(f"{source} has integer labels; pass --classes with their names")
        labels = np.asarray(raw, dtype=np.int64)
        classnames = list(classes)
    else:
        classnames = list(classes) if classes else sorted({str(v) for v in raw})
        labels = class_ids([str(v) for v in raw], classnames)
    if text_proxy:
        text = _load_text_proxy(text_proxy, classnames)
    else:
        text = _build_text_proxy(classnames, embedder)
    return LabeledSet(features, labels, text, classnames)


def _load_text_proxy(path: str, classnames: Sequence[str]) -> np.ndarray:
    from inmap import storage

    text = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    if text.ndim != 2 or len(text) != len(classnames):
        raise EvalInputError(
            f"{path} holds an array of shape {text.shape}; expected one row per class "
            f"({len(classnames)} classes)"
        )
    return text
