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

__all__ = ["EvalInputError", "LabeledSet", "format_table", "make_drop", "run_eval"]

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
