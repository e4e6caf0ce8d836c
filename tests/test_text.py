"""Text proxies from the project's tiny random open_clip model (no weights to download)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from inmap.errors import ClassesError
from inmap.model import TINY_MODEL
from inmap.text import TEMPLATES, text_proxy

CLASSES = ["goldfish", "tabby cat", "fire truck"]
EMBED_DIM = 64


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    return model, open_clip.get_tokenizer(TINY_MODEL)


def mean_of_template_embeddings(model, tokenizer, name: str, templates) -> torch.Tensor:
    """The definition, written out: mean of normalised template embeddings, re-normalised."""
    texts = [t.format(name) if isinstance(t, str) else t(name) for t in templates]
    with torch.no_grad():
        embeddings = model.encode_text(tokenizer(texts), normalize=True)
    return torch.nn.functional.normalize(embeddings.mean(0), dim=0)


def test_paper_templates_are_the_seven_from_the_paper():
    assert sorted(template("{}") for template in TEMPLATES["paper"]) == sorted(
        [
            "itap of a {}.",
            "a origami {}.",
            "a bad photo of the {}.",
            "a photo of the large {}.",
            "a {} in a video game.",
            "art of the {}.",
            "a photo of the small {}.",
        ]
    )


def test_openai_templates_are_open_clips_eighty():
    openai = TEMPLATES["openai"]
    assert len(openai) == 80
    assert openai[0]("dog") == "a bad photo of a dog."


def test_text_proxy_rows_are_unit_norm_class_means_in_class_order(tiny_clip):
    model, tokenizer = tiny_clip
    proxy = text_proxy(model, tokenizer, CLASSES)
    assert proxy.shape == (len(CLASSES), EMBED_DIM)
    assert proxy.dtype == torch.float32
    torch.testing.assert_close(proxy.norm(dim=1), torch.ones(len(CLASSES)))
    for row, name in zip(proxy, CLASSES, strict=True):
        expected = mean_of_template_embeddings(model, tokenizer, name, TEMPLATES["paper"])
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)


def test_text_proxy_does_not_depend_on_batching(tiny_clip):
    model, tokenizer = tiny_clip
    one_at_a_time = text_proxy(model, tokenizer, CLASSES, batch_size=1)
    all_at_once = text_proxy(model, tokenizer, CLASSES, batch_size=len(CLASSES))
    torch.testing.assert_close(one_at_a_time, all_at_once, atol=1e-5, rtol=1e-5)


def test_template_set_by_name_and_own_templates(tiny_clip):
    model, tokenizer = tiny_clip
    openai = text_proxy(model, tokenizer, CLASSES[:1], templates="openai")
    expected = mean_of_template_embeddings(model, tokenizer, CLASSES[0], TEMPLATES["openai"])
    torch.testing.assert_close(openai[0], expected, atol=1e-5, rtol=1e-5)
    mixed = ["a photo of a {}.", lambda name: f"a drawing of a {name}."]
    own = text_proxy(model, tokenizer, CLASSES[:1], templates=mixed)
    expected = mean_of_template_embeddings(model, tokenizer, CLASSES[0], mixed)
    torch.testing.assert_close(own[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("templates", "classnames", "message"),
    [
        ("imagenet-9000", CLASSES, "unknown template set 'imagenet-9000'"),
        (["a photo."], CLASSES, "must contain exactly one"),
        ([], CLASSES, "no templates"),
        ("paper", [], "no class names"),
        ("paper", ["cat", " "], "positions \\[1\\] are empty"),
    ],
)
def test_bad_templates_or_class_names_are_refused(tiny_clip, templates, classnames, message):
    model, tokenizer = tiny_clip
    with pytest.raises(ValueError, match=message):
        text_proxy(model, tokenizer, classnames, templates=templates)


def test_class_names_cut_to_the_same_prompt_are_refused(tiny_clip):
    model, tokenizer = tiny_clip
    stem = "a very long and detailed description of an unusual object " * 8
    with pytest.raises(ClassesError, match="the same once cut to the text encoder's 77 tokens"):
        text_proxy(model, tokenizer, ["cat", stem + "left", stem + "right"])
    # Long names that differ early are fine.
    text_proxy(model, tokenizer, ["left " + stem, "right " + stem])
