"""The flow end to end against a real S3 protocol endpoint (moto server + s3fs)."""

from __future__ import annotations

import io

import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs

from flows.inmap_flow import inmap_flow
from inmap import pipeline

pytestmark = pytest.mark.usefixtures("prefect_harness")


def upload_drop(fs: s3fs.S3FileSystem, bucket: str, sample_images, count: int) -> None:
    for path in sample_images[:count]:
        fs.pipe(f"{bucket}/drops/2026-11-28/{path.name}", path.read_bytes())
    fs.pipe(f"{bucket}/drops/2026-11-28/truncated.jpeg", sample_images[0].read_bytes()[:3000])
    fs.pipe(f"{bucket}/drops/2026-11-28/empty.jpg", b"")
    fs.pipe(f"{bucket}/drops/2026-11-28/text.jpg", b"hello, not an image")
    fs.pipe(f"{bucket}/classes.txt", b"tench\ngoldfish\nshark\nbird\nfrog\n")


def test_s3_run_writes_predictions_and_errors_back_to_the_bucket(
    s3_bucket, s3_storage_options, sample_images
):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage_options)
    upload_drop(fs, s3_bucket, sample_images, 10)
    params = {
        "source": f"s3://{s3_bucket}/drops",
        "classes": f"s3://{s3_bucket}/classes.txt",
        "output": f"s3://{s3_bucket}/inmap",
        "model": "inmap-tiny",
        "pretrained": None,
        "device": "cpu",
        "shard_size": 4,
        "storage_options": s3_storage_options,
    }
    [summary] = inmap_flow(**params)
    assert summary["counts"]["embedded"] == 10
    assert summary["counts"]["failed"] == 3
    fs.invalidate_cache()
    parts = fs.glob(f"{s3_bucket}/inmap/predictions/*/*/*.parquet")
    predictions = pl.concat([pl.read_parquet(io.BytesIO(fs.cat(part))) for part in parts])
    assert predictions.height == 10
    assert predictions["uri"].str.starts_with(f"s3://{s3_bucket}/drops/").all()
    errors = pq.read_table(
        f"{s3_bucket}/inmap/errors", filesystem=fs, columns=["uri", "error"]
    ).to_pylist()
    assert sorted(row["uri"].rsplit("/", 1)[1] for row in errors) == [
        "empty.jpg",
        "text.jpg",
        "truncated.jpeg",
    ]
    # Source objects are never modified.
    assert fs.cat(f"{s3_bucket}/drops/2026-11-28/empty.jpg") == b""

    # A rerun embeds nothing again; a changed object is re-embedded and relabelled.
    [again] = inmap_flow(**params)
    assert again["counts"]["embedded"] == 0 and again["counts"]["predicted"] == 0
    fs.pipe(f"{s3_bucket}/drops/2026-11-28/{sample_images[0].name}", sample_images[1].read_bytes())
    [changed] = inmap_flow(**params)
    assert changed["counts"]["embedded"] == 1 and changed["counts"]["predicted"] == 1
    committed = pipeline.committed_predictions(params["output"], storage_options=s3_storage_options)
    assert committed.num_rows == 11
