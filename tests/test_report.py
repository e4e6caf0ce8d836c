"""The run summary: warnings from the predictions, and one declared shape for every view."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from inmap.report import RunSummary, prediction_statistics
from inmap.schemas import PREDICTIONS_SCHEMA, RUNS_SCHEMA


def predictions(class_ids: list[int], zero_shot_ids: list[int]) -> pa.Table:
    n = len(class_ids)
    labels = ["cat", "dog"]
    return pa.table(
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
            "predicted_at": [datetime.now(timezone.utc)] * n,
            "labelset": ["l"] * n,
            "unknown_score": pa.nulls(n, pa.float32()),
            "is_unknown": pa.nulls(n, pa.bool_()),
        },
        schema=PREDICTIONS_SCHEMA,
    )


def test_run_warns_when_the_proxy_overrules_confident_zero_shot():
    agree = predictions([0] * 50 + [1] * 50, [0] * 50 + [1] * 50)
    histogram, changed, warnings = prediction_statistics([agree, agree.slice(0, 0)])
    assert histogram == {"cat": 50, "dog": 50} and changed == 0 and warnings == []
    overruled = predictions([1] * 100, [0] * 50 + [1] * 50)
    histogram, changed, warnings = prediction_statistics([overruled])
    assert changed == 50
    assert len(warnings) == 1 and "50 of 100" in warnings[0]


def test_summary_is_one_runs_row_and_a_markdown_report():
    summary = RunSummary(
        run_id="r1",
        source="s3://b/drops",
        output="s3://b/out",
        labelset="ls",
        model="ViT-B-32",
        pretrained="openai",
        weights_id="hf:x@abc",
        started_at=datetime.now(timezone.utc),
        listed=5,
        predicted=4,
        proxy_id="p1",
        proxy_learned=False,
        proxy_reason="within 10%",
        warnings=["careful"],
        stage_seconds={"list": 0.5},
    )
    row = summary.row()
    assert row.schema.equals(RUNS_SCHEMA) and row.num_rows == 1
    assert row["predicted"][0].as_py() == 4 and row["warnings"][0].as_py() == ["careful"]
    text = summary.markdown()
    assert "Vision proxy `p1` reused: within 10%." in text and "**Warning:** careful" in text
    assert summary.line().startswith("s3://b/drops: 4 predicted")


def test_the_labels_table_shows_every_uri_whole_however_long():
    """A table goes to a terminal, a file or a pipe: a long key is never cut or wrapped."""
    import pyarrow as pa

    from inmap.results import labels_text

    long = "s3://bucket/" + "/".join(f"drop [{n}] with a long folder name" for n in range(8))
    uris = [f"{long}/image-{n}.jpg" for n in range(2)] + ["short.jpg"]
    table = pa.Table.from_pylist([
        {"uri": uri, "label": "dog", "score": 0.9, "zero_shot_label": "cat",
         "zero_shot_score": 0.5} for uri in uris
    ])  # fmt: skip
    lines = labels_text(table).splitlines()
    assert len(lines) == 1 + len(uris) + 1  # head, one line per image, the count
    for uri, line in zip(uris, lines[1:], strict=False):
        assert line.startswith(uri + " ") and line.split()[-4:] == ["dog", "0.900", "cat", "0.500"]
    assert all(line == line.rstrip() for line in lines)
    # A line break in a key (S3 allows one) is shown escaped: still one line per image.
    table = table.set_column(0, "uri", pa.array(["odd\nkey.jpg", "b.jpg", "c.jpg"]))
    lines = labels_text(table).splitlines()
    assert len(lines) == 5 and lines[1].startswith("odd\\nkey.jpg ")
