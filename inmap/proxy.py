"""InMaP: a vision proxy per class, learned from unlabeled images (Qian, Xu & Hu, NeurIPS 2023).

X (n, d) are unit-norm CLIP image embeddings, T (C, d) unit-norm text proxies. The method's five
steps are the five functions below, in order:

1. `zero_shot_logits`  logits = X Tᵀ; zero-shot predicts their argmax.
2. pseudo-labels       P = softmax(logits / τ_t), refined by the labeler named by `refine`:
                       `sinkhorn_pseudo_labels` (the paper's) balances P towards a class marginal q.
3. `sharpen`           rows of P whose max exceeds α become one-hot.
4. `learn_proxy`       from W = T, full-batch gradient descent on the cross-entropy between P and
                       softmax(X Wᵀ / τ_i): G = softmax(X Wᵀ/τ_i)ᵀ X − Pᵀ X,
                       W ← normalize_rows(W − lr/(n·τ_i)·G), lr halved whenever ‖G‖ grows.
5. `predict`           argmax X Wᵀ, with softmax(X Wᵀ / τ) probabilities as scores.

Streaming. G is a sum over images, so `proxy_gradient` accumulates it shard by shard and each step
is exactly the full-batch one however the images are cut. Besides O(C·d) for W, G and PᵀX, memory
holds the (n, C) zero-shot logits and pseudo-labels once, never the (n, d) embeddings. Why (n, C):
pseudo-labelling is global (Sinkhorn's column sums run over all images; registered labelers such as
`refine="adaptive"` estimate class priors from the whole matrix), so with (n, C) in memory every
labeler works after one read of the source; keeping only O(C) Sinkhorn scalings instead would cost
a full re-read per Sinkhorn iteration and serve no other labeler. P is freed once PᵀX is summed.
The embeddings are read once and kept, as one matrix for fast matmuls, when n·d float32 fits
`memory_budget` (briefly twice that while the shards are joined); otherwise the source is re-read
every iteration. Both are exact.

Speed. A step costs two (n×d)·(d×C) matmuls; everything else is small: PᵀX is summed once, 1/τ_i
is folded into W, and nothing (n, C)-sized is kept between steps. That is the floor for the exact
method, and the paper's run does not converge within its 2000 steps: on the real dev set (ViT-B/32,
500 classes, 2000 images) rows of W at step 1000 are only ≥ 0.98 cosine-similar to step 2000, and
predictions still change at step 1879 (refine="none"). So the early stop (`tol`) waits until W has
stopped moving (largest per-class step × steps left < tol; this assumes steps do not grow, and lr
only shrinks): it cannot change the result, and at paper settings on real data it does not fire.
Fewer `iters` is the knob for speed: on the dev set iters=300 keeps top-1 within 0.1 point of 2000
steps, while rows of W are only ≥ 0.87 cosine-similar to the 2000-step ones.

Precision. "float32" (default) matches a float64 implementation of the paper on the dev set to
per-row cosine ≥ 0.9999998, with identical predictions. "tf32" (CUDA only) and "bf16" (X kept in
bfloat16; softmax, G and W in float32) are faster on a GPU but change the result, because the
paper's lr halving reacts to rounding noise in ‖G‖: lr collapses and W freezes after ~1200 steps,
where `tol` then stops. No GPU was available to measure them; on the dev set, with bf16 run on the
CPU and TF32 emulated by rounding matmul inputs to 10 mantissa bits, against float32:
  tf32: top-1 79.65 / 76.20 (Sinkhorn / none; float32 79.60 / 76.15), 99.95% / 99.60% same
        predictions, rows of W ≥ 0.94 cosine-similar;
  bf16: top-1 79.85 / 76.25, 98.5% same predictions, rows ≥ 0.80 cosine-similar.
Pseudo-labels always come from IEEE float32 logits.

Input checks. Rows with NaN or inf, or all zeros, are refused, naming the rows (there is no right
answer for them). Rows that are not unit-norm are normalised, with a warning if a norm is off by
more than 1%: cosine is what the method uses, and float16 storage alone leaves errors near 1e-3
that should pass silently. Mismatched dimensions, fewer than two classes and an empty source are
refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = torch.Tensor | np.ndarray
# (n, d) matrix | callable returning a fresh iterator of (n_i, d) shards | list of shards |
# embedding-shard Parquet URI(s) (column `embedding`, see inmap.schemas.embedding_schema).
ImageFeatures = ArrayLike | str | Sequence[ArrayLike] | Sequence[str] | Callable[[], Iterable]

logger = logging.getLogger(__name__)
PROGRESS_SECONDS = 10.0  # how often a long fit logs its progress

PRECISIONS = ("float32", "tf32", "bf16")
UNIT_NORM_TOLERANCE = 1e-2  # float16 storage errs by ~1e-3; more than this means "not normalised"
SHARD_ROWS = 65_536  # an in-memory matrix too large to keep as float32 is streamed in such blocks


@dataclass(frozen=True)
class ProxyConfig:
    """InMaP hyper-parameters (paper defaults) and how to run them."""

    tau_t: float = 0.01  # temperature of the zero-shot pseudo-labels
    tau_i: float = 0.04  # temperature of the image-to-vision-proxy softmax
    alpha: float = 0.6  # pseudo-labels more confident than this become one-hot
    gamma: float = 0.0  # Sinkhorn class marginal ∝ (pseudo-label mass)^γ; 0 = uniform
    lr: float = 10.0
    iters: int = 2000
    sinkhorn_iters: int = 20
    # A name in PSEUDO_LABELERS. "adaptive" (inmap.refine) is Sinkhorn on balanced drops and never
    # forces a uniform class marginal on skewed ones; "sinkhorn" is the paper's exact method.
    refine: str = "adaptive"
    tol: float = 1e-4  # stop once W can move less than this (radians) in the remaining steps
    precision: str = "float32"  # "float32" | "tf32" | "bf16" (see module docstring)
    memory_budget: int = 1 << 30  # bytes of float32 embeddings to keep rather than re-read
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        for name in ("tau_t", "tau_i", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProxyConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "tol", "iters", "sinkhorn_iters", "memory_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"ProxyConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"ProxyConfig.precision must be one of {PRECISIONS}")


@dataclass
class ProxyFit:
    """A learned vision proxy and what the learning saw. Tensors are on the CPU."""

    vision_proxy: torch.Tensor  # (C, d) float32, unit rows
    class_marginal: torch.Tensor  # (C,) column mass of the sharpened pseudo-labels, sums to 1
    zero_shot_agreement: float  # share of images where argmax X Wᵀ == argmax X Tᵀ
    zero_shot_counts: torch.Tensor  # (C,) int64, images per class by zero-shot
    predicted_counts: torch.Tensor  # (C,) int64, images per class by the vision proxy
    iterations: int  # gradient steps taken
    converged: bool  # stopped before `iters` because W had stopped moving (see `tol`)
    n_images: int
    materialized: bool  # embeddings were kept in memory (else re-read every iteration)
    config: ProxyConfig = field(default_factory=ProxyConfig)


@dataclass
class Prediction:
    """Per-image predictions. Scores are softmax(X Wᵀ / τ) probabilities, so in [0, 1]."""

    class_ids: torch.Tensor  # (n,) int64
    scores: torch.Tensor  # (n,) float32
    top_k_ids: torch.Tensor  # (n, k) int64, best first
    top_k_scores: torch.Tensor  # (n, k) float32


# --- the method ------------------------------------------------------------------------------


def zero_shot_logits(images: Iterable[torch.Tensor], text_proxy: torch.Tensor) -> torch.Tensor:
    """Step 1. logits = X Tᵀ, (n, C): cosine similarity of each image to each class's text."""
    return torch.cat([X @ text_proxy.T for X in images])


def softmax_pseudo_labels(logits: torch.Tensor, config: ProxyConfig) -> torch.Tensor:
    """Step 2 without refinement: P = softmax(logits / τ_t), (n, C)."""
    return torch.softmax(logits / config.tau_t, dim=1)


def sinkhorn_pseudo_labels(logits: torch.Tensor, config: ProxyConfig) -> torch.Tensor:
    """Step 2 as in the paper: softmax(logits / τ_t) balanced by Sinkhorn so that each class gets
    its share q of the images (q uniform, or ∝ the unrefined class mass^γ)."""
    n, C = logits.shape
    P = torch.softmax(logits / config.tau_t, dim=1) / n  # (n, C), total mass 1
    if config.gamma > 0:
        q = P.sum(0).pow(config.gamma)
        q /= q.sum()
    else:
        q = torch.full((C,), 1 / C, device=P.device)
    tiny = torch.finfo(P.dtype).tiny  # a class no image leans to keeps zero mass, not NaN
    for _ in range(config.sinkhorn_iters):
        P *= q / P.sum(0).clamp_min(tiny)  # columns sum to q
        P /= n * P.sum(1, keepdim=True).clamp_min(tiny)  # rows sum to 1/n
    return P * n


def sharpen(P: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step 3, in place. Confident pseudo-labels (max > α) are trusted fully: one-hot."""
    top, cls = P.max(dim=1)
    confident = top > alpha
    P[confident] = 0
    P[confident, cls[confident]] = 1
    return P


def pseudo_label_features(images: Iterable[torch.Tensor], P: torch.Tensor) -> torch.Tensor:
    """Pᵀ X, (C, d): the part of every gradient that does not change, computed once."""
    target, offset = 0, 0
    for X in images:
        target = target + (P[offset : offset + len(X)].to(X.dtype).T @ X).float()  # (C, d)
        offset += len(X)
    return target


def proxy_gradient(
    images: EmbeddingStream, W: torch.Tensor, target: torch.Tensor, tau_i: float
) -> torch.Tensor:
    """G = softmax(X Wᵀ/τ_i)ᵀ X − Pᵀ X, (C, d), summed shard by shard: the exact full-batch
    gradient (times n·τ_i) however the images are cut."""
    scaled = (W / tau_i).to(images.dtype)  # 1/τ_i folded into the (C, d) side, not the (n, C) one
    G = -target
    for X in images:
        S = torch.softmax(X @ scaled.T, dim=1, dtype=torch.float32)  # (n_i, C)
        G = G + (S.to(X.dtype).T @ X).float()
    return G


def learn_proxy(
    images: EmbeddingStream, text_proxy: torch.Tensor, target: torch.Tensor, config: ProxyConfig
) -> tuple[torch.Tensor, int, bool]:
    """Step 4. Gradient descent on the sphere from W = T; returns (W, steps, stopped early)."""
    n = images.n_images
    W = text_proxy.clone()  # (C, d)
    lr, previous_norm = config.lr, math.inf
    started = last_report = time.monotonic()
    for step in range(1, config.iters + 1):
        if time.monotonic() - last_report > PROGRESS_SECONDS:  # long CPU runs show they are alive
            last_report = time.monotonic()
            elapsed = last_report - started
            logger.info(
                "vision proxy: step %d/%d, lr %.3g, %.0fs elapsed, about %.0fs left",
                step, config.iters, lr, elapsed, elapsed / (step - 1) * (config.iters - step + 1),
            )  # fmt: skip
        G = proxy_gradient(images, W, target, config.tau_i)
        norm = float(torch.linalg.vector_norm(G))
        if norm > previous_norm:  # the paper's one safeguard against too large a step
            lr /= 2
        previous_norm = norm
        W_next = F.normalize(W - lr / (n * config.tau_i) * G, dim=1)
        moved = float(torch.linalg.vector_norm(W_next - W, dim=1).max())
        W = W_next
        if step < config.iters and moved * (config.iters - step) < config.tol:
            return W, step, True
    return W, config.iters, False


def predict(
    image_features: ImageFeatures,
    proxy: ArrayLike,
    top_k: int = 5,
    *,
    tau: float = ProxyConfig.tau_i,
    device: str | None = None,
    storage_options: dict | None = None,
) -> Prediction:
    """Step 5. Each image's class: argmax X Wᵀ; scores are softmax(X Wᵀ / τ) probabilities.

    `tau` defaults to τ_i, the temperature the vision proxy was learned at. Returns CPU tensors."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = _device(device)
    W = _unit_class_rows(proxy, "proxy", min_classes=1).to(device)  # (C, d)
    k = min(top_k, len(W))
    images = EmbeddingStream(
        image_features, W.shape[1], device, storage_options=storage_options, against="the proxy"
    )
    ids, scores = [], []
    for X in images:
        top = torch.softmax(X @ W.T / tau, dim=1).topk(k, dim=1)
        ids.append(top.indices.cpu())
        scores.append(top.values.cpu())
    top_k_ids, top_k_scores = torch.cat(ids), torch.cat(scores)
    return Prediction(top_k_ids[:, 0], top_k_scores[:, 0], top_k_ids, top_k_scores)


# --- the pseudo-labeler registry -------------------------------------------------------------

# Zero-shot logits X Tᵀ (n, C) float32 -> P (n, C), rows summing to 1. `sharpen` is applied after.
PseudoLabeler = Callable[[torch.Tensor, ProxyConfig], torch.Tensor]
PSEUDO_LABELERS: dict[str, PseudoLabeler] = {
    "sinkhorn": sinkhorn_pseudo_labels,
    "none": softmax_pseudo_labels,
}


def register_pseudo_labeler(name: str, fn: PseudoLabeler) -> None:
    """Make `fn` available as `ProxyConfig(refine=name)`; a second registration replaces the first.

    `fn` must return a new tensor (sharpening works in place)."""
    if not callable(fn):
        raise TypeError(f"pseudo-labeler {name!r} must be callable, got {type(fn).__name__}")
    PSEUDO_LABELERS[name] = fn


def pseudo_labels(logits: torch.Tensor, config: ProxyConfig) -> torch.Tensor:
    """Step 2 through the registry, with the labeler's output checked."""
    if config.refine not in PSEUDO_LABELERS:
        raise ValueError(
            f"unknown refine={config.refine!r}; registered: {', '.join(PSEUDO_LABELERS)}"
        )
    P = PSEUDO_LABELERS[config.refine](logits, config)
    if P.shape != logits.shape or not bool(torch.isfinite(P).all()):
        raise ValueError(
            f"pseudo-labeler {config.refine!r} returned {tuple(P.shape)} with "
            f"{int((~torch.isfinite(P)).sum())} non-finite values; "
            f"expected finite {tuple(logits.shape)}"
        )
    if not torch.allclose(P.sum(1), torch.ones((), device=P.device), atol=1e-3):
        raise ValueError(f"pseudo-labeler {config.refine!r} returned rows that do not sum to 1")
    return P


# --- putting the steps together --------------------------------------------------------------


def fit_vision_proxy(
    image_features: ImageFeatures,
    text_proxy: ArrayLike,
    config: ProxyConfig | None = None,
    *,
    storage_options: dict | None = None,
    **overrides: object,
) -> ProxyFit:
    """Learn the vision proxy (steps 1-4) and the statistics of the fit.

    image_features: (n, d) tensor or array of any float dtype; a list of them; a callable returning
    a fresh iterator of them on every call; or embedding-shard Parquet URIs, read with fsspec using
    `storage_options`. The result does not depend on the form. `overrides` replace fields of
    `config` (ProxyConfig() when None)."""
    config = replace(config or ProxyConfig(), **overrides)
    device = _device(config.device)
    T = _unit_class_rows(text_proxy, "text proxy", min_classes=2).to(device)  # (C, d)
    images = EmbeddingStream(
        image_features,
        T.shape[1],
        device,
        dtype=torch.bfloat16 if config.precision == "bf16" else torch.float32,
        memory_budget=config.memory_budget,
        storage_options=storage_options,
    )
    with _matmul_precision("float32", device):
        logits = zero_shot_logits(images, T)  # (n, C); this pass checks and counts the images
    zero_shot_ids = logits.argmax(1)
    P = sharpen(pseudo_labels(logits, config), config.alpha)  # (n, C)
    del logits
    class_marginal = P.sum(0) / images.n_images
    with _matmul_precision(config.precision, device):
        target = pseudo_label_features(images, P)  # (C, d)
        del P
        W, iterations, converged = learn_proxy(images, T, target, config)
        proxy_ids = torch.cat([(X @ W.to(X.dtype).T).argmax(1) for X in images])
    C = len(T)
    return ProxyFit(
        vision_proxy=W.cpu(),
        class_marginal=class_marginal.cpu(),
        zero_shot_agreement=float((proxy_ids == zero_shot_ids).float().mean()),
        zero_shot_counts=torch.bincount(zero_shot_ids, minlength=C).cpu(),
        predicted_counts=torch.bincount(proxy_ids, minlength=C).cpu(),
        iterations=iterations,
        converged=converged,
        n_images=images.n_images,
        materialized=images.kept is not None,
        config=config,
    )


def learn_vision_proxy(
    image_features: ImageFeatures,
    text_proxy: ArrayLike,
    *,
    tau_t: float = ProxyConfig.tau_t,
    tau_i: float = ProxyConfig.tau_i,
    alpha: float = ProxyConfig.alpha,
    gamma: float = ProxyConfig.gamma,
    lr: float = ProxyConfig.lr,
    iters: int = ProxyConfig.iters,
    sinkhorn_iters: int = ProxyConfig.sinkhorn_iters,
    refine: str = ProxyConfig.refine,
    device: str | None = None,
    **options: object,
) -> torch.Tensor:
    """The (C, d) float32 unit-row vision proxy; `options` are the other ProxyConfig fields
    (tol, precision, memory_budget) and `storage_options`. See `fit_vision_proxy`."""
    storage_options = options.pop("storage_options", None)
    config = ProxyConfig(
        tau_t=tau_t,
        tau_i=tau_i,
        alpha=alpha,
        gamma=gamma,
        lr=lr,
        iters=iters,
        sinkhorn_iters=sinkhorn_iters,
        refine=refine,
        device=device,
        **options,  # type: ignore[arg-type]
    )
    return fit_vision_proxy(
        image_features, text_proxy, config, storage_options=storage_options
    ).vision_proxy


# --- image embeddings from any source --------------------------------------------------------


class EmbeddingStream:
    """Image embeddings as a re-iterable series of (n_i, d) unit-norm shards on `device`.

    The first pass checks every row, counts them and yields float32; later passes yield `dtype`.
    If the source fits `memory_budget` bytes as float32 it is kept after the first pass and later
    passes yield it as one matrix; otherwise every pass reads the source again."""

    def __init__(
        self,
        image_features: ImageFeatures,
        dim: int,
        device: torch.device,
        *,
        dtype: torch.dtype = torch.float32,
        memory_budget: int = 0,
        storage_options: dict | None = None,
        against: str = "the text proxy",
    ) -> None:
        self._read = _shard_reader(image_features, storage_options)
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
        checks = _RowChecks("image features") if first_pass else None
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

    def _unit_rows(self, raw: ArrayLike, offset: int, checks: _RowChecks | None) -> torch.Tensor:
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


def _shard_reader(image_features: ImageFeatures, storage_options: dict | None) -> Callable:
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
            return lambda: (_read_embedding_shard(uri, storage_options) for uri in shards)
        if all(isinstance(s, (torch.Tensor, np.ndarray)) for s in shards):
            return lambda: iter(shards)
    raise TypeError(
        "image features must be an (n, d) tensor or array, a list of them, a callable returning an "
        f"iterator of them, or embedding-shard Parquet URIs; got {type(image_features).__name__}"
    )


def _read_embedding_shard(uri: str, storage_options: dict | None) -> np.ndarray:
    """The `embedding` column of one embedding shard as an (n_i, d) array."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    with fs.open(path, "rb") as f:
        shard = pq.ParquetFile(f)
        if "embedding" not in shard.schema_arrow.names:
            raise ValueError(f"{uri} has no `embedding` column: {shard.schema_arrow.names}")
        column = shard.read(columns=["embedding"]).column("embedding").combine_chunks()
    values = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(column), -1)


def _unit_class_rows(proxy: ArrayLike, name: str, min_classes: int) -> torch.Tensor:
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
    checks = _RowChecks(name)
    checks.check(norms, 0)
    checks.refuse_bad_rows()
    return rows / norms[:, None]


class _RowChecks:
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


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 matmuls on CUDA for precision="tf32", IEEE float32 otherwise; restored afterwards."""
    if device.type != "cuda":
        if precision == "tf32":
            warnings.warn(
                "precision='tf32' only applies on CUDA; computing in float32", stacklevel=3
            )
        yield
        return
    want_tf32 = precision == "tf32"
    matmul = torch.backends.cuda.matmul
    if (torch.get_float32_matmul_precision() != "highest") == want_tf32:
        yield  # already so: leave the user's setting (and which torch API set it) alone
    elif hasattr(matmul, "fp32_precision"):  # torch >= 2.9; reading allow_tf32 after it raises
        previous, matmul.fp32_precision = matmul.fp32_precision, "tf32" if want_tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous, matmul.allow_tf32 = matmul.allow_tf32, want_tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


# Registers refine="adaptive", the default, whenever this module is imported. Last, because
# inmap.refine imports the registry above.
import inmap.refine  # noqa: E402, F401
