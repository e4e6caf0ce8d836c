"""The flow end to end against a real S3 protocol endpoint (moto server + s3fs + delta-rs)."""

from __future__ import annotations

import polars as pl
import pytest
import s3fs

from flows.inmap_flow import inmap_flow
from tests.conftest import one_row_per_image, read_delta

pytestmark = pytest.mark.usefixtures("prefect_harness")


def upload_drop(fs: s3fs.S3FileSystem, bucket: str, real_images, count: int) -> None:
    for path in real_images[:count]:
        fs.pipe(f"{bucket}/drops/2026-11-28/{path.name}", path.read_bytes())
    fs.pipe(f"{bucket}/drops/2026-11-28/truncated.jpeg", real_images[0].read_bytes()[:3000])
    fs.pipe(f"{bucket}/drops/2026-11-28/empty.jpg", b"")
    fs.pipe(f"{bucket}/drops/2026-11-28/text.jpg", b"hello, not an image")
    fs.pipe(f"{bucket}/classes.txt", b"tench\ngoldfish\nshark\nbird\nfrog\n")


def test_s3_run_writes_predictions_and_errors_back_to_the_bucket(
    s3_bucket, s3_endpoint_options, real_images, s3_credentials_in_env
):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint_options)
    upload_drop(fs, s3_bucket, real_images, 10)
    params = {
        "source": f"s3://{s3_bucket}/drops",
        "classes": f"s3://{s3_bucket}/classes.txt",
        "output": f"s3://{s3_bucket}/inmap",
        "model": "inmap-tiny",
        "pretrained": None,
        "device": "cpu",
        "shard_size": 4,
        "storage_options": s3_endpoint_options,  # no secret: the keys come from the environment
    }
    [summary] = inmap_flow(**params)
    assert (summary.embedded, summary.failed, summary.predicted) == (10, 3, 10)
    output = params["output"]
    predictions = read_delta(f"{output}/predictions", s3_endpoint_options)
    assert predictions.height == 10 and one_row_per_image(predictions)
    assert predictions["uri"].str.starts_with(f"s3://{s3_bucket}/drops/").all()
    errors = read_delta(f"{output}/errors", s3_endpoint_options)
    assert sorted(errors["uri"].str.split("/").list.last()) == [
        "empty.jpg",
        "text.jpg",
        "truncated.jpeg",
    ]
    # Source objects are never modified.
    assert fs.cat(f"{s3_bucket}/drops/2026-11-28/empty.jpg") == b""

    # A rerun embeds nothing again; a changed object is re-embedded and relabelled.
    [again] = inmap_flow(**params)
    assert (again.embedded, again.predicted) == (0, 0)
    fs.pipe(f"{s3_bucket}/drops/2026-11-28/{real_images[0].name}", real_images[1].read_bytes())
    [changed] = inmap_flow(**params)
    assert (changed.embedded, changed.predicted) == (1, 1)
    predictions = read_delta(f"{output}/predictions", s3_endpoint_options)
    assert predictions.height == 11 and one_row_per_image(predictions)
    assert predictions.filter(pl.col("uri").str.ends_with(real_images[0].name)).height == 2
