"""The `inmap` flow end to end on local folders, under a temporary Prefect server."""

from __future__ import annotations

import shutil

import duckdb
import polars as pl
import pytest
from deltalake import DeltaTable

from flows.inmap_flow import inmap_flow
from inmap import storage
from inmap.errors import ClassesError, ModelNotFoundError, SourceNotFoundError
from inmap.learning import load_proxy
from inmap.model import TINY_MODEL, resolve_model
from tests.conftest import one_row_per_image, read_delta

pytestmark = pytest.mark.usefixtures("prefect_harness")

CLASSES = ["fish", "bird", "dog", "car", "food"]
TINY = {"model": TINY_MODEL, "pretrained": None, "device": "cpu", "shard_size": 5}


def run(source, output, **overrides):
    source = [str(s) for s in source] if isinstance(source, list) else str(source)
    params = {**TINY, "source": source, "classes": CLASSES, "output": str(output)}
    return inmap_flow(**{**params, **overrides})


def embedding_files(output):
    return sorted(output.glob("embeddings/*/*.parquet"))


def test_run_labels_every_image_and_records_every_failure(image_folder, tmp_path):
    output = tmp_path / "out"
    [summary] = run(image_folder, output)
    assert (summary.listed, summary.cached, summary.embedded, summary.failed) == (15, 0, 12, 3)
    assert summary.predicted == 12 and summary.proxy_learned
    predictions = read_delta(output / "predictions")
    assert predictions.height == 12 and one_row_per_image(predictions)
    assert set(predictions["label"]) <= set(CLASSES)
    assert predictions["top_k_labels"].list.len().to_list() == [5] * 12
    assert predictions["score"].is_between(0, 1).all()
    errors = read_delta(output / "errors")
    assert sorted(errors["uri"].str.split("/").list.last()) == [
        "empty.JPG",
        "notes.jpg",
        "truncated.jpg",
    ]
    assert set(errors["stage"]) == {"decode"} and errors["error"].str.len_chars().min() > 0
    # The same table opens in pandas and in duckdb (its current version, through Arrow: the
    # README's offline way, which also reads a path that needs URL escaping).
    assert len(DeltaTable(str(output / "predictions")).to_pandas()) == 12
    current = DeltaTable(str(output / "predictions")).to_pyarrow_dataset()  # noqa: F841 (duckdb)
    assert duckdb.sql("select count(*), count(distinct uri) from current").fetchall() == [(12, 12)]
    runs = read_delta(output / "runs")
    assert runs["status"].to_list() == ["completed"] and runs["predicted"].to_list() == [12]


def test_second_run_recomputes_no_embedding_and_reuses_the_proxy(image_folder, tmp_path):
    output = tmp_path / "out"
    run(image_folder, output)
    before = {path: path.stat().st_mtime_ns for path in embedding_files(output)}
    [summary] = run(image_folder, output)
    assert (summary.embedded, summary.cached, summary.predicted) == (0, 12, 0)
    assert {path: path.stat().st_mtime_ns for path in embedding_files(output)} == before
    assert read_delta(output / "predictions").height == 12


def test_new_drop_embeds_and_labels_only_new_images(image_folder, tmp_path, real_images):
    output = tmp_path / "out"
    [first] = run(image_folder, output)
    committed = read_delta(output / "predictions")
    for path in real_images[1:4]:  # not among image_folder's, which are evenly spaced from 0
        shutil.copy(path, image_folder / path.name)
    [summary] = run(image_folder, output)
    assert summary.embedded == 3 and summary.predicted == 3
    # 3 new images on 12 is more than 10%: relearned; earlier rows never rewritten.
    assert summary.proxy_learned and "grew" in summary.proxy_reason
    predictions = read_delta(output / "predictions")
    assert predictions.height == 15 and one_row_per_image(predictions)
    assert (
        predictions.join(committed, on=["uri", "etag"])
        .filter(pl.col("run_id") != pl.col("run_id_right"))
        .is_empty()
    )
    assert first.proxy_id != summary.proxy_id


def test_new_classes_relabel_everything_from_cached_embeddings(image_folder, tmp_path):
    output = tmp_path / "out"
    run(image_folder, output)
    [summary] = run(image_folder, output, classes=["cat", "tree", "boat"])
    assert summary.embedded == 0 and summary.predicted == 12
    assert read_delta(output / "predictions")["labelset"].n_unique() == 2


def test_empty_source_completes_with_zero_predictions(tmp_path):
    (tmp_path / "empty").mkdir()
    [summary] = run(tmp_path / "empty", tmp_path / "out")
    assert summary.listed == 0 and summary.predicted == 0
    assert "No image needed a prediction" in summary.markdown()


def test_missing_source_is_a_mistake_not_an_empty_run(tmp_path):
    with pytest.raises(SourceNotFoundError, match="drops-typo does not exist"):
        run(tmp_path / "drops-typo", tmp_path / "out")
    assert not (tmp_path / "out" / "predictions").exists()


def test_backfill_partitions_commit_independently(image_folder, tmp_path):
    output = tmp_path / "out"
    summaries = run([image_folder / "a", image_folder / "b"], output)
    assert [s.predicted for s in summaries] == [6, 6]
    assert len({s.run_id for s in summaries}) == 2
    assert read_delta(output / "predictions").height == 12


def test_unwritable_output_fails_naming_it(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(storage.StorageError, match="a-file"):
        run(image_folder, blocker / "out")


def test_duplicate_classes_fail_with_a_clear_message(image_folder, tmp_path):
    with pytest.raises(ClassesError, match="twice"):
        run(image_folder, tmp_path / "out", classes=["cat", "dog", "cat"])


def test_proxy_artifact_records_pseudo_label_statistics(image_folder, tmp_path):
    output = tmp_path / "out"
    [summary] = run(image_folder, output)
    proxy = load_proxy(str(output / "proxies" / f"{summary.proxy_id}.parquet"))
    table = pl.read_parquet(output / "proxies" / f"{summary.proxy_id}.parquet")
    assert table["class_name"].to_list() == CLASSES
    assert abs(table["pseudo_label_mass"].sum() - 1) < 1e-4
    assert table["predicted_count"].sum() == 12
    assert proxy.vision_proxy.shape == proxy.text_proxy.shape
    assert 0 <= proxy.stats["zero_shot_agreement"] <= 1
    assert proxy.stats["refined_by"].startswith("adaptive: ")
    assert resolve_model(TINY_MODEL, None, "cpu").key in str(embedding_files(output)[0])


def test_unknown_model_fails_with_close_matches(image_folder, tmp_path):
    with pytest.raises(ModelNotFoundError, match="ViT-B-32"):
        run(image_folder, tmp_path / "out", model="ViT-B-23")


def test_input_mistakes_are_not_retried_but_storage_failures_are():
    from prefect.states import Failed

    from inmap.errors import (
        OutputBusyError,
        UnreadableImagesError,
        WeightsUnavailableError,
    )
    from tasks.stages import is_transient

    never = (
        ModelNotFoundError("m"),
        WeightsUnavailableError("w"),
        ClassesError("c"),
        SourceNotFoundError("s"),
        UnreadableImagesError("u"),
        OutputBusyError("b"),
    )
    for mistake in never:
        assert not is_transient(None, None, Failed(data=mistake))
    assert is_transient(None, None, Failed(data=OSError("connection reset")))
    assert is_transient(None, None, Failed(data=storage.Transient("s3://b: timed out")))
    assert not is_transient(None, None, Failed(data=storage.NotFound("s3://b/x: not found")))


def test_relearn_policies(image_folder, tmp_path, real_images):
    output = tmp_path / "out"
    [first] = run(image_folder, output)
    shutil.copy(real_images[5], image_folder / real_images[5].name)  # 1 new on 12
    [grown] = run(image_folder, output)
    assert not grown.proxy_learned and grown.proxy_id == first.proxy_id
    assert "within 10%" in grown.proxy_reason
    shutil.copy(real_images[6], image_folder / real_images[6].name)
    [always] = run(image_folder, output, relearn="always")
    assert always.proxy_learned and always.proxy_id != first.proxy_id
    rows = read_delta(output / "predictions").sort("predicted_at")
    assert rows["proxy_id"].to_list()[-2:] == [first.proxy_id, always.proxy_id]


def test_a_run_whose_lease_is_taken_over_stops_and_is_not_recorded_completed(
    image_folder, tmp_path, monkeypatch
):
    """It stalls past its expiry (simulated: another run's newer lease appears while its shard
    embeds), then must stop at its next stage and not say "completed" — even when it has nothing
    to commit (here the only new file is not an image)."""
    import json
    import time

    from inmap import embedding
    from inmap.errors import OutputBusyError

    output = tmp_path / "out"
    embed = embedding.embed_shard

    def stalled_then_taken_over(plan, job, on_progress=None):
        later = output / "_lease" / "000000000099.json"
        if not later.exists():
            record = {"run_id": "later", "host": "h", "pid": 1, "started": time.time(),
                      "expires": time.time() + 600}  # fmt: skip
            later.write_text(json.dumps(record))
        return embed(plan, job, on_progress)

    run(image_folder, output, shard_size=20)
    (image_folder / "new.jpg").write_text("not an image either")
    monkeypatch.setattr(embedding, "embed_shard", stalled_then_taken_over)
    with pytest.raises(OutputBusyError, match="taken over by another run"):
        run(image_folder, output, shard_size=20)
    assert read_delta(output / "runs")["status"].to_list().count("completed") == 1  # the first
