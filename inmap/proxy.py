"""InMaP: a vision proxy per class, learned from unlabeled images (Qian, Xu & Hu, NeurIPS 2023).

X (n, d) are unit-norm CLIP image embeddings, T (C, d) unit-norm text proxies. The method's five
steps are the five functions below, in order:

1. `zero_shot_logits`  logits = X Tᵀ; zero-shot predicts their argmax.
2. `pseudo_labels`     P = softmax(logits / τ_t), refined by `config.refine`:
                       "sinkhorn" (the paper's) balances P towards a class marginal q;
                       "adaptive" (the default, see inmap.refine) uses Sinkhorn only on balanced
                       drops; "none" keeps P.
3. `sharpen`           rows of P whose max exceeds α become one-hot.
4. `learn_proxy`       from W = T, full-batch gradient descent on the cross-entropy between P and
                       softmax(X Wᵀ / τ_i): G = softmax(X Wᵀ/τ_i)ᵀ X − Pᵀ X,
                       W ← normalize_rows(W − lr/(n·τ_i)·G), lr halved whenever ‖G‖ grows.
5. `predict`           argmax X Wᵀ, with softmax(X Wᵀ / τ) probabilities as scores.

G is a sum over images, so `proxy_gradient` accumulates it shard by shard: each step is exactly
the full-batch one however the images are cut, and the (n, d) embeddings need not be in memory
(`FitOptions.memory_budget`). Pseudo-labelling is global (Sinkhorn's column sums), so the (n, C)
logits are held once, and P is freed as soon as Pᵀ X is summed. A step costs two (n×d)·(d×C)
products. Measurements (speed, precision, convergence) are in the README and `benchmarks/`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from inmap import refine
from inmap.config import FitOptions, ProxyConfig
from inmap.features import (
    ArrayLike,
    EmbeddingStream,
    ImageFeatures,
    shard_reader,
    unit_class_rows,
)

logger = logging.getLogger(__name__)

# Called during learning with (step, total steps).
StepCallback = Callable[[int, int], None]


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
    refined_by: str  # the pseudo-labeler used; for "adaptive", which branch it took
    config: ProxyConfig


@dataclass
class Prediction:
    """Per-image predictions. Scores are softmax(X Wᵀ / τ) probabilities, so in [0, 1]."""

    class_ids: torch.Tensor  # (n,) int64
    scores: torch.Tensor  # (n,) float32
    top_k_ids: torch.Tensor  # (n, k) int64, best first
    top_k_scores: torch.Tensor  # (n, k) float32


# --- the method ------------------------------------------------------------------------------


def zero_shot_logits(images: EmbeddingStream, text_proxy: torch.Tensor) -> torch.Tensor:
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


def adaptive_pseudo_labels(logits: torch.Tensor, config: ProxyConfig) -> torch.Tensor:
    """Step 2 for real drops: the paper's Sinkhorn when the drop looks balanced, else a class
    prior estimated from the drop, else the plain zero-shot pseudo-labels (see inmap.refine)."""
    return _adaptive(logits, config)[0]


def _adaptive(logits: torch.Tensor, config: ProxyConfig) -> tuple[torch.Tensor, str]:
    posteriors = softmax_pseudo_labels(logits.float(), config)
    decision = refine.decide(posteriors)
    logger.info("refine=adaptive: %s", decision.describe())
    match decision.branch:
        case "balanced":
            P = sinkhorn_pseudo_labels(logits, config)
        case "prior":
            P = refine.prior_posteriors(posteriors, decision.prior_strength)
        case _:
            P = posteriors
    return P, f"adaptive: {decision.branch}"


# Zero-shot logits X Tᵀ (n, C) float32 -> P (n, C), rows summing to 1; `sharpen` is applied after,
# in place, so a labeler returns a new tensor. Add your own: PSEUDO_LABELERS["mine"] = fn.
PseudoLabeler = Callable[[torch.Tensor, ProxyConfig], torch.Tensor]
PSEUDO_LABELERS: dict[str, PseudoLabeler] = {
    "adaptive": adaptive_pseudo_labels,
    "sinkhorn": sinkhorn_pseudo_labels,
    "none": softmax_pseudo_labels,
}


def pseudo_labels(logits: torch.Tensor, config: ProxyConfig) -> tuple[torch.Tensor, str]:
    """Step 2 by the labeler `config.refine` names, its output checked; returns (P, how)."""
    if config.refine not in PSEUDO_LABELERS:
        raise ValueError(f"unknown refine={config.refine!r}; known: {', '.join(PSEUDO_LABELERS)}")
    if PSEUDO_LABELERS[config.refine] is adaptive_pseudo_labels:
        P, how = _adaptive(logits, config)
    else:
        P, how = PSEUDO_LABELERS[config.refine](logits, config), config.refine
    if P.shape != logits.shape or not bool(torch.isfinite(P).all()):
        raise ValueError(
            f"pseudo-labeler {config.refine!r} returned {tuple(P.shape)} with "
            f"{int((~torch.isfinite(P)).sum())} non-finite values; "
            f"expected finite {tuple(logits.shape)}"
        )
    if not torch.allclose(P.sum(1), torch.ones((), device=P.device), atol=1e-3):
        raise ValueError(f"pseudo-labeler {config.refine!r} returned rows that do not sum to 1")
    return P, how


def sharpen(P: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step 3, in place. Confident pseudo-labels (max > α) are trusted fully: one-hot."""
    top, cls = P.max(dim=1)
    confident = top > alpha
    P[confident] = 0
    P[confident, cls[confident]] = 1
    return P


def pseudo_label_features(images: EmbeddingStream, P: torch.Tensor) -> torch.Tensor:
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
    images: EmbeddingStream,
    text_proxy: torch.Tensor,
    target: torch.Tensor,
    config: ProxyConfig,
    tol: float = 0.0,
    on_step: StepCallback | None = None,
) -> tuple[torch.Tensor, int, bool]:
    """Step 4. Gradient descent on the sphere from W = T; returns (W, steps, stopped early).

    The early stop waits until W has stopped moving (largest per-class step × steps left < tol;
    steps do not grow, since lr only shrinks), so it cannot change the result."""
    n = images.n_images
    W = text_proxy.clone()  # (C, d)
    lr, previous_norm = config.lr, math.inf
    for step in range(1, config.iters + 1):
        G = proxy_gradient(images, W, target, config.tau_i)
        norm = float(torch.linalg.vector_norm(G))
        if norm > previous_norm:  # the paper's one safeguard against too large a step
            lr /= 2
        previous_norm = norm
        W_next = F.normalize(W - lr / (n * config.tau_i) * G, dim=1)
        moved = float(torch.linalg.vector_norm(W_next - W, dim=1).max())
        W = W_next
        if on_step:
            on_step(step, config.iters)
        if step < config.iters and moved * (config.iters - step) < tol:
            if on_step:
                on_step(config.iters, config.iters)  # nothing is left to do
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
    W = unit_class_rows(proxy, "proxy", min_classes=1).to(device)  # (C, d)
    k = min(top_k, len(W))
    images = EmbeddingStream(
        shard_reader(image_features, storage_options), W.shape[1], device, against="the proxy"
    )
    ids, scores = [], []
    for X in images:
        top = torch.softmax(X @ W.T / tau, dim=1).topk(k, dim=1)
        ids.append(top.indices.cpu())
        scores.append(top.values.cpu())
    top_k_ids, top_k_scores = torch.cat(ids), torch.cat(scores)
    return Prediction(top_k_ids[:, 0], top_k_scores[:, 0], top_k_ids, top_k_scores)


# --- putting the steps together --------------------------------------------------------------


def fit_vision_proxy(
    image_features: ImageFeatures,
    text_proxy: ArrayLike,
    config: ProxyConfig | None = None,
    options: FitOptions | None = None,
    *,
    storage_options: dict | None = None,
    on_step: StepCallback | None = None,
    **overrides: object,
) -> ProxyFit:
    """Learn the vision proxy (steps 1-4) and the statistics of the fit.

    image_features: (n, d) tensor or array of any float dtype; a list of them; a callable returning
    a fresh iterator of them on every call; or embedding-shard Parquet URIs, read with fsspec using
    `storage_options`. The result does not depend on the form. `overrides` replace fields of
    `config` (ProxyConfig() when None) or `options` (FitOptions() when None) by name."""
    config, options = _with_overrides(config or ProxyConfig(), options or FitOptions(), overrides)
    device = _device(options.device)
    T = unit_class_rows(text_proxy, "text proxy", min_classes=2).to(device)  # (C, d)
    images = EmbeddingStream(
        shard_reader(image_features, storage_options),
        T.shape[1],
        device,
        dtype=torch.bfloat16 if options.precision == "bf16" else torch.float32,
        memory_budget=options.memory_budget,
    )
    with _matmul_precision("float32", device):
        logits = zero_shot_logits(images, T)  # (n, C); this pass checks and counts the images
    zero_shot_ids = logits.argmax(1)
    P, refined_by = pseudo_labels(logits, config)
    P = sharpen(P, config.alpha)  # (n, C)
    del logits
    class_marginal = P.sum(0) / images.n_images
    with _matmul_precision(options.precision, device):
        target = pseudo_label_features(images, P)  # (C, d)
        del P
        W, iterations, converged = learn_proxy(images, T, target, config, options.tol, on_step)
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
        refined_by=refined_by,
        config=config,
    )


def learn_vision_proxy(
    image_features: ImageFeatures, text_proxy: ArrayLike, **settings: object
) -> torch.Tensor:
    """The (C, d) float32 unit-row vision proxy. `settings` are fields of ProxyConfig and
    FitOptions by name (tau_t=..., iters=..., device=..., precision=...), and
    `storage_options`. See `fit_vision_proxy`."""
    storage_options = settings.pop("storage_options", None)
    return fit_vision_proxy(
        image_features, text_proxy, storage_options=storage_options, **settings
    ).vision_proxy


def _with_overrides(
    config: ProxyConfig, options: FitOptions, overrides: dict[str, object]
) -> tuple[ProxyConfig, FitOptions]:
    config_names = {f.name for f in fields(ProxyConfig)}
    option_names = {f.name for f in fields(FitOptions)}
    unknown = set(overrides) - config_names - option_names
    if unknown:
        raise TypeError(
            f"unknown setting(s) {', '.join(sorted(unknown))}; ProxyConfig has "
            f"{', '.join(sorted(config_names))} and FitOptions has "
            f"{', '.join(sorted(option_names))}"
        )
    config = replace(config, **{k: v for k, v in overrides.items() if k in config_names})
    options = replace(options, **{k: v for k, v in overrides.items() if k in option_names})
    return config, options


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
