"""Embedding many images: read, decode, batch; every failure kept with its reason."""

from __future__ import annotations

import shutil
import threading
import time
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from inmap import batches as batches_module
from inmap import storage
from inmap.batches import Throughput, embed_images
from inmap.decode import Preprocessing
from inmap.encoder import RandomWeightsWarning, load_encoder
from inmap.listing import list_images
from inmap.model import TINY_MODEL
from inmap.schemas import embedding_matrix, embedding_schema, json_metadata


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_encoder(TINY_MODEL, None, device="cpu")


def failures_of(result) -> dict[str, str]:
    return {uri: failure.stage for uri, _, failure in result.failures}


def test_embeddings_match_open_clip_reference_preprocessing(tiny, real_images):
    paths = real_images[:8]
    with torch.inference_mode():
        reference = torch.stack([tiny.preprocess(Image.open(p)) for p in paths])
        expected = torch.nn.functional.normalize(tiny.model.encode_image(reference), dim=-1)
    exact = _with_preprocessing(tiny, Preprocessing(size=64, draft=False))
    items = [(str(p), "etag") for p in paths]

    full_decode = embed_images(exact, items).embeddings
    drafted = embed_images(tiny, items).embeddings

    def cosine(table):
        return (torch.from_numpy(embedding_matrix(table)) * expected).sum(1)

    assert cosine(full_decode).min() > 0.999
    assert cosine(drafted).min() > 0.99


def _with_preprocessing(encoder, preprocessing):
    from dataclasses import replace

    return replace(encoder, preprocessing=preprocessing)


def test_every_failure_becomes_an_error_row_and_order_is_kept(tiny, real_images, tmp_path):
    good = [str(p) for p in real_images[:5]]
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(real_images[5].read_bytes()[:5000])
    bad = {
        str(tmp_path / "zero.jpg"): "decode",
        str(tmp_path / "text.jpg"): "decode",
        str(tmp_path / "cut.jpg"): "decode",
        str(tmp_path / "missing.jpg"): "missing",
    }
    uris = [good[0], *list(bad)[:2], *good[1:3], *list(bad)[2:], *good[3:]]
    items = [(uri, f"etag-{i}") for i, uri in enumerate(uris)]

    result = embed_images(tiny, items, throughput=Throughput(batch_size=2, num_workers=2))
    embeddings = result.embeddings

    assert embeddings.column("uri").to_pylist() == good
    assert embeddings.column("etag").to_pylist() == [f"etag-{uris.index(u)}" for u in good]
    assert failures_of(result) == bad
    assert [etag for uri, etag, _ in result.failures] == [
        f"etag-{uris.index(uri)}" for uri, _, _ in result.failures
    ]
    reasons = {uri: failure.reason for uri, _, failure in result.failures}
    assert "empty" in reasons[str(tmp_path / "zero.jpg")]
    assert "not an image" in reasons[str(tmp_path / "text.jpg")]
    assert "truncated" in reasons[str(tmp_path / "cut.jpg")]
    assert "missing.jpg" in reasons[str(tmp_path / "missing.jpg")]


def test_embedding_table_schema_sizes_and_metadata(tiny, real_images):
    path = real_images[0]
    result = embed_images(tiny, [(str(path), "e1")])
    embeddings = result.embeddings

    assert embeddings.schema.remove_metadata().equals(embedding_schema(64))
    assert result.failures == []
    assert (embeddings["width"][0].as_py(), embeddings["height"][0].as_py()) == Image.open(
        path
    ).size
    meta = json_metadata(embeddings.schema)
    assert meta["model"] == TINY_MODEL and meta["pretrained"] == "none" and meta["dim"] == 64
    assert meta["preprocessing"]["size"] == 64
    assert meta["preprocessing_id"] == tiny.preprocessing_id
    assert meta["inmap_version"] and meta["open_clip_version"] == open_clip.__version__
    assert meta["weights_id"] == tiny.spec.weights_id
    vectors = embedding_matrix(embeddings)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)


def test_no_items_give_empty_tables(tiny):
    result = embed_images(tiny, [])

    assert len(result.embeddings) == 0 and result.failures == []
    assert result.embeddings.schema.remove_metadata().equals(embedding_schema(64))


def test_batch_size_and_worker_count_do_not_change_embeddings(tiny, real_images):
    items = [(str(p), "e") for p in real_images[:11]]

    one_by_one = embed_images(
        tiny, items, throughput=Throughput(batch_size=1, num_workers=1)
    ).embeddings
    batched = embed_images(
        tiny, items, throughput=Throughput(batch_size=4, num_workers=3)
    ).embeddings

    np.testing.assert_allclose(embedding_matrix(one_by_one), embedding_matrix(batched), atol=2e-3)


def test_images_in_s3_embed_like_local_files(
    tiny, real_images, s3_bucket, s3_storage_options, tmp_path
):
    root = f"s3://{s3_bucket}"
    local_items, s3_items = [], []
    for path in real_images[:6]:
        url = f"{root}/drop/{path.name}"
        storage.write_bytes_atomic(path.read_bytes(), url, s3_storage_options)
        local_copy = tmp_path / path.name
        shutil.copy(path, local_copy)
        local_items.append((str(local_copy), "e"))
    storage.write_bytes_atomic(b"", f"{root}/drop/zero.jpg", s3_storage_options)
    manifest = list_images(f"{root}/drop", s3_storage_options).images
    s3_items = list(zip(manifest["uri"].to_pylist(), manifest["etag"].to_pylist(), strict=True))

    from_s3 = embed_images(tiny, s3_items, storage_options=s3_storage_options)
    from_disk = embed_images(tiny, local_items).embeddings

    assert list(failures_of(from_s3)) == [f"{root}/drop/zero.jpg"]
    assert from_s3.embeddings["uri"].to_pylist()[0].startswith("s3://")
    np.testing.assert_array_equal(embedding_matrix(from_s3.embeddings), embedding_matrix(from_disk))


FOUR_BY_TWO = Throughput(batch_size=4, num_workers=2)


def _counting_decoder(monkeypatch):
    calls = []  # torch's intra-op thread count seen by each decode

    def decode(data, preprocessing, budget=None):
        calls.append(torch.get_num_threads())
        return torch.zeros(2, 2, 3, dtype=torch.uint8), (2, 2)

    monkeypatch.setattr(batches_module, "decode_pixels", decode)
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
    batches = batches_module.decode_batches(
        _memory_items(10),
        Preprocessing(size=2),
        prefetch=0,
        throughput=Throughput(batch_size=4, num_workers=2),
    )

    threads = torch.get_num_threads()
    first_items, first = next(batches)
    time.sleep(0.2)  # the caller's model would run now, with all of torch's threads
    assert len(calls) == 4 and len(first) == 4  # and nothing more was decoded meanwhile
    assert torch.get_num_threads() == threads

    rest = list(batches)
    assert [len(results) for _, results in rest] == [4, 2]
    assert [item[1] for item in first_items] == ["0", "1", "2", "3"]
    assert calls == [1] * 10  # decode workers never start OpenMP teams


def test_with_prefetch_later_batches_decode_while_the_caller_works(monkeypatch):
    calls = _counting_decoder(monkeypatch)
    batches = batches_module.decode_batches(
        _memory_items(20),
        Preprocessing(size=2),
        prefetch=2,
        throughput=Throughput(batch_size=4, num_workers=2),
    )

    next(batches)
    deadline = time.monotonic() + 30
    while len(calls) < 12 and time.monotonic() < deadline:  # no fixed sleep: a busy machine
        time.sleep(0.01)

    assert len(calls) >= 12  # the yielded batch and two more, decoded while the caller works
    batches.close()


def test_torch_thread_limit_nests_and_restores():
    before = torch.get_num_threads()
    with batches_module._one_torch_thread():
        with batches_module._one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_stopping_early_leaves_no_reader_or_decoder_thread(monkeypatch):
    _counting_decoder(monkeypatch)
    batches = batches_module.decode_batches(
        _memory_items(40),
        Preprocessing(size=2),
        prefetch=2,
        throughput=Throughput(batch_size=4, num_workers=2),
    )
    next(batches)
    batches.close()

    alive = [
        t.name for t in threading.enumerate() if t.name.startswith(("inmap-read", "inmap-decode"))
    ]
    assert alive == []


def test_decoded_pixels_in_flight_stay_within_the_budget(tiny, sample_images, monkeypatch):
    items = [(str(p), "e") for p in sample_images[:12]]
    budget = 200_000  # about two photos decoded at once
    budgets = []

    class Recorded(batches_module.PixelBudget):
        def __init__(self, limit):
            super().__init__(limit)
            budgets.append(self)

    monkeypatch.setattr(batches_module, "PixelBudget", Recorded)
    result = embed_images(tiny, items, throughput=Throughput(num_workers=4, pixel_budget=budget))

    assert result.embeddings.num_rows == 12
    assert 0 < budgets[0].peak <= budget
    assert budgets[0].in_use == 0  # every hold released
