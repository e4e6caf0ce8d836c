"""Evaluate zero-shot, the paper's InMaP and other refinements on skewed drops of a labelled set.

A *drop* is a subset of a labelled set of image features, drawn to look like a real image drop:
balanced, long-tailed, with classes absent, dominated by one class, made of a handful of classes,
or smaller than the number of classes. `run_eval` draws each scenario over several seeds, labels
each drop with every method, and returns top-1 accuracy per drop; `format_table` prints mean ± std
over seeds and the worst seed against zero-shot. `inmap eval` is `add_eval_arguments` +
`eval_command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import torch

from inmap.proxy import PSEUDO_LABELERS, ProxyConfig, fit_vision_proxy, predict
from inmap.refine import decide

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


class EvalInputError(ValueError):
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
    if method == ZERO_SHOT:
        return (features @ text_proxy.T).argmax(1).numpy()
    _check_method(method)
    fit = fit_vision_proxy(features, text_proxy, dataclasses.replace(config, refine=method))
    return predict(features, fit.vision_proxy, top_k=1).class_ids.cpu().numpy()


def _check_method(method: str) -> None:
    if method != ZERO_SHOT and method not in PSEUDO_LABELERS:
        raise ValueError(
            f"unknown method {method!r}; choose from {ZERO_SHOT}, {', '.join(PSEUDO_LABELERS)}"
        )


def _label_with_all(
    features: torch.Tensor, text_proxy: torch.Tensor, methods: Sequence[str], config: ProxyConfig
) -> dict[str, np.ndarray]:
    """label_drop for each method; a method whose pseudo-labels equal an earlier method's on
    this drop (refine="adaptive" often picks Sinkhorn's or the plain ones) reuses its result."""
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
# Labelled sets: npz, Parquet, or a folder of images

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


def _read_classes(source: str) -> list[str]:
    from inmap import storage

    text = storage.read_bytes(source).decode("utf-8")
    if text.lstrip().startswith("["):
        return [str(name) for name in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _build_text_proxy(
    classnames: Sequence[str], model: str, pretrained: str | None, templates, device: str
) -> np.ndarray:
    """(C, d) zero-shot weights of `classnames` from the model's text tower."""
    from inmap.encoder import load_encoder
    from inmap.text import text_proxy

    encoder = load_encoder(model, pretrained, device=device)
    proxy = text_proxy(encoder.model, encoder.tokenizer, list(classnames), templates=templates)
    return proxy.float().cpu().numpy()


def load_labeled_set(
    source: str,
    *,
    classes: Sequence[str] | None = None,
    model: str | None = None,
    pretrained: str | None = "default",
    templates: str | list[str] = "paper",
    device: str = "auto",
    batch_size: int = 64,
    text_proxy: str | None = None,
    storage_options: dict | None = None,
) -> LabeledSet:
    """Load features and labels from `source`:

    - an `.npz` with `image_features`, `labels` (class ids) and `classnames`, and optionally
      `text_proxy` (else it is built with `model`);
    - Parquet (a file or a folder of shards) with an `embedding` column and a `label` column
      (class name or id), or a `uri` column whose paths carry the labels (`label_from_path`);
    - a folder of images labelled by sub-folder or `nXXXXXXXX_<class>.JPEG` names, embedded with
      `model` (default inmap.encoder.DEFAULT_MODEL and DEFAULT_PRETRAINED; None: random weights).

    Class names come from `classes`, the npz, or the sorted distinct labels. `text_proxy` is an
    optional `.npy` (C, d) array of zero-shot weights in class-name order; without it they are
    built from the class names with `model` and `templates`."""
    from inmap import encoder as encoders
    from inmap import storage

    model = model or encoders.DEFAULT_MODEL
    if pretrained == "default":
        pretrained = encoders.DEFAULT_PRETRAINED
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
            text = _build_text_proxy(classnames, model, pretrained, templates, device)
        return LabeledSet(arrays["image_features"], arrays["labels"], text, classnames)

    parquet = source.endswith(".parquet") or storage.glob(
        storage.join(source, "*.parquet"), storage_options
    )
    if parquet:
        uris = [source] if source.endswith(".parquet") else parquet
        table = storage.read_table(uris, storage_options=storage_options)
        if "embedding" not in table.column_names:
            raise EvalInputError(f"{source} has no `embedding` column ({table.column_names})")
        features = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
        if "label" in table.column_names:
            raw = table["label"].to_pylist()
        elif "uri" in table.column_names:
            raw = [label_from_path(uri) for uri in table["uri"].to_pylist()]
        else:
            raise EvalInputError(f"{source} has neither a `label` nor a `uri` column")
    else:
        manifest = storage.list_images(source, storage_options)
        if len(manifest) == 0:
            raise EvalInputError(f"no .npz, Parquet or images found at {source}")
        encoder = encoders.load_encoder(model, pretrained, device=device)
        items = zip(manifest["uri"].to_pylist(), manifest["etag"].to_pylist(), strict=True)
        table, errors = encoders.embed_images(
            encoder, items, storage_options=storage_options, batch_size=batch_size
        )
        if len(errors):
            print(
                f"inmap eval: {len(errors)} image(s) could not be read or decoded and are left "
                f"out, e.g. {errors['uri'][0]}: {errors['error'][0]}",
                file=sys.stderr,
            )
        features = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
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
        text = _build_text_proxy(classnames, model, pretrained, templates, device)
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


# ---------------------------------------------------------------------------------------------
# `inmap eval`


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `inmap eval`."""
    parser.add_argument(
        "source",
        help="labelled features (.npz, Parquet file or folder) or a folder of labelled images "
        "(class per sub-folder, or nXXXXXXXX_<class>.JPEG names)",
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="class names: a text file (one per line) or JSON list; default the npz's classnames "
        "or the distinct labels",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated drops to draw (default all): "
        + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()).replace("%", "%%"),
    )
    parser.add_argument("--seeds", type=int, default=5, help="drops per scenario (default 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first drop")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated: {ZERO_SHOT} and refine= values (default "
        f"{','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--text-proxy",
        default=None,
        help=".npy (C, d) zero-shot weights in class order, instead of building them with --model",
    )
    parser.add_argument("--iters", type=int, default=None, help="proxy-learning iterations")
    parser.add_argument("--model", default=None, help="open_clip model, for images or text")
    parser.add_argument(
        "--pretrained",
        default="default",
        help="pretrained tag, checkpoint path, or 'none' for random weights",
    )
    parser.add_argument("--templates", default="paper", help="'paper', 'openai' or a JSON list")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model batch")


def eval_command(args: argparse.Namespace) -> int:
    """Run `inmap eval`: print the table of top-1 per scenario and method."""
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown += [m for m in methods if m != ZERO_SHOT and m not in PSEUDO_LABELERS]
    if unknown:
        raise EvalInputError(
            f"unknown scenario or method {', '.join(unknown)}; scenarios: {', '.join(SCENARIOS)}; "
            f"methods: {ZERO_SHOT}, {', '.join(PSEUDO_LABELERS)}"
        )
    templates = json.loads(args.templates) if args.templates.startswith("[") else args.templates
    pretrained = None if args.pretrained.lower() in ("none", "random") else args.pretrained
    labeled = load_labeled_set(
        args.source,
        classes=_read_classes(args.classes) if args.classes else None,
        model=args.model,
        pretrained=pretrained,
        templates=templates,
        device=args.device,
        batch_size=args.batch_size,
        text_proxy=args.text_proxy,
    )
    config = ProxyConfig() if args.iters is None else ProxyConfig(iters=args.iters)
    print(
        f"{len(labeled.labels)} labelled images, {len(labeled.classnames)} classes; "
        f"{len(scenarios)} scenarios x {args.seeds} seeds from seed {args.first_seed}",
        file=sys.stderr,
    )
    table = run_eval(
        labeled,
        scenarios=scenarios,
        seeds=range(args.first_seed, args.first_seed + args.seeds),
        methods=methods,
        config=config,
        progress=lambda r: print(
            f"  {r.scenario} seed {r.seed}: {r.n_images} images, "
            + ", ".join(f"{m} {v:.2f}" for m, v in r.top1.items()),
            file=sys.stderr,
        ),
    )
    print(format_table(table))
    return 0
