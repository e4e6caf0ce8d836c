"""The `inmap` flow end to end on local folders, under a temporary Prefect server."""

from __future__ import annotations

import shutil

import duckdb
import pandas as pd
import polars as pl
import pytest

from flows.inmap_flow import inmap_flow
from inmap import pipeline, storage
from inmap.pipeline import ClassesError, ModelSpec

pytestmark = pytest.mark.usefixtures("prefect_harness")

CLASSES = ["fish", "bird", "dog", "car", "food"]
TINY = {"model": "inmap-tiny", "pretrained": None, "device": "cpu", "shard_size": 5}


def run(source, output, **overrides):
    source = [str(s) for s in source] if isinstance(source, list) else str(source)
    params = {**TINY, "source": source, "classes": CLASSES, "output": str(output)}
    return inmap_flow(**{**params, **overrides})


def embedding_files(output):
    return sorted(output.glob("embeddings/*/*.parquet"))


def test_run_labels_every_image_and_records_every_failure(image_folder, tmp_path):
    output = tmp_path / "out"
    [summary] = run(image_folder, output)
    assert summary["counts"] == {
        "listed": 15,
        "cached": 0,
        "embedded": 12,
        "failed": 3,
        "predicted": 12,
    }
    predictions = pl.read_parquet(output / "predictions" / "**" / "*.parquet")
    assert predictions.height == 12
    assert set(predictions["label"]) <= set(CLASSES)
    assert predictions["top_k_labels"].list.len().to_list() == [5] * 12
    assert predictions["score"].is_between(0, 1).all()
    errors = pl.read_parquet(output / "errors" / "*.parquet")
    assert sorted(errors["uri"].str.split("/").list.last()) == [
        "empty.JPG",
        "notes.jpg",
        "truncated.jpg",
    ]
    assert errors["error"].str.len_chars().min() > 0
    # The same files open in pandas and duckdb.
    assert len(pd.read_parquet(output / "predictions")) == 12
    glob = str(output / "predictions" / "**" / "*.parquet")
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall() == [(12,)]
    assert not list((output / "_staging").rglob("*.parquet"))


def test_second_run_recomputes_no_embedding(image_folder, tmp_path):
    output = tmp_path / "out"
    run(image_folder, output)
    before = {path: path.stat().st_mtime_ns for path in embedding_files(output)}
    [summary] = run(image_folder, output)
    assert summary["counts"]["embedded"] == 0
    assert summary["counts"]["cached"] == 12
    assert summary["counts"]["predicted"] == 0  # nothing new to label, nothing rewritten
    assert {path: path.stat().st_mtime_ns for path in embedding_files(output)} == before


def test_new_drop_embeds_and_labels_only_new_images(image_folder, tmp_path, sample_images):
    output = tmp_path / "out"
    run(image_folder, output)
    first_parts = {p: p.read_bytes() for p in output.glob("predictions/*/*/*.parquet")}
    for path in sample_images[500:503]:
        shutil.copy(path, image_folder / path.name)
    [summary] = run(image_folder, output)
    assert summary["counts"]["embedded"] == 3
    assert summary["counts"]["predicted"] == 3
    assert {p: p.read_bytes() for p in first_parts} == first_parts  # never rewritten
    committed = pipeline.committed_predictions(str(output))
    assert committed.num_rows == 15
    assert len(set(committed["uri"].to_pylist())) == 15


def test_new_classes_relabel_everything_from_cached_embeddings(image_folder, tmp_path):
    output = tmp_path / "out"
    run(image_folder, output)
    [summary] = run(image_folder, output, classes=["cat", "tree", "boat"])
    assert summary["counts"]["embedded"] == 0
    assert summary["counts"]["predicted"] == 12


def test_empty_source_completes_with_zero_predictions(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "empty", tmp_path / "missing"):
        [summary] = run(source, tmp_path / "out")
        assert summary["counts"]["listed"] == 0
        assert summary["counts"]["predicted"] == 0
        assert "No image needed a prediction" in pipeline.summary_markdown(summary)


def test_backfill_partitions_commit_independently(image_folder, tmp_path):
    output = tmp_path / "out"
    summaries = run([image_folder / "a", image_folder / "b"], output)
    assert [s["counts"]["predicted"] for s in summaries] == [6, 6]
    assert len({s["summary_uri"] for s in summaries}) == 2
    assert pipeline.committed_predictions(str(output)).num_rows == 12


def test_unwritable_output_fails_before_any_work(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(storage.StorageError, match="a-file"):
        run(image_folder, blocker / "out")


def test_duplicate_classes_fail_with_a_clear_message(image_folder, tmp_path):
    with pytest.raises(pipeline.ClassesError, match="twice"):
        run(image_folder, tmp_path / "out", classes=["cat", "dog", "cat"])


def test_proxy_artifact_records_pseudo_label_statistics(image_folder, tmp_path):
    output = tmp_path / "out"
    [summary] = run(image_folder, output)
    proxy = pipeline.load_proxy(str(output / "proxies" / f"{summary['proxy_id']}.parquet"))
    table = pl.read_parquet(output / "proxies" / "*.parquet")
    assert table["class_name"].to_list() == CLASSES
    assert abs(table["pseudo_label_mass"].sum() - 1) < 1e-4
    assert table["predicted_count"].sum() == 12
    assert proxy.vision_proxy.shape == proxy.text_proxy.shape
    assert 0 <= proxy.stats["zero_shot_agreement"] <= 1
    assert ModelSpec("inmap-tiny", None).key in str(embedding_files(output)[0])


def test_unknown_model_fails_with_close_matches(image_folder, tmp_path):
    from inmap.encoder import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="ViT-B-32"):
        run(image_folder, tmp_path / "out", model="ViT-B-23")


def test_input_mistakes_are_not_retried_but_storage_failures_are():
    from prefect.states import Failed

    from inmap.encoder import ModelNotFoundError, WeightsUnavailableError
    from tasks.stages import is_transient

    for mistake in (ModelNotFoundError("m"), WeightsUnavailableError("w"), ClassesError("c")):
        assert not is_transient(None, None, Failed(data=mistake))
    assert is_transient(None, None, Failed(data=OSError("connection reset")))
    assert is_transient(None, None, Failed(data=storage.StorageError("s3://b: timed out")))
