"""One resolution of model, weights and device, before any cache key; weights named by content."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from inmap import layout
from inmap.encoder import RandomWeightsWarning, load_encoder
from inmap.errors import InputError
from inmap.model import TINY_MODEL, file_sha256, resolve_model


@pytest.mark.parametrize("spelling", [None, "", "none", "None", "random", " none "])
def test_every_spelling_of_no_weights_is_one_spec(spelling):
    spec = resolve_model(TINY_MODEL, spelling, "cpu")
    assert spec == resolve_model(TINY_MODEL, None, "cpu")
    assert spec.pretrained is None and spec.key == resolve_model(TINY_MODEL, None, "cpu").key


def test_the_device_is_resolved_but_not_part_of_the_key(monkeypatch):
    assert resolve_model(TINY_MODEL, None, "auto").device in ("cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_model(TINY_MODEL, None, "auto").device == "cpu"
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_model(TINY_MODEL, None, "cuda:1")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_model(TINY_MODEL, None, "gpu0")


def test_openai_spelling_of_a_name_is_normalised():
    assert resolve_model("ViT-B/32", None, "cpu").name == "ViT-B-32"


@pytest.fixture
def checkpoint(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        tiny = load_encoder(TINY_MODEL, None, device="cpu")
    path = tmp_path / "weights.pt"
    torch.save(tiny.model.state_dict(), path)
    return path, tiny


def test_a_checkpoint_is_named_by_its_bytes_and_a_replaced_one_changes_every_key(checkpoint):
    path, tiny = checkpoint
    first = resolve_model(TINY_MODEL, str(path), "cpu")
    assert first.weights_id == f"sha256:{file_sha256(str(path))}"

    state = {
        k: v + 1e-3 if v.is_floating_point() else v for k, v in tiny.model.state_dict().items()
    }
    torch.save(state, path)  # same path, new weights
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))  # a different mtime, as any rewrite has
    second = resolve_model(TINY_MODEL, str(path), "cpu")

    assert second.weights_id != first.weights_id
    assert second.key != first.key
    assert layout.labelset_id(["a", "b"], first, "paper") != layout.labelset_id(
        ["a", "b"], second, "paper"
    )


def test_checksums_are_remembered_by_path_size_and_mtime(checkpoint, monkeypatch, tmp_path):
    path, _ = checkpoint
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    digest = file_sha256(str(path))
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    assert file_sha256(str(path)) == digest
    assert str(path) not in opened  # not hashed again


def test_labelset_changes_with_classes_model_and_templates():
    tiny = resolve_model(TINY_MODEL, None, "cpu")
    base = layout.labelset_id(["cat", "dog"], tiny, "paper")
    assert base == layout.labelset_id(["cat", "dog"], tiny, "paper")
    assert base != layout.labelset_id(["cat", "dog", "cow"], tiny, "paper")
    assert base != layout.labelset_id(["cat", "dog"], tiny, "openai")
    other = resolve_model("ViT-S-32", None, "cpu")
    assert base != layout.labelset_id(["cat", "dog"], other, "paper")
