"""Embedding plans and the embedding index: stable shards, only what is new, never a vector read
to plan, and repairs after a crash."""

from __future__ import annotations

import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from inmap import embedding, failures, layout, storage
from inmap.encoder import RandomWeightsWarning
from inmap.job import Job
from inmap.model import TINY_MODEL, resolve_model
from inmap.options import RunOptions
from inmap.schemas import MANIFEST_SCHEMA

SPEC = resolve_model(TINY_MODEL, None, "cpu")


def manifest(*pairs: tuple[str, str]) -> pa.Table:
    uris, etags = zip(*pairs, strict=True) if pairs else ((), ())
    return pa.table(
        {"uri": list(uris), "etag": list(etags), "size": [1] * len(uris)}, schema=MANIFEST_SCHEMA
    )


def job_for(source, output, **overrides) -> Job:
    options = {k: overrides.pop(k) for k in list(overrides) if k in RunOptions.model_fields
               and k != "model"}  # fmt: skip
    fields = {"source": str(source), "output": str(output), "model": SPEC,
              "classes": ("fish", "bird"), "run_id": "run-1", **overrides}  # fmt: skip
    return Job(**fields, settings=RunOptions(**options))


@pytest.fixture(autouse=True)
def quiet_random_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


def test_plan_is_stable_and_skips_embedded_and_failed_images(tmp_path):
    listed = manifest(*[(f"s3://b/{i:03d}.jpg", f"e{i}") for i in range(10)])
    embedded = manifest(("s3://b/000.jpg", "e0"), ("s3://b/001.jpg", "OLD-ETAG"))
    failed = pa.table({"uri": ["s3://b/002.jpg", "s3://b/003.jpg"], "etag": ["e2", "e3"],
                       "stage": ["decode", "read"]})  # fmt: skip
    job = job_for("s3://b", tmp_path, shard_size=4)

    plan = embedding.plan_embedding(listed, embedded, failed, job)

    # 000 is embedded; 001 changed since it was embedded; 002 is a known decode failure; 003
    # could not be read last time: tried again.
    planned = [uri for shard in plan.shards for uri in shard.uris]
    assert [shard.retrying for shard in plan.shards] == [("s3://b/003.jpg",), ()]
    assert planned == [f"s3://b/{i:03d}.jpg" for i in [1, 3, 4, 5, 6, 7, 8, 9]]
    assert [len(shard.uris) for shard in plan.shards] == [4, 4]
    assert (plan.cached, plan.known_failures) == (1, 1)
    again = embedding.plan_embedding(listed, embedded, failed, job)
    assert [s.shard_id for s in again.shards] == [s.shard_id for s in plan.shards]
    other = job_for("s3://b", tmp_path, shard_size=4, model=resolve_model("ViT-S-32", None, "cpu"))
    other_plan = embedding.plan_embedding(listed, embedded, failed, other)
    assert {s.shard_id for s in other_plan.shards}.isdisjoint(s.shard_id for s in plan.shards)


@pytest.fixture
def embedded_output(image_folder, tmp_path):
    """An output with the 12 good images of image_folder embedded in 3 shards."""
    from inmap.listing import list_images

    job = job_for(image_folder, tmp_path / "out", shard_size=4)
    listing = list_images(str(image_folder)).images
    plan = replan(job, listing)
    for shard in plan.shards:
        embedding.embed_shard(shard, job)
    return job, listing, plan


def replan(job: Job, listing: pa.Table) -> embedding.EmbeddingPlan:
    index = embedding.embedding_index(job)
    return embedding.plan_embedding(listing, index, failures.known_failures(job), job)


def test_planning_reads_no_embedding_vector(embedded_output, monkeypatch):
    job, listing, _ = embedded_output
    read_columns = []
    real_read = storage.read_parquet

    def spying_read(url, columns=None, storage_options=None):
        read_columns.append((url, columns))
        return real_read(url, columns, storage_options)

    def refuse_whole_file(*args, **kwargs):
        raise AssertionError("planning downloaded a whole object")

    monkeypatch.setattr(storage, "read_parquet", spying_read)
    monkeypatch.setattr(storage, "read_bytes", refuse_whole_file)
    original_read_table = pq.read_table

    def no_vectors(source, *args, columns=None, **kwargs):
        assert columns is not None and "embedding" not in columns, columns
        return original_read_table(source, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", no_vectors)

    plan = replan(job, listing)

    assert plan.shards == [] and plan.cached == 12 and plan.known_failures == 3
    assert read_columns == []  # the Delta index and a listing of shard sizes were enough
    assert all("embedding" not in (columns or ["embedding"]) for _, columns in read_columns)


def test_a_shard_written_just_before_a_crash_is_adopted_not_embedded_again(embedded_output):
    job, listing, plan = embedded_output
    # A crash after the shard file, before its index rows: drop the index to that state.
    import shutil

    shutil.rmtree(embedding.index_uri(job))

    assert embedding.embedding_index(job).num_rows == 12
    assert replan(job, listing).shards == []
    assert embedding.embedding_index(job).num_rows == 12  # adopted into the index for good


@pytest.mark.parametrize("damage", ["empty", "torn"])
def test_a_broken_shard_is_moved_aside_and_its_images_embedded_again(embedded_output, damage):
    job, listing, plan = embedded_output
    url = layout.shard_uri(job.output, job.model, plan.shards[0].shard_id)
    path = storage.url_to_fs(url)[1]
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(b"" if damage == "empty" else data[:100])

    assert embedding.embedding_index(job).num_rows == 8  # the broken shard's rows no longer count
    again = replan(job, listing)
    assert [s.uris for s in again.shards] == [plan.shards[0].uris]
    result = embedding.embed_shard(again.shards[0], job)
    assert not result.cached and result.embedded == 4
    shard_files = storage.list_files(layout.embedding_dir(job.output, job.model))
    assert len([url for url in shard_files if ".broken-" in url]) == 1
    assert embedding.embedding_index(job).num_rows == 12


def test_every_stage_runs_on_the_device_given(embedded_output, monkeypatch):
    """--device cpu keeps learning and prediction on the CPU even where CUDA looks available."""
    from inmap import learning, prediction

    job, listing, _ = embedded_output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import inmap.proxy as proxy_module

    devices = []
    real_device = proxy_module._device

    def spy(device):
        devices.append(str(real_device(device)))
        return real_device(device)

    monkeypatch.setattr(proxy_module, "_device", spy)
    index = embedding.embedding_index(job)
    choice = learning.vision_proxy(listing, index, 12, job.for_partition(job.source, "run-2"))
    todo = prediction.plan_predictions(listing, index, prediction.done_predictions(job))
    prediction.predict_shard(todo[0], choice.proxy, job)

    assert job.fit.device == "cpu" and devices and set(devices) == {"cpu"}


def test_an_image_in_two_shards_is_planned_learned_and_predicted_once(embedded_output):
    """Two shards can hold one image (runs before the lease, a stalled run that was taken
    over); the index keeps both rows, and everything downstream takes the image once."""
    from inmap import learning, prediction

    job, listing, plan = embedded_output
    first = layout.shard_uri(job.output, job.model, plan.shards[0].shard_id)
    copy = layout.shard_uri(job.output, job.model, "f" * 24)
    storage.write_bytes_atomic(storage.read_bytes(first, job.options), copy, job.options)
    index = embedding.embedding_index(job)  # adopts the copy
    assert index.num_rows == 12 + len(plan.shards[0].uris)

    todo = prediction.plan_predictions(listing, index, prediction.done_predictions(job))
    planned = [uri for part in todo for uri in part.wanted["uri"].to_pylist()]
    assert len(planned) == len(set(planned)) == 12
    rows, archive = learning.training_rows(index, job, listing)
    assert archive == rows.num_rows == len(set(rows["uri"].to_pylist())) == 12


def test_a_relative_source_learns_over_its_images_when_only_new_keys_are_listed(
    embedded_output, image_folder, monkeypatch
):
    from dataclasses import replace

    from inmap import learning

    job, listing, _ = embedded_output
    monkeypatch.chdir(image_folder.parent)
    relative = replace(job.with_settings(listing="after-last"), source=image_folder.name)
    rows, archive = learning.training_rows(embedding.embedding_index(relative), relative)
    assert archive == rows.num_rows == 12


def test_a_retried_shard_task_still_reports_the_image_its_first_attempt_could_not_read(
    image_folder, tmp_path
):
    """The first attempt wrote the shard without an unreadable image, then failed (say, while
    indexing); the retry finds the file and must still report the image, so the partition fails
    instead of committing without it."""
    from inmap.batches import Failure
    from inmap.listing import list_images

    job = job_for(image_folder, tmp_path / "out", shard_size=20)
    listing = list_images(str(image_folder)).images
    shard = replan(job, listing).shards[0]
    unread_uri, unread_etag = shard.uris[0], shard.etags[0]  # a good JPEG, its read failed
    first_attempt = embedding.ShardPlan(shard.shard_id, shard.uris[1:], shard.etags[1:], ())
    embedding.embed_shard(first_attempt, job)  # the file, without the image
    failures.record([(unread_uri, unread_etag, Failure("read", "503 SlowDown"))], job)

    retried = embedding.embed_shard(shard, job)
    assert retried.cached and [uri for uri, _ in retried.unreadable] == [unread_uri]


def test_a_read_failure_is_cleared_once_the_image_is_read(image_folder, tmp_path):
    from inmap.batches import Failure
    from inmap.listing import list_images

    job = job_for(image_folder, tmp_path / "out", shard_size=20)
    listing = list_images(str(image_folder)).images
    first_uri, first_etag = listing["uri"][0].as_py(), listing["etag"][0].as_py()
    # An earlier run could not read this image (an outage outlasting the retries).
    failures.record([(first_uri, first_etag, Failure("read", "503 SlowDown"))], job)

    plan = replan(job, listing)
    assert plan.shards[0].retrying == (first_uri,)
    embedding.embed_shard(plan.shards[0], job)

    remaining = failures.known_failures(job)
    assert first_uri not in remaining["uri"].to_pylist()  # read now: no longer an error
    assert set(remaining["stage"].to_pylist()) == {"decode"}  # the 3 broken files stay
