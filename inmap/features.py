"""Image features from any source, as re-iterable shards of unit rows.

A source is an (n, d) tensor or array, a list of them, a callable returning a fresh iterator of
them, or embedding-shard Parquet URLs. Rows with NaN or inf, or all zeros, are refused, naming the
rows; rows that are not unit-norm are normalised, with a warning if a norm is off by more than 1%
(float16 storage alone leaves errors near 1e-3, which pass silently).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from inmap.schemas import embedding_matrix

ArrayLike = torch.Tensor | np.ndarray
# (n, d) matrix | callable returning a fresh iterator of (n_i, d) shards | list of shards |
# embedding-shard Parquet URI(s) (column `embedding`, see inmap.schemas.embedding_schema).
ImageFeatures = ArrayLike | str | Sequence[ArrayLike] | Sequence[str] | Callable[[], Iterable]

UNIT_NORM_TOLERANCE = 1e-2  # float16 storage errs by ~1e-3; more than this means "not normalised"
SHARD_ROWS = 65_536  # an in-memory matrix too large to keep as float32 is streamed in such blocks


def read_embedding_shard(uri: str, storage_options: dict | None = None) -> np.ndarray:
    """The `embedding` column of one embedding shard as an (n_i, d) array."""
    from inmap import storage

    return embedding_matrix(storage.read_parquet(uri, ["embedding"], storage_options))


class EmbeddingStream:
    """Image embeddings as a re-iterable series of (n_i, d) unit-norm shards on `device`.

    The first pass checks every row, counts them and yields float32; later passes yield `dtype`.
    If the source fits `memory_budget` bytes as float32 it is kept after the first pass and later
    passes yield it as one matrix; otherwise every pass reads the source again."""

    def __init__(
        self,
        shards: Callable[[], Iterable[ArrayLike]],
        dim: int,
        device: torch.device,
        *,
        dtype: torch.dtype = torch.float32,
        memory_budget: int = 0,
        against: str = "the text proxy",
    ) -> None:
        """`shards`: a callable returning a fresh iterator of (n_i, d) arrays (`shard_reader`)."""
        self._read = shards
        self.dim, self.device, self.dtype = dim, device, dtype
        self.memory_budget, self._against = memory_budget, against
        self.n_images: int | None = None  # known after the first pass
        self.kept: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.kept is not None:
            yield self.kept
            return
        first_pass = self.n_images is None
        kept: list[torch.Tensor] | None = [] if first_pass else None
        checks = RowChecks("image features") if first_pass else None
        offset = 0
        for raw in self._read():
            shard = self._unit_rows(raw, offset, checks)  # (n_i, d)
            offset += len(shard)
            if len(shard) == 0:
                continue
            if kept is not None:
                kept.append(shard)
                if offset * self.dim * 4 > self.memory_budget:
                    kept = None
            yield shard if first_pass else shard.to(self.dtype)
        if first_pass:
            checks.refuse_bad_rows()  # all of them, not just the first shard's
            if offset == 0:
                raise ValueError("no image features: the source gave 0 rows")
            self.n_images = offset
            if kept:
                self.kept = torch.cat(kept).to(self.dtype)
        elif offset != self.n_images:
            raise RuntimeError(
                f"the image source gave {self.n_images} rows on its first pass and {offset} on a "
                "later one: a callable source must return the same shards every time it is called"
            )

    def _unit_rows(self, raw: ArrayLike, offset: int, checks: RowChecks | None) -> torch.Tensor:
        shard = torch.as_tensor(raw)
        if shard.ndim != 2 or shard.shape[1] != self.dim:
            raise ValueError(
                f"image features have shape {tuple(shard.shape)} but {self._against} has "
                f"dimension {self.dim}: embed images and class names with the same model"
            )
        shard = shard.to(device=self.device, dtype=torch.float32)
        norms = torch.linalg.vector_norm(shard, dim=1)  # (n_i,)
        if checks is not None:
            checks.check(norms, offset)
        return shard / norms[:, None]


def shard_reader(image_features: ImageFeatures, storage_options: dict | None = None) -> Callable:
    """A zero-argument callable giving a fresh iterator over the raw (n_i, d) shards."""
    if isinstance(image_features, (torch.Tensor, np.ndarray)):
        if image_features.ndim != 2:
            raise ValueError(f"image features must be (n, d), got {tuple(image_features.shape)}")
        matrix = image_features
        return lambda: (matrix[i : i + SHARD_ROWS] for i in range(0, len(matrix), SHARD_ROWS))
    if isinstance(image_features, str):
        image_features = [image_features]
    if callable(image_features):
        return image_features
    if isinstance(image_features, Sequence):
        shards = list(image_features)
        if shards and all(isinstance(s, str) for s in shards):
            return lambda: (read_embedding_shard(uri, storage_options) for uri in shards)
        if all(isinstance(s, (torch.Tensor, np.ndarray)) for s in shards):
            return lambda: iter(shards)
    raise TypeError(
        "image features must be an (n, d) tensor or array, a list of them, a callable returning an "
        f"iterator of them, or embedding-shard Parquet URIs; got {type(image_features).__name__}"
    )


def unit_class_rows(proxy: ArrayLike, name: str, min_classes: int) -> torch.Tensor:
    """`proxy` as (C, d) float32 unit rows, refusing what cannot be a set of class proxies."""
    rows = torch.as_tensor(proxy).detach().to("cpu", torch.float32)
    if rows.ndim != 2:
        raise ValueError(f"the {name} must be (C, d), got shape {tuple(rows.shape)}")
    if len(rows) < min_classes:
        raise ValueError(
            f"the {name} has {len(rows)} class(es); InMaP needs at least {min_classes}: with one "
            "class every image gets it and there is nothing to learn"
        )
    norms = torch.linalg.vector_norm(rows, dim=1)
    checks = RowChecks(name)
    checks.check(norms, 0)
    checks.refuse_bad_rows()
    return rows / norms[:, None]


class RowChecks:
    """Rows that cannot be normalised (refused, all listed at once) or were not (a warning)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bad: dict[str, tuple[list[int], int]] = {}  # problem -> (first rows, how many)
        self.warned = False

    def check(self, norms: torch.Tensor, offset: int) -> None:
        for problem, mask in (
            ("contain NaN or inf", ~torch.isfinite(norms)),
            ("are all zeros", norms == 0),
        ):
            if bool(mask.any()):
                rows, count = self.bad.get(problem, ([], 0))
                found = torch.nonzero(mask).flatten() + offset
                self.bad[problem] = (rows + found[:10].tolist())[:10], count + len(found)
        off = torch.where(torch.isfinite(norms) & (norms > 0), (norms - 1).abs(), 0)
        if not self.warned and bool((off > UNIT_NORM_TOLERANCE).any()):
            row = int(off.argmax())
            warnings.warn(
                f"{self.name} rows are not unit-norm (row {row + offset} has norm "
                f"{float(norms[row]):.4g}); normalising them",
                stacklevel=5,
            )
            self.warned = True

    def refuse_bad_rows(self) -> None:
        for problem, (rows, count) in self.bad.items():
            more = f" and {count - len(rows)} more" if count > len(rows) else ""
            shown = ", ".join(map(str, rows))
            raise ValueError(f"{self.name} rows {shown}{more} {problem}; drop or re-embed them")
