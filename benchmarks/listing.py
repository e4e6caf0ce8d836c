"""List and plan a large S3 source without per-object Prefect tasks; print time and peak memory.

    python benchmarks/listing.py --objects 100000

Starts a moto S3 server in a child process (so its own memory is not counted), fills a bucket with
small objects, then times `inmap.listing.list_images` in this process at
several sizes. Peak memory is tracemalloc's (Python objects) plus pyarrow's allocator, as a delta
over the process before listing, so the growth per object can be compared with the manifest's own
size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import pyarrow as pa
import s3fs
from embed import start_moto  # benchmarks run as scripts: this folder is on sys.path

from inmap.listing import list_images


def fill(fs: s3fs.S3FileSystem, bucket: str, start: int, stop: int) -> None:
    """Objects spread over date-partitioned prefixes, as drops usually are."""
    batch = 2000
    for first in range(start, stop, batch):
        fs.pipe(
            {
                f"{bucket}/drops/day={i % 30:02d}/img-{i:07d}.jpg": b"x"
                for i in range(first, min(first + batch, stop))
            }
        )


def measure(source: str, options: dict) -> dict[str, float]:
    tracemalloc.start()
    arrow_before = pa.total_allocated_bytes()
    started = time.perf_counter()
    manifest = list_images(source, options).images
    listed = time.perf_counter()
    plans = range(0, len(manifest), 2000)
    planned = time.perf_counter()
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "objects": len(manifest),
        "shards": len(plans),
        "list_s": listed - started,
        "plan_s": planned - listed,
        "peak_mib": (python_peak + pa.total_allocated_bytes() - arrow_before) / 2**20,
        "manifest_mib": manifest.nbytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    server, endpoint = start_moto()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    options = {"endpoint_url": endpoint}
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.mkdir("bench")
        sizes = sorted({args.objects // 10, args.objects // 2, args.objects})
        done = 0
        print(
            f"{'objects':>8} {'shards':>6} {'list s':>7} {'plan s':>7} "
            f"{'peak MiB':>9} {'manifest MiB':>13} {'peak/object':>12}"
        )
        for size in sizes:
            started = time.perf_counter()
            fill(fs, "bench", done, size)
            done = size
            print(
                f"# filled to {size} objects in {time.perf_counter() - started:.0f}s",
                file=sys.stderr,
            )
            row = measure("s3://bench/drops", options)
            print(
                f"{row['objects']:>8} {row['shards']:>6} {row['list_s']:>7.2f} "
                f"{row['plan_s']:>7.2f} {row['peak_mib']:>9.1f} {row['manifest_mib']:>13.1f} "
                f"{row['peak_mib'] * 2**20 / max(row['objects'], 1):>10.0f} B"
            )
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
