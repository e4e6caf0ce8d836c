"""Text proxies: one unit-norm embedding per class, the mean over prompt templates.

open_clip's `build_zero_shot_classifier` does the work: it embeds every template filled with every
class name, averages each class's normalised embeddings and re-normalises the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from inmap.errors import ClassesError

Template = str | Callable[[str], str]
# Called after each chunk of classes with (classes done, classes in all).
ProgressCallback = Callable[[int, int], None]
CHUNK_CLASSES = 100  # classes encoded between progress reports

TEMPLATES: dict[str, tuple[Template, ...]] = {
    # The 7 templates the InMaP paper uses: open_clip's simple ImageNet set.
    "paper": tuple(SIMPLE_IMAGENET_TEMPLATES),
    # OpenAI's 80 ImageNet templates, as open_clip ships them.
    "openai": tuple(OPENAI_IMAGENET_TEMPLATES),
}


def text_proxy(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: str | Sequence[Template] = "paper",
    batch_size: int = 10,
    on_progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """The (C, d) float32 text proxy on the CPU, unit rows, row c for `classnames[c]`, computed
    on the model's device.

    templates: a name in TEMPLATES, or format strings with one `{}` and/or callables name -> text.
    batch_size: classes per forward pass (each contributes one text per template)."""
    templates = resolve_templates(templates)
    classnames = list(classnames)
    if not classnames:
        raise ValueError("no class names: give at least one")
    empty = [i for i, name in enumerate(classnames) if not str(name).strip()]
    if empty:
        raise ValueError(f"class names at positions {empty} are empty")
    device = next(model.parameters()).device
    refuse_truncated_duplicates(tokenizer, classnames, templates)
    chunks = []
    # Classes are independent, so encoding them in chunks changes nothing but lets a long CPU run
    # (1000 classes x 80 templates) report progress.
    for start in range(0, len(classnames), CHUNK_CLASSES):
        chunk = classnames[start : start + CHUNK_CLASSES]
        weights = build_zero_shot_classifier(
            model, tokenizer, chunk, templates, num_classes_per_batch=batch_size, device=device
        )  # (d, C_chunk)
        chunks.append(weights.T.float().cpu())
        if on_progress:
            on_progress(start + len(chunk), len(classnames))
    # A half-precision model gives half-precision means; re-normalise after the cast.
    return torch.nn.functional.normalize(torch.cat(chunks), dim=1)


def refuse_truncated_duplicates(
    tokenizer: Callable, classnames: Sequence[str], templates: Sequence[Callable[[str], str]]
) -> None:
    """Refuse class names that the text encoder cannot tell apart: past its context length
    (77 tokens for CLIP) the prompt is cut, and two long names can become the same prompt."""
    prompts = [templates[0](name) for name in classnames]
    tokens = tokenizer(prompts)  # (C, context_length), truncated as the model sees them
    seen: dict[bytes, int] = {}
    for index, row in enumerate(tokens):
        key = row.numpy().tobytes()
        if key in seen:
            first = seen[key]
            raise ClassesError(
                f"class names {first + 1} and {index + 1} ({classnames[first][:40]!r}... and "
                f"{classnames[index][:40]!r}...) are the same once cut to the text encoder's "
                f"{tokens.shape[1]} tokens; shorten them so they differ early"
            )
        seen[key] = index


def resolve_templates(templates: str | Sequence[Template]) -> list[Callable[[str], str]]:
    """Templates by set name, or as given; each a callable name -> prompt."""
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ValueError(
                f"unknown template set {templates!r}; choose from {', '.join(TEMPLATES)} "
                "or pass a list of templates"
            )
        templates = TEMPLATES[templates]
    templates = list(templates)
    if not templates:
        raise ValueError("no templates: give at least one")
    resolved = []
    for template in templates:
        if isinstance(template, str):
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
            template = template.format
        elif not callable(template):
            raise TypeError(f"a template must be a str or callable, got {type(template).__name__}")
        resolved.append(template)
    # build_zero_shot_classifier takes all strings or all callables; callables cover both.
    return resolved
