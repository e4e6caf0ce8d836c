"""Evaluate zero-shot, the paper's InMaP and other refinements on skewed drops of a labelled set.

A *drop* is a subset of a labelled set of image features, drawn to look like a real image drop:
balanced, long-tailed, with classes absent, dominated by one class, made of a handful of classes,
or smaller than the number of classes. `run_eval` draws each scenario over several seeds, labels
each drop with every method, and returns top-1 accuracy per drop; `format_table` prints mean ± std
over seeds and the worst seed against zero-shot. Labelled sets come from `inmap.labeled`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from inmap.config import ProxyConfig
from inmap.labeled import EvalInputError, LabeledSet

if TYPE_CHECKING:  # torch loads when a drop is labelled, so `inmap --help` stays quick
    import torch

__all__ = [
    "EvalInputError",
    "LabeledSet",
    "auroc",
    "format_open_set_table",
    "format_table",
    "make_drop",
    "make_open_set_drop",
    "run_eval",
    "run_open_set_eval",
]

ZERO_SHOT = "zero-shot"
DEFAULT_METHODS = (ZERO_SHOT, "sinkhorn", "adaptive")

# Long tail: expected class sizes fall exponentially from the largest class to 1/50 of it.
LONG_TAIL_IMBALANCE = 50.0
ABSENT_SHARE = 0.4  # share of classes absent from the "absent" drop
HANDFUL_CLASSES = 5
SMALL_SHARE = 0.2  # the "small" drop has this many images per class in the label set

SCENARIOS: dict[str, str] = {
    "balanced": "every class, as many images as the rarest class has",
    "long_tail": f"class sizes fall exponentially, largest/smallest = {LONG_TAIL_IMBALANCE:g}",
    "absent": f"{ABSENT_SHARE:.0%} of classes absent, the others 1 to max-class-size images",
    "dominant": "one class is half the drop, the other half one image each of other classes",
    "handful": f"{HANDFUL_CLASSES} classes only, all of their images",
    "small": f"{SMALL_SHARE:g} x (number of classes) images drawn at random",
}


# ---------------------------------------------------------------------------------------------
# Drops


def _draw(rng: np.random.Generator, labels: np.ndarray, sizes: dict[int, int]) -> np.ndarray:
    """Indices of `sizes[c]` images of each class c (fewer if the class has fewer), sorted."""
    chosen = [
        rng.choice(np.flatnonzero(labels == c), min(k, int((labels == c).sum())), replace=False)
        for c, k in sizes.items()
        if k > 0
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def make_drop(labels: np.ndarray, scenario: str, seed: int) -> np.ndarray:
    """Sorted indices into `labels` of one drop of `scenario` (a key of SCENARIOS)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    largest = int(counts.max())
    order = rng.permutation(classes)  # a random class gets each role
    if scenario == "balanced":
        return _draw(rng, labels, {int(c): int(counts.min()) for c in classes})
    if scenario == "long_tail":
        rank = np.arange(len(order)) / max(len(order) - 1, 1)  # 0 for the head, 1 for the tail
        expected = largest * LONG_TAIL_IMBALANCE**-rank
        sizes = np.floor(expected + rng.random(len(order))).astype(int)  # unbiased rounding
        return _draw(rng, labels, dict(zip(order.tolist(), sizes.tolist(), strict=True)))
    if scenario == "absent":
        present = order[: int(round((1 - ABSENT_SHARE) * len(order)))]
        return _draw(rng, labels, {int(c): int(rng.integers(1, largest + 1)) for c in present})
    if scenario == "dominant":
        head = int(order[0])
        size = int((labels == head).sum())
        return _draw(rng, labels, {head: size, **{int(c): 1 for c in order[1 : size + 1]}})
    if scenario == "handful":
        return _draw(rng, labels, {int(c): largest for c in order[:HANDFUL_CLASSES]})
    # small
    n = max(1, int(round(SMALL_SHARE * len(classes))))
    return np.sort(rng.choice(len(labels), min(n, len(labels)), replace=False))


# ---------------------------------------------------------------------------------------------
# Methods


def label_drop(
    features: torch.Tensor, text_proxy: torch.Tensor, method: str, config: ProxyConfig
) -> np.ndarray:
    """Class ids for the images of one drop: zero-shot, or InMaP with `refine=method`."""

    from inmap.proxy import fit_vision_proxy, predict

    if method == ZERO_SHOT:
        return (features @ text_proxy.T).argmax(1).numpy()
    _check_method(method)
    fit = fit_vision_proxy(features, text_proxy, dataclasses.replace(config, refine=method))
    return predict(features, fit.vision_proxy, top_k=1).class_ids.cpu().numpy()


def _check_method(method: str) -> None:
    from inmap.proxy import PSEUDO_LABELERS

    if method != ZERO_SHOT and method not in PSEUDO_LABELERS:
        raise ValueError(
            f"unknown method {method!r}; choose from {ZERO_SHOT}, {', '.join(PSEUDO_LABELERS)}"
        )


def _label_with_all(
    features: torch.Tensor, text_proxy: torch.Tensor, methods: Sequence[str], config: ProxyConfig
) -> dict[str, np.ndarray]:
    """label_drop for each method; a method whose pseudo-labels equal an earlier method's on
    this drop (refine="adaptive" often picks Sinkhorn's or the plain ones) reuses its result."""
    import torch

    from inmap.proxy import PSEUDO_LABELERS

    logits = features @ text_proxy.T
    done: list[tuple[torch.Tensor, np.ndarray]] = []
    labels = {}
    for method in methods:
        if method == ZERO_SHOT:
            labels[method] = logits.argmax(1).numpy()
            continue
        _check_method(method)
        pseudo = PSEUDO_LABELERS[method](logits, dataclasses.replace(config, refine=method))
        same = [ids for earlier, ids in done if torch.equal(earlier, pseudo)]
        labels[method] = same[0] if same else label_drop(features, text_proxy, method, config)
        done.append((pseudo, labels[method]))
    return labels


@dataclass
class DropResult:
    """One drop (scenario, seed) labelled by every method."""

    scenario: str
    seed: int
    n_images: int
    n_classes: int  # classes present in the drop
    top1: dict[str, float]  # method -> top-1 accuracy in percent
    adaptive_branch: str  # what refine="adaptive" decided for this drop


@dataclass
class EvalTable:
    """All drops of a `run_eval`, in the order they were drawn."""

    results: list[DropResult] = field(default_factory=list)
    methods: tuple[str, ...] = DEFAULT_METHODS

    def top1(self, scenario: str, method: str) -> np.ndarray:
        """Top-1 per seed of `method` on `scenario`, in seed order."""
        return np.array([r.top1[method] for r in self.results if r.scenario == scenario])

    def scenarios(self) -> list[str]:
        return list(dict.fromkeys(r.scenario for r in self.results))


def run_eval(
    labeled: LabeledSet,
    *,
    scenarios: Sequence[str] = tuple(SCENARIOS),
    seeds: Sequence[int] = range(5),
    methods: Sequence[str] = DEFAULT_METHODS,
    config: ProxyConfig | None = None,
    progress: Callable[[DropResult], None] | None = None,
) -> EvalTable:
    """Top-1 of each method on each drop (scenario x seed) of `labeled`.

    Drops that come out identical (e.g. "balanced" on a set with equal class counts) are labelled
    once and reused."""
    import torch

    from inmap.refine import decide

    config = config or ProxyConfig()
    features = torch.from_numpy(np.asarray(labeled.features, dtype=np.float32))
    features = torch.nn.functional.normalize(features, dim=1)
    text_proxy = torch.from_numpy(np.asarray(labeled.text_proxy, dtype=np.float32))
    text_proxy = torch.nn.functional.normalize(text_proxy, dim=1)
    methods = tuple(methods)
    if ZERO_SHOT not in methods:
        methods = (ZERO_SHOT, *methods)  # every row is read against zero-shot
    table = EvalTable(methods=methods)
    done: dict[bytes, tuple[dict[str, float], str]] = {}
    for scenario in scenarios:
        for seed in seeds:
            indices = make_drop(labeled.labels, scenario, seed)
            truth = labeled.labels[indices]
            key = indices.tobytes()
            if key not in done:
                x = features[indices]
                posteriors = torch.softmax(x @ text_proxy.T / config.tau_t, dim=1)
                branch = decide(posteriors).branch
                labels = _label_with_all(x, text_proxy, methods, config)
                top1 = {m: 100.0 * float((ids == truth).mean()) for m, ids in labels.items()}
                done[key] = (top1, branch)
            top1, branch = done[key]
            result = DropResult(
                scenario, seed, len(indices), len(np.unique(truth)), dict(top1), branch
            )
            table.results.append(result)
            if progress:
                progress(result)
    return table


def format_table(table: EvalTable) -> str:
    """Markdown: per scenario, mean ± std (over seeds, ddof 0) of top-1 for each method; for each
    method other than zero-shot, also the worst seed's difference from zero-shot (points)."""
    methods = table.methods
    others = [m for m in methods if m != ZERO_SHOT]
    head = ["scenario", "seeds", "images", "classes", *methods]
    head += [f"{m} − zero-shot, worst seed" for m in others]
    head += ["adaptive chose"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scenario in table.scenarios():
        rows = [r for r in table.results if r.scenario == scenario]
        zero_shot = table.top1(scenario, ZERO_SHOT)
        cells = [
            scenario,
            str(len(rows)),
            f"{np.mean([r.n_images for r in rows]):.0f}",
            f"{np.mean([r.n_classes for r in rows]):.0f}",
        ]
        cells += [_mean_std(table.top1(scenario, m)) for m in methods]
        cells += [f"{(table.top1(scenario, m) - zero_shot).min():+.2f}" for m in others]
        branches = [r.adaptive_branch for r in rows]
        cells.append(", ".join(f"{b} ×{branches.count(b)}" for b in dict.fromkeys(branches)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: np.ndarray) -> str:
    return f"{values.mean():.2f} ± {values.std():.2f}"


# ---------------------------------------------------------------------------------------------
# Open-set drops: images of classes that are not on the list (see inmap.openset)

OPEN_SET_SHARES = (0.25, 0.5)  # shares of the drop's classes left off the list
OPEN_SET_VOCABULARY = 0.5  # share of the classes held out of the drop as the negative vocabulary
MCM_TAU = 0.01  # the baseline: zero-shot maximum softmax at CLIP's temperature (MCM)


@dataclass(frozen=True)
class OpenSetDrop:
    """A drop of a labelled set in three parts: the classes are split into a vocabulary (held
    out: only their text is used), listed classes and unlisted ones; the drop holds every image
    of the listed and unlisted classes."""

    indices: np.ndarray  # (n,) sorted indices into the labelled set
    unlisted: np.ndarray  # (n,) bool: the image's class is not on the list
    listed_classes: np.ndarray  # (C,) class ids on the list, sorted
    vocabulary_classes: np.ndarray  # (V,) class ids whose text proxies are the vocabulary


def vocabulary_classes(n_classes: int, vocabulary: int | float = OPEN_SET_VOCABULARY) -> int:
    """How many of `n_classes` classes to hold out as the vocabulary: `vocabulary` itself, or a
    share of the classes when it is a float below 1."""
    if isinstance(vocabulary, float) and 0 <= vocabulary < 1:
        return int(round(vocabulary * n_classes))
    return int(vocabulary)


def make_open_set_drop(
    labels: np.ndarray, seed: int, unlisted_share: float, vocabulary_size: int
) -> OpenSetDrop:
    """Split the classes of `labels` at random: `vocabulary_size` for the vocabulary, and of the
    rest a share `unlisted_share` unlisted, the others listed."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 0 < unlisted_share < 1:
        raise EvalInputError(f"the unlisted share must be in (0, 1), got {unlisted_share}")
    if not 0 <= vocabulary_size <= len(classes) - 2:
        raise EvalInputError(
            f"a vocabulary of {vocabulary_size} classes leaves too few in the drop: the labelled "
            f"set has {len(classes)} classes, so hold out 0 to {len(classes) - 2}"
        )
    order = np.random.default_rng(seed).permutation(classes)
    vocabulary, in_drop = order[:vocabulary_size], order[vocabulary_size:]
    n_unlisted = min(max(int(round(unlisted_share * len(in_drop))), 1), len(in_drop) - 1)
    unlisted_classes = in_drop[:n_unlisted]
    indices = np.flatnonzero(np.isin(labels, in_drop))
    return OpenSetDrop(
        indices=indices,
        unlisted=np.isin(labels[indices], unlisted_classes),
        listed_classes=np.sort(in_drop[n_unlisted:]),
        vocabulary_classes=np.sort(vocabulary),
    )


def auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve in percent: the chance that a random positive scores above a
    random negative, ties counting half (Mann-Whitney)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, tie_group = np.unique(scores, return_inverse=True)
    ranks = (np.bincount(tie_group, ranks) / np.bincount(tie_group))[tie_group]  # mean tied rank
    return 100.0 * (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass(frozen=True)
class FlagFigures:
    """How a threshold on unknown scores does against the truth, in percent."""

    flagged: float  # share of the drop flagged unknown
    precision: float  # of the flagged, the share truly unlisted (nan when none is flagged)
    recall: float  # of the unlisted, the share flagged


def flag_figures(unlisted: np.ndarray, flagged: np.ndarray) -> FlagFigures:
    unlisted, flagged = np.asarray(unlisted, bool), np.asarray(flagged, bool)
    hits = int((unlisted & flagged).sum())
    return FlagFigures(
        flagged=100.0 * flagged.mean() if len(flagged) else float("nan"),
        precision=100.0 * hits / flagged.sum() if flagged.any() else float("nan"),
        recall=100.0 * hits / unlisted.sum() if unlisted.any() else float("nan"),
    )


# Open-set scores compared, by name: (what it is, needs the vocabulary).
OPEN_SET_SCORES: dict[str, str] = {
    "mcm": f"zero-shot maximum softmax, τ {MCM_TAU} (MCM, the baseline)",
    "proxy": "the vision proxy's maximum softmax, τ_i",
    "ours, no vocabulary": "inmap.unknown_scores without a vocabulary (MCM at τ 0.015)",
    "vocabulary mass": "softmax mass on the vocabulary, τ 0.01 (NegLabel-like)",
    "ours": "inmap.unknown_scores with the vocabulary (the default)",
    "ours + proxy": "inmap.unknown_scores with the vocabulary, proxy_weight 0.5",
}


FLAGGED = ("ours", "ours, no vocabulary")  # scores thresholded by inmap.unknown_threshold


@dataclass
class OpenSetResult:
    """One open-set drop: AUROC (unlisted against listed) of each score, the flags at the
    drop's own threshold, and top-1 on the listed images."""

    seed: int
    unlisted_share: float
    vocabulary_size: int
    n_images: int
    n_unlisted: int
    auroc: dict[str, float]  # score name (OPEN_SET_SCORES) -> AUROC in percent
    flags: dict[str, FlagFigures]  # FLAGGED score name -> at its unknown_threshold
    listed_top1: dict[str, float]  # "zero-shot" / "default" -> top-1 on listed images, percent


def open_set_drop_result(
    labeled: LabeledSet,
    seed: int,
    unlisted_share: float,
    vocabulary: int | float = OPEN_SET_VOCABULARY,
    config: ProxyConfig | None = None,
) -> OpenSetResult:
    """Draw one open-set drop, learn the default vision proxy on it (listed classes only) and
    score it every way of OPEN_SET_SCORES."""
    import torch

    from inmap.openset import unknown_scores, unknown_threshold
    from inmap.proxy import fit_vision_proxy

    config = config or ProxyConfig()
    vocabulary_size = vocabulary_classes(len(labeled.text_proxy), vocabulary)
    drop = make_open_set_drop(labeled.labels, seed, unlisted_share, vocabulary_size)
    unit = torch.nn.functional.normalize
    X = unit(torch.from_numpy(np.asarray(labeled.features, np.float32)[drop.indices]), dim=1)
    text = unit(torch.from_numpy(np.asarray(labeled.text_proxy, np.float32)), dim=1)
    T, V = text[drop.listed_classes], text[drop.vocabulary_classes]  # (C, d), (V, d)
    W = fit_vision_proxy(X, T, config).vision_proxy  # (C, d)
    zero_shot = X @ T.T  # (n, C)
    scores = {
        "mcm": -torch.softmax(zero_shot / MCM_TAU, 1).max(1).values,
        "proxy": -torch.softmax(X @ W.T / config.tau_i, 1).max(1).values,
        "ours, no vocabulary": unknown_scores(X, T, W),
        "vocabulary mass": torch.softmax(torch.cat([zero_shot, X @ V.T], 1) / MCM_TAU, 1)[
            :, len(T) :
        ].sum(1),
        "ours": unknown_scores(X, T, W, V),
        "ours + proxy": unknown_scores(X, T, W, V, proxy_weight=0.5),
    }
    flags = {
        name: flag_figures(drop.unlisted, scores[name].numpy() > unknown_threshold(scores[name]))
        for name in FLAGGED
    }
    listed = ~drop.unlisted
    truth = np.searchsorted(drop.listed_classes, labeled.labels[drop.indices][listed])
    top1 = {
        ZERO_SHOT: 100.0 * float((zero_shot[listed].argmax(1).numpy() == truth).mean()),
        "default": 100.0 * float(((X[listed] @ W.T).argmax(1).numpy() == truth).mean()),
    }
    return OpenSetResult(
        seed,
        unlisted_share,
        vocabulary_size,
        len(drop.indices),
        int(drop.unlisted.sum()),
        {name: auroc(drop.unlisted, s.numpy()) for name, s in scores.items()},
        flags,
        top1,
    )


def run_open_set_eval(
    labeled: LabeledSet,
    *,
    seeds: Sequence[int] = (100, 101),
    shares: Sequence[float] = OPEN_SET_SHARES,
    vocabulary: int | float = OPEN_SET_VOCABULARY,
    config: ProxyConfig | None = None,
    progress: Callable[[OpenSetResult], None] | None = None,
) -> list[OpenSetResult]:
    """`open_set_drop_result` for every (share, seed). `vocabulary`: classes held out as the
    negative vocabulary, a count or (a float below 1) a share of the classes."""
    results = []
    for share in shares:
        for seed in seeds:
            result = open_set_drop_result(labeled, seed, share, vocabulary, config)
            results.append(result)
            if progress:
                progress(result)
    return results


def format_open_set_table(results: Sequence[OpenSetResult]) -> str:
    """Markdown: one row per drop and a mean row; AUROC of each score, the listed top-1 of
    zero-shot and the default, and the FLAGGED scores' flags at the drop's own threshold."""
    names = list(OPEN_SET_SCORES)
    head = ["unlisted", "seed", "images", "vocabulary", *[f"AUROC {n}" for n in names]]
    head += ["listed top-1 zero-shot → default"]
    head += [f"{part} ({flag})" for flag in FLAGGED for part in ("flagged", "precision", "recall")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, seed: str, rs: Sequence[OpenSetResult]) -> str:
        mean = lambda values: float(np.nanmean(values))  # noqa: E731
        cells = [label, seed, f"{mean([r.n_images for r in rs]):.0f}",
                 f"{mean([r.vocabulary_size for r in rs]):.0f}"]  # fmt: skip
        cells += [f"{mean([r.auroc[n] for r in rs]):.1f}" for n in names]
        cells.append(
            f"{mean([r.listed_top1[ZERO_SHOT] for r in rs]):.1f} → "
            f"{mean([r.listed_top1['default'] for r in rs]):.1f}"
        )
        for flag in FLAGGED:
            for part in ("flagged", "precision", "recall"):
                cells.append(f"{mean([getattr(r.flags[flag], part) for r in rs]):.1f}")
        return "| " + " | ".join(cells) + " |"

    for r in results:
        lines.append(row(f"{r.unlisted_share:.0%}", str(r.seed), [r]))
    if len(results) > 1:
        lines.append(row("**mean**", "", results))
    return "\n".join(lines)
