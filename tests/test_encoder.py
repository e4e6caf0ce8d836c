"""Encoder loading (weights, errors) and embedding many images, on the tiny registered model."""

from __future__ import annotations

import logging
import time
import warnings

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch

from inmap import encoder as encoder_module
from inmap.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from inmap.decode import normalize
from inmap.encoder import RandomWeightsWarning, load_encoder
from inmap.errors import ModelNotFoundError, WeightsUnavailableError
from inmap.model import TINY_MODEL, resolve_model


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_encoder(TINY_MODEL, None, device="cpu")


@pytest.fixture
def fresh_cache():
    """Forget loaded encoders before and after, so a test sees its own loading."""
    encoder_module._load_encoder.cache_clear()
    yield
    encoder_module._load_encoder.cache_clear()


def _embedding_matrix(table) -> np.ndarray:
    column = table["embedding"].combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1)


def test_tiny_model_is_registered_with_open_clip(tiny):
    assert TINY_MODEL in open_clip.list_models()
    assert (tiny.image_size, tiny.dim) == (64, 64)
    assert sum(p.numel() for p in tiny.model.visual.parameters()) < 500_000


def test_random_weights_warn_loudly(fresh_cache, caplog):
    with caplog.at_level(logging.WARNING), pytest.warns(RandomWeightsWarning, match="RANDOM"):
        encoder = load_encoder(TINY_MODEL, None, device="cpu")

    assert encoder.pretrained is None
    assert any("RANDOM weights" in record.message for record in caplog.records)


def test_load_encoder_is_cached_per_process():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        first = load_encoder(TINY_MODEL, None, device="cpu")
        assert load_encoder(TINY_MODEL, None, device="cpu") is first
        # "no weights" is one spec however it is spelled
        for spelling in ("none", "", "random", " None "):
            assert load_encoder(TINY_MODEL, spelling, device="cpu") is first


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_gives_the_same_embeddings(tiny, tmp_path, suffix, fresh_cache):
    path = tmp_path / f"open_clip_model{suffix}"
    state = {key: value.contiguous() for key, value in tiny.model.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)

    loaded = load_encoder(TINY_MODEL, str(path), device="cpu")

    assert loaded.pretrained == str(path)
    np.testing.assert_array_equal(loaded.encode_pixels(pixels), tiny.encode_pixels(pixels))


def test_checkpoint_for_another_architecture_is_a_clear_error(tiny, tmp_path, fresh_cache):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)

    with pytest.raises(WeightsUnavailableError, match="does not fit model ViT-S-32"):
        load_encoder("ViT-S-32", str(path), device="cpu")


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "weights.safetensors")

    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_encoder(TINY_MODEL, missing, device="cpu")


def test_unknown_model_lists_close_matches():
    with pytest.raises(ModelNotFoundError, match="ViT-B-32") as error:
        load_encoder("ViT-B-23", "openai")
    assert "Did you mean" in str(error.value)

    with pytest.raises(ModelNotFoundError, match="ViT-B-32"):
        load_encoder("vit-b-32", "openai")


def test_unknown_pretrained_tag_lists_the_known_tags():
    with pytest.raises(ModelNotFoundError, match="openai") as error:
        load_encoder("ViT-B-32", "opnai")
    assert "laion2b_s34b_b79k" in str(error.value)


def test_offline_download_failure_says_how_to_use_local_weights(monkeypatch, fresh_cache):
    # The real download path, offline. Without HF_HUB_OFFLINE the Hub client retries for ~46 s on
    # this machine before failing with the same error.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()

    with pytest.raises(WeightsUnavailableError) as error:
        load_encoder(DEFAULT_MODEL, DEFAULT_PRETRAINED, device="cpu")

    message = str(error.value)
    assert time.perf_counter() - start < 10
    assert "'openai' of ViT-B-32" in message
    assert "--pretrained /path/to/open_clip_model.safetensors" in message
    assert "HF_HOME" in message and "HF_HUB_OFFLINE=1" in message
    assert "timm/vit_base_patch32_clip_224.openai" in message


def test_default_openai_weights_load_with_quickgelu_and_no_mismatch_warning(
    monkeypatch, fresh_cache
):
    # Stand in for the download; the weights stay random, the architecture is what is checked.
    fetched = []

    def fake_download(config, *args, **kwargs):
        fetched.append(config["hf_hub"])
        return "/cache/open_clip_model.safetensors"

    monkeypatch.setattr(open_clip, "download_pretrained", fake_download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", fake_download)
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *args, **kwargs: None)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = load_encoder(device="cpu")

    assert (encoder.model_name, encoder.pretrained) == ("ViT-B-32", "openai")
    assert fetched[0] == "timm/vit_base_patch32_clip_224.openai/"
    activation = encoder.model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(activation, open_clip.model.QuickGELU)
    assert not [w for w in caught if "QuickGELU" in str(w.message)]
    assert (encoder.image_size, encoder.dim) == (224, 512)


def test_encode_pixels_gives_unit_norm_float16(tiny):
    embeddings = tiny.encode_pixels(torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8))

    assert embeddings.dtype == np.float16 and embeddings.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=2e-3)


def test_tokenizer_feeds_the_text_tower(tiny):
    tokens = tiny.tokenizer(["a photo of a tench", "a photo of a goldfish"])

    with torch.inference_mode():
        text = tiny.model.encode_text(tokens)

    assert text.shape == (2, tiny.dim)


def test_encode_pixels_normalises_then_runs_the_image_tower(tiny):
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        features = tiny.model.encode_image(normalize(pixels, tiny.preprocessing))
    expected = torch.nn.functional.normalize(features.float(), dim=-1).half().numpy()

    np.testing.assert_array_equal(tiny.encode_pixels(pixels), expected)


def test_random_weights_are_the_same_in_every_process(tiny, fresh_cache):
    """Dask workers and reruns mixing cached shards must embed with one and the same model: one
    other process, against this one's."""
    import subprocess
    import sys

    script = (
        "import torch, warnings; warnings.simplefilter('ignore');"
        "torch.manual_seed(1234);"
        "from inmap.encoder import load_encoder;"
        "e = load_encoder('inmap-tiny', None, device='cpu');"
        "print(repr(float(sum(p.double().sum() for p in e.model.parameters()))));"
        "print(torch.rand(1).item())"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    theirs, after = run.stdout.split()[:2]
    torch.manual_seed(999)  # our own random state must not matter either
    mine = load_encoder(TINY_MODEL, None, device="cpu")
    assert float(theirs) == float(sum(p.double().sum() for p in mine.model.parameters()))
    # The caller's own random stream is left as it was (seeded 1234 above).
    torch.manual_seed(1234)
    assert float(after) == pytest.approx(torch.rand(1).item())


def test_threads_loading_one_model_together_get_one_model(fresh_cache):
    """The task threads of a run ask for the model at once: each must get the same weights (the
    seeded random init uses torch's global generator, so loads must not interleave)."""
    from concurrent.futures import ThreadPoolExecutor

    spec = resolve_model(TINY_MODEL, None, None, device_here=False)  # "auto", as a plan has it
    with ThreadPoolExecutor(4) as pool:
        encoders = list(pool.map(lambda _: load_encoder(spec), range(4)))
    assert all(encoder is encoders[0] for encoder in encoders)
    fresh = {k: v.clone() for k, v in encoders[0].model.state_dict().items()}
    encoder_module._load_encoder.cache_clear()
    again = load_encoder(spec)
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, fresh[name]), name
