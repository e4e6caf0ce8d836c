"""Encoder loading (weights, errors) and embedding many images, on the tiny registered model."""

from __future__ import annotations

import logging
import shutil
import time
import warnings

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from inmap import encoder as encoder_module
from inmap import storage
from inmap.decode import Preprocessing, normalize
from inmap.encoder import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    TINY_MODEL,
    ModelNotFoundError,
    RandomWeightsWarning,
    WeightsUnavailableError,
    embed_images,
    load_encoder,
)
from inmap.schemas import ERRORS_SCHEMA, embedding_schema, json_metadata


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
        assert load_encoder(TINY_MODEL, "none", device="cpu") is not first  # other arguments


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_gives_the_same_embeddings(tiny, tmp_path, suffix, fresh_cache):
    path = tmp_path / f"open_clip_model{suffix}"
    state = {key: value.contiguous() for key, value in tiny.model.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    images = torch.randn(3, 3, 64, 64)

    loaded = load_encoder(TINY_MODEL, str(path), device="cpu")

    assert loaded.pretrained == str(path)
    np.testing.assert_array_equal(loaded.encode_images(images), tiny.encode_images(images))


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


def test_encode_images_gives_unit_norm_float16(tiny):
    embeddings = tiny.encode_images(torch.randn(5, 3, 64, 64))

    assert embeddings.dtype == np.float16 and embeddings.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=2e-3)


def test_tokenizer_feeds_the_text_tower(tiny):
    tokens = tiny.tokenizer(["a photo of a tench", "a photo of a goldfish"])

    with torch.inference_mode():
        text = tiny.model.encode_text(tokens)

    assert text.shape == (2, tiny.dim)


def test_embeddings_match_open_clip_reference_preprocessing(tiny, sample_images):
    paths = sample_images[:8]
    with torch.inference_mode():
        reference = torch.stack([tiny.preprocess(Image.open(p)) for p in paths])
        expected = torch.nn.functional.normalize(tiny.model.encode_image(reference), dim=-1)
    exact = _with_preprocessing(tiny, Preprocessing(size=64, draft=False))
    items = [(str(p), "etag") for p in paths]

    full_decode, _ = embed_images(exact, items)
    drafted, _ = embed_images(tiny, items)

    def cosine(table):
        return (torch.from_numpy(_embedding_matrix(table).astype(np.float32)) * expected).sum(1)

    assert cosine(full_decode).min() > 0.999
    assert cosine(drafted).min() > 0.99


def _with_preprocessing(encoder, preprocessing):
    from dataclasses import replace

    return replace(encoder, preprocessing=preprocessing)


def test_every_failure_becomes_an_error_row_and_order_is_kept(tiny, sample_images, tmp_path):
    good = [str(p) for p in sample_images[:5]]
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(sample_images[5].read_bytes()[:5000])
    bad = {
        str(tmp_path / "zero.jpg"): "decode",
        str(tmp_path / "text.jpg"): "decode",
        str(tmp_path / "cut.jpg"): "decode",
        str(tmp_path / "missing.jpg"): "read",
    }
    uris = [good[0], *list(bad)[:2], *good[1:3], *list(bad)[2:], *good[3:]]
    items = [(uri, f"etag-{i}") for i, uri in enumerate(uris)]

    embeddings, errors = embed_images(tiny, items, batch_size=2, num_workers=2)

    assert embeddings.column("uri").to_pylist() == good
    assert embeddings.column("etag").to_pylist() == [f"etag-{uris.index(u)}" for u in good]
    assert errors.schema.equals(ERRORS_SCHEMA)
    assert dict(zip(errors["uri"].to_pylist(), errors["stage"].to_pylist(), strict=True)) == bad
    assert errors["etag"].to_pylist() == [
        f"etag-{uris.index(u)}" for u in errors["uri"].to_pylist()
    ]
    reasons = dict(zip(errors["uri"].to_pylist(), errors["error"].to_pylist(), strict=True))
    assert "empty" in reasons[str(tmp_path / "zero.jpg")]
    assert "not an image" in reasons[str(tmp_path / "text.jpg")]
    assert "truncated" in reasons[str(tmp_path / "cut.jpg")]
    assert "missing.jpg" in reasons[str(tmp_path / "missing.jpg")]


def test_embedding_table_schema_sizes_and_metadata(tiny, sample_images):
    path = sample_images[0]
    embeddings, errors = embed_images(tiny, [(str(path), "e1")])

    assert embeddings.schema.remove_metadata().equals(embedding_schema(64))
    assert len(errors) == 0
    assert (embeddings["width"][0].as_py(), embeddings["height"][0].as_py()) == Image.open(
        path
    ).size
    meta = json_metadata(embeddings.schema)
    assert meta["model"] == TINY_MODEL and meta["pretrained"] == "none" and meta["dim"] == 64
    assert meta["preprocessing"]["size"] == 64
    assert meta["preprocessing_id"] == tiny.preprocessing_id
    assert meta["inmap_version"] and meta["open_clip_version"] == open_clip.__version__
    vectors = _embedding_matrix(embeddings).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)


def test_no_items_give_empty_tables(tiny):
    embeddings, errors = embed_images(tiny, [])

    assert len(embeddings) == 0 and len(errors) == 0
    assert embeddings.schema.remove_metadata().equals(embedding_schema(64))


def test_batch_size_and_worker_count_do_not_change_embeddings(tiny, sample_images):
    items = [(str(p), "e") for p in sample_images[:11]]

    one_by_one, _ = embed_images(tiny, items, batch_size=1, num_workers=1)
    batched, _ = embed_images(tiny, items, batch_size=4, num_workers=3)

    np.testing.assert_allclose(
        _embedding_matrix(one_by_one).astype(np.float32),
        _embedding_matrix(batched).astype(np.float32),
        atol=2e-3,
    )


def test_images_in_s3_embed_like_local_files(
    tiny, sample_images, s3_bucket, s3_storage_options, tmp_path
):
    root = f"s3://{s3_bucket}"
    local_items, s3_items = [], []
    for path in sample_images[:6]:
        url = f"{root}/drop/{path.name}"
        storage.write_bytes_atomic(path.read_bytes(), url, s3_storage_options)
        local_copy = tmp_path / path.name
        shutil.copy(path, local_copy)
        local_items.append((str(local_copy), "e"))
    storage.write_bytes_atomic(b"", f"{root}/drop/zero.jpg", s3_storage_options)
    manifest = storage.list_images(f"{root}/drop", s3_storage_options)
    s3_items = list(zip(manifest["uri"].to_pylist(), manifest["etag"].to_pylist(), strict=True))

    from_s3, s3_errors = embed_images(tiny, s3_items, storage_options=s3_storage_options)
    from_disk, _ = embed_images(tiny, local_items)

    assert s3_errors["uri"].to_pylist() == [f"{root}/drop/zero.jpg"]
    assert from_s3["uri"].to_pylist()[0].startswith("s3://")
    np.testing.assert_array_equal(_embedding_matrix(from_s3), _embedding_matrix(from_disk))


def test_encode_pixels_normalises_like_encode_images(tiny):
    pixels = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)

    np.testing.assert_array_equal(
        tiny.encode_pixels(pixels), tiny.encode_images(normalize(pixels, tiny.preprocessing))
    )


def _counting_decoder(monkeypatch):
    calls = []  # torch's intra-op thread count seen by each decode

    def decode(data, preprocessing):
        calls.append(torch.get_num_threads())
        return torch.zeros(2, 2, 3, dtype=torch.uint8), (2, 2)

    monkeypatch.setattr(encoder_module, "decode_pixels", decode)
    return calls


def _memory_items(count: int) -> list[tuple[str, str]]:
    root = f"memory://inmap-test-{time.time_ns()}"
    items = []
    for i in range(count):
        storage.write_bytes_atomic(f"{i}".encode(), f"{root}/{i}.jpg")
        items.append((f"{root}/{i}.jpg", str(i)))
    return items


def test_without_prefetch_the_next_batch_decodes_only_when_asked(monkeypatch):
    calls = _counting_decoder(monkeypatch)
    batches = encoder_module.decode_batches(
        _memory_items(10), Preprocessing(size=2), batch_size=4, prefetch=0, num_workers=2
    )

    threads = torch.get_num_threads()
    first_items, first = next(batches)
    time.sleep(0.2)  # the caller's model would run now, with all of torch's threads
    assert len(calls) == 4 and len(first) == 4
    assert torch.get_num_threads() == threads

    rest = list(batches)
    assert [len(results) for _, results in rest] == [4, 2]
    assert [item[1] for item in first_items] == ["0", "1", "2", "3"]
    assert calls == [1] * 10  # decode workers never start OpenMP teams


def test_with_prefetch_later_batches_decode_while_the_caller_works(monkeypatch):
    calls = _counting_decoder(monkeypatch)
    batches = encoder_module.decode_batches(
        _memory_items(20), Preprocessing(size=2), batch_size=4, prefetch=2, num_workers=2
    )

    next(batches)
    time.sleep(0.2)

    assert len(calls) >= 12  # the yielded batch and two more


def test_torch_thread_limit_nests_and_restores():
    before = torch.get_num_threads()
    with encoder_module._one_torch_thread():
        with encoder_module._one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_random_weights_are_the_same_in_every_process():
    """Dask workers and reruns mixing cached shards must embed with one and the same model."""
    import subprocess
    import sys

    script = (
        "import torch, warnings; warnings.simplefilter('ignore');"
        "torch.manual_seed(1234);"
        "from inmap.encoder import load_encoder;"
        "e = load_encoder('inmap-tiny', None, device='cpu');"
        "print(float(sum(p.double().sum() for p in e.model.parameters())));"
        "print(torch.rand(1).item())"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    weights = [run.stdout.split()[0] for run in runs]
    assert weights[0] == weights[1]
    # The caller's own random stream is left as it was (seeded 1234 above).
    torch_state_after = [run.stdout.split()[1] for run in runs]
    torch.manual_seed(1234)
    assert float(torch_state_after[0]) == pytest.approx(torch.rand(1).item())
