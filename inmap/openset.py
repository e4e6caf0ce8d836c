"""Open-set drops: say which images are none of the listed classes.

A real drop holds images of things that are not on the class list, and every image still gets the
best listed class. `unknown_scores` says, per image, how likely it is to be none of them; the
label stays the best listed class (a class may itself be called "unknown").

The score is one minus the largest listed probability of a softmax over the listed classes *and* a
negative vocabulary of words that are not on the list (NegLabel-like, but with the maximum, as
MCM):

    unknown_i = 1 - max_{c listed} softmax([x_i Tᵀ, x_i Vᵀ] / τ)_c,   τ = 0.015

Without a vocabulary this is MCM (maximum softmax over the listed classes) at τ = 0.015. The
vocabulary gives an image of an unlisted thing somewhere better to go than its nearest listed
class. On the development set (benchmarks/openset.py), this beat MCM at τ = 0.01 by 3.8 AUROC
points with 250 vocabulary names on the tuning seeds (τ 0.01, 0.015, 0.02, 0.03 and 0.04 tried;
0.015 was best at 150, 250 and 350 names). A blend with the vision proxy's maximum
softmax (`proxy_weight`) added nothing there on average, so it is off by default.

`unknown_threshold` chooses a threshold from the drop's own scores, without labels: a two-component
Gaussian mixture on the log-odds of the listed probability; an image is unknown when the
low-probability component explains it better.

The shipped vocabulary (`inmap/vocabulary.txt`) is common nouns; `vocabulary_words` removes those
that name a listed class.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

# Softmax temperature of the unknown score (tuned on dev seeds 0-3; MCM's τ is 0.01).
UNKNOWN_TAU = 0.015
# Temperature of the vision proxy's softmax when `proxy_weight` > 0 (its learning τ_i).
PROXY_TAU = 0.04
# Fewest images for which `unknown_threshold` fits a mixture; below, it flags nothing.
MIN_THRESHOLD_IMAGES = 20
# Log-odds are clipped here so that probabilities of exactly 0 or 1 stay finite.
_LOG_ODDS_LIMIT = 30.0

__all__ = [
    "UNKNOWN_TAU",
    "unknown_scores",
    "unknown_threshold",
    "vocabulary_words",
    "shipped_vocabulary",
]


def _unit_rows(matrix, name: str) -> torch.Tensor:
    rows = torch.as_tensor(np.asarray(matrix, dtype=np.float32) if not torch.is_tensor(matrix)
                           else matrix).float()  # fmt: skip
    if rows.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (rows, d) array, got shape {tuple(rows.shape)}")
    return F.normalize(rows, dim=1)


def unknown_scores(
    image_features,
    text_proxy,
    proxy=None,
    vocabulary=None,
    *,
    tau: float = UNKNOWN_TAU,
    proxy_weight: float = 0.0,
) -> torch.Tensor:
    """(n,) float32 in [0, 1]: higher means more likely none of the listed classes.

    image_features (n, d), text_proxy (C, d), proxy (C, d) the learned vision proxy or None, and
    vocabulary (V, d) unit text embeddings of words that are not on the list, or None. Any float
    dtype, numpy or torch; rows are normalised here.

    The score is 1 - p, where p is the largest listed probability of softmax([X Tᵀ, X Vᵀ] / τ).
    With `proxy_weight` w > 0, p becomes p · q^w, q the vision proxy's maximum softmax at
    τ_i = 0.04 (a geometric blend)."""
    X = _unit_rows(image_features, "image_features")  # (n, d)
    T = _unit_rows(text_proxy, "text_proxy")  # (C, d)
    if X.shape[1] != T.shape[1]:
        raise ValueError(
            f"image_features have {X.shape[1]} dimensions and text_proxy {T.shape[1]}; "
            "they must come from the same model"
        )
    classes = len(T)
    logits = X @ T.T  # (n, C)
    if vocabulary is not None and len(vocabulary):
        V = _unit_rows(vocabulary, "vocabulary")  # (V, d)
        if V.shape[1] != T.shape[1]:
            raise ValueError(
                f"vocabulary has {V.shape[1]} dimensions and text_proxy {T.shape[1]}; embed it "
                "with the run's text encoder"
            )
        logits = torch.cat([logits, X @ V.T], dim=1)  # (n, C + V)
    listed = torch.softmax(logits / tau, dim=1)[:, :classes].max(dim=1).values  # (n,)
    if proxy_weight > 0:
        if proxy is None:
            raise ValueError("proxy_weight > 0 needs the vision proxy")
        W = _unit_rows(proxy, "proxy")  # (C, d)
        if W.shape != T.shape:
            raise ValueError(
                f"proxy is {tuple(W.shape)} and text_proxy {tuple(T.shape)}; they must match"
            )
        confident = torch.softmax(X @ W.T / PROXY_TAU, dim=1).max(dim=1).values
        listed = listed * confident.pow(proxy_weight)
    return (1 - listed).float()


def _log_odds(scores: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of the listed probability p = 1 - score, clipped."""
    known = np.clip(1.0 - scores, 1e-13, 1.0)
    unknown = np.clip(scores, 1e-13, 1.0)
    return np.clip(np.log(known) - np.log(unknown), -_LOG_ODDS_LIMIT, _LOG_ODDS_LIMIT)


def unknown_threshold(scores, iterations: int = 200) -> float:
    """The unknown score above which an image is flagged, chosen from the drop's scores alone.

    Fits two Gaussians to the log-odds of the listed probability (EM, started at the quartiles).
    The threshold is where the lower component (unknowns) becomes the more probable one. A drop
    whose scores do not split in two (one component, or fewer than MIN_THRESHOLD_IMAGES images)
    gets 1.0: nothing is flagged."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if len(values) < MIN_THRESHOLD_IMAGES:
        return 1.0
    z = _log_odds(values)
    spread = float(z.std())
    if spread < 1e-6:
        return 1.0
    means = np.quantile(z, [0.25, 0.75])
    sigmas = np.full(2, spread / 2)
    weights = np.full(2, 0.5)
    floor = spread / 100  # a component must not collapse onto one value
    for _ in range(iterations):
        log_density = (
            np.log(weights) - np.log(sigmas) - 0.5 * ((z[:, None] - means) / sigmas) ** 2
        )  # (n, 2)
        log_density -= log_density.max(axis=1, keepdims=True)
        resp = np.exp(log_density)
        resp /= resp.sum(axis=1, keepdims=True)
        mass = resp.sum(axis=0) + 1e-12
        new_means = (resp * z[:, None]).sum(axis=0) / mass
        sigmas = np.sqrt((resp * (z[:, None] - new_means) ** 2).sum(axis=0) / mass)
        sigmas = np.maximum(sigmas, floor)
        weights = mass / mass.sum()
        converged = np.allclose(new_means, means, atol=1e-6)
        means = new_means
        if converged:
            break
    low, high = np.argsort(means)
    if weights[low] < 0.01 or means[high] - means[low] < 1e-3:
        return 1.0
    cut = _crossing(means[low], sigmas[low], weights[low], means[high], sigmas[high],
                    weights[high])  # fmt: skip
    return float(1.0 / (1.0 + math.exp(min(cut, 700.0))))  # the score whose log-odds is `cut`


def _crossing(m0: float, s0: float, w0: float, m1: float, s1: float, w1: float) -> float:
    """The log-odds between the means where w0·N(m0, s0) and w1·N(m1, s1) are equal (the midpoint
    of the means when the equation has no root between them)."""
    # a z² + b z + c = 0 from equating the two log densities.
    a = 1 / (2 * s1**2) - 1 / (2 * s0**2)
    b = m0 / s0**2 - m1 / s1**2
    c = m1**2 / (2 * s1**2) - m0**2 / (2 * s0**2) + math.log((w0 * s1) / (w1 * s0))
    if abs(a) < 1e-12:
        roots = [-c / b] if abs(b) > 1e-12 else []
    else:
        disc = b * b - 4 * a * c
        roots = [] if disc < 0 else [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1, -1)]
    between = [r for r in roots if m0 <= r <= m1]
    return between[0] if between else (m0 + m1) / 2


# --- the vocabulary ------------------------------------------------------------------------------


def shipped_vocabulary() -> list[str]:
    """The common nouns shipped with inmap, in file order, without comments or blank lines."""
    text = resources.files("inmap").joinpath("vocabulary.txt").read_text(encoding="utf-8")
    words = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return list(dict.fromkeys(word for word in words if word))


def _normal(name: str) -> str:
    return " ".join(re.sub(r"[_\-/]+", " ", name.lower()).split())


def _forms(name: str) -> set[str]:
    """A name, its comma-separated synonyms, and their simple singular/plural forms."""
    forms = set()
    for part in _normal(name).split(","):
        part = part.strip()
        if not part:
            continue
        forms |= {part, part + "s", part + "es"}
        for suffix in ("es", "s"):
            if part.endswith(suffix) and len(part) > len(suffix) + 2:
                forms.add(part[: -len(suffix)])
    return forms


def vocabulary_words(classes: Sequence[str], words: Iterable[str] | None = None) -> list[str]:
    """The vocabulary (the shipped one when `words` is None) without the words that name a listed
    class: equal to a class name or one of its comma-separated synonyms, in either number, or a
    whole word of a class name ("shark" goes when "great white shark" is listed)."""
    words = shipped_vocabulary() if words is None else list(words)
    taken: set[str] = set()
    for name in classes:
        taken |= _forms(name)
        for token in _normal(name).replace(",", " ").split():
            taken |= _forms(token)
    return [word for word in dict.fromkeys(words) if not (_forms(word) & taken)]
