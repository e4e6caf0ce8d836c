"""The pipeline stages without Prefect: classes, planning, commit visibility."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from inmap import pipeline
from inmap.pipeline import ClassesError, ModelSpec
from inmap.schemas import MANIFEST_SCHEMA

SPEC = ModelSpec("inmap-tiny", None, "cpu")


def manifest(*pairs: tuple[str, str]) -> pa.Table:
    uris, etags = zip(*pairs, strict=True) if pairs else ((), ())
    return pa.table(
        {"uri": list(uris), "etag": list(etags), "size": [1] * len(uris)}, schema=MANIFEST_SCHEMA
    )


def test_classes_from_list_file_and_json(tmp_path):
    text_file = tmp_path / "classes.txt"
    text_file.write_text("cat\ndog\n\n")
    json_file = tmp_path / "classes.json"
    json_file.write_text(json.dumps(["cat", "dog"]))
    assert pipeline.load_classes(["cat", " dog "]) == ["cat", "dog"]
    assert pipeline.load_classes(str(text_file)) == ["cat", "dog"]
    assert pipeline.load_classes(str(json_file)) == ["cat", "dog"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no class names"),
        ("cat\n\ndog\n", "line 2 is empty"),
        ("cat\ndog\nCat\n", "names 'Cat' twice"),
        ("cat\n", "at least 2 classes"),
        ("[1, 2]", "JSON list of strings"),
    ],
)
def test_bad_classes_file_is_named_in_the_error(tmp_path, content, message):
    path = tmp_path / "classes.txt"
    path.write_text(content)
    with pytest.raises(ClassesError, match=message) as error:
        pipeline.load_classes(str(path))
    assert "classes.txt" in str(error.value)


def test_missing_classes_file_is_named(tmp_path):
    with pytest.raises(ClassesError, match="nope.txt does not exist"):
        pipeline.load_classes(str(tmp_path / "nope.txt"))


def test_plan_is_stable_and_skips_embedded_and_failed_images():
    listed = manifest(*[(f"s3://b/{i:03d}.jpg", f"e{i}") for i in range(10)])
    embedded = manifest(("s3://b/000.jpg", "e0"), ("s3://b/001.jpg", "OLD-ETAG"))
    failed = manifest(("s3://b/002.jpg", "e2"))
    plans = pipeline.plan_shards(listed, embedded, failed, SPEC, "pre", shard_size=4)
    planned = [uri for plan in plans for uri in plan.uris]
    # 000 is embedded; 001 changed since it was embedded; 002 is a known decode failure.
    assert planned == [f"s3://b/{i:03d}.jpg" for i in [1, 3, 4, 5, 6, 7, 8, 9]]
    assert [len(plan.uris) for plan in plans] == [4, 4]
    again = pipeline.plan_shards(listed, embedded, failed, SPEC, "pre", shard_size=4)
    assert [p.shard_id for p in again] == [p.shard_id for p in plans]
    other_model = pipeline.plan_shards(
        listed, embedded, failed, ModelSpec("ViT-B-32", "openai"), "pre", shard_size=4
    )
    assert {p.shard_id for p in other_model}.isdisjoint(p.shard_id for p in plans)


def test_labelset_changes_with_classes_model_and_templates():
    base = pipeline.labelset_id(["cat", "dog"], SPEC, "paper")
    assert base == pipeline.labelset_id(["cat", "dog"], SPEC, "paper")
    assert base != pipeline.labelset_id(["cat", "dog", "cow"], SPEC, "paper")
    assert base != pipeline.labelset_id(["cat", "dog"], SPEC, "openai")
    assert base != pipeline.labelset_id(["cat", "dog"], ModelSpec("ViT-B-32", "openai"), "paper")


def test_uncommitted_predictions_are_invisible(tmp_path):
    output = str(tmp_path)
    part = pipeline.storage.join(pipeline.staging_dir(output, "run1"), "part-a.parquet")
    table = pipeline.PREDICTIONS_SCHEMA.empty_table()
    pipeline.storage.write_parquet_atomic(table, part)
    # Staged, not committed: nothing under predictions/ is readable as committed.
    assert len(pipeline.committed_predictions(output)) == 0
    summary_uri = pipeline.commit_run(output, "run1", "ls1", [part], {"counts": {}})
    assert json.loads(Path(summary_uri).read_text())["run_id"] == "run1"
    assert (tmp_path / "predictions" / "ls1" / "run1" / "part-a.parquet").exists()
    assert not (tmp_path / "_staging" / "run1" / "part-a.parquet").exists()


def staged_part(tmp_path, name: str, class_ids: list[int], zero_shot_ids: list[int]) -> str:
    n = len(class_ids)
    labels = ["cat", "dog"]
    table = pa.table(
        {
            "uri": [f"u{i}" for i in range(n)],
            "etag": ["e"] * n,
            "label": [labels[i] for i in class_ids],
            "class_id": pa.array(class_ids, pa.int32()),
            "score": pa.array([0.9] * n, pa.float32()),
            "zero_shot_label": [labels[i] for i in zero_shot_ids],
            "zero_shot_class_id": pa.array(zero_shot_ids, pa.int32()),
            "zero_shot_score": pa.array([0.99] * n, pa.float32()),
            "top_k_labels": [[labels[i]] for i in class_ids],
            "top_k_class_ids": [[i] for i in class_ids],
            "top_k_scores": [[0.9]] * n,
            "run_id": ["r"] * n,
            "model": ["m"] * n,
            "pretrained": ["p"] * n,
            "proxy_id": ["x"] * n,
            "labelset": ["l"] * n,
        },
        schema=pipeline.PREDICTIONS_SCHEMA,
    )
    uri = str(tmp_path / name)
    pipeline.storage.write_parquet_atomic(table, uri)
    return uri


def test_run_warns_when_the_proxy_overrules_confident_zero_shot(tmp_path):
    agree = staged_part(tmp_path, "agree.parquet", [0] * 50 + [1] * 50, [0] * 50 + [1] * 50)
    histogram, changed, warnings = pipeline.staged_statistics([agree, None])
    assert histogram == {"cat": 50, "dog": 50} and changed == 0 and warnings == []
    overruled = staged_part(tmp_path, "overruled.parquet", [1] * 100, [0] * 50 + [1] * 50)
    histogram, changed, warnings = pipeline.staged_statistics([overruled])
    assert changed == 50
    assert len(warnings) == 1
