"""A scheduled tick over a large archive: what a run costs when nothing, or 1%, is new.

    python benchmarks/tick.py                          # 1k, 10k, 100k images on moto S3, 512-d
    python benchmarks/tick.py --sizes 10000 --dim 768
    python benchmarks/tick.py --sizes 1000000 --backend local   # 1M on local disk (slow setup)

For each size N it builds, in a fresh bucket pair of a moto S3 server (a child process):

- the source: N tiny objects ``s3://src-N/drops/day=DD/img-NNNNNNN.jpg`` over 30 date prefixes,
  each holding its own number (so ETags differ), put through moto's backend for speed;
- the archive under ``s3://out-N/out``, as inmap's runs would have left it, written with inmap's
  own functions: embedding shards of 2000 images (`plan_embedding` names them; `--dim`-d float16
  unit vectors, random, in `embedding_schema`, with the encoder's metadata), each indexed by
  `embed_shard` (which finds the file and indexes it: one `_index` commit per shard, as a run
  does); predictions for every image, committed by `commit_predictions` in drops of
  `--drop-images`; a runs row (`record_run`) naming a vision proxy.
- the proxy is written by `learn_proxy` (on 2000 random 64-d vectors, inmap-tiny's width; its
  content does not change a tick's cost), then its stats are set to say it was learned on the N
  archived images, as a run over the archive would have recorded, so that `relearn="grown"`
  reuses it.

Nothing in a no-op tick reads a vector, so the archive's vectors can be 512-d (or `--dim`) while
the model is `inmap-tiny` (64-d, random weights): the new images of the 1%-new tick are embedded
for real by it (ImageNet JPEGs from ../shared/data/imagenet-sample), and predicted with the 64-d
proxy. Then it times, calling inmap's functions as tasks/stages.py does (no Prefect):

- no-op tick (inmap): the stages of one partition up to the decision that nothing is new, as
  flows/inmap_flow.py runs them, then the runs row it records;
- no-op tick (old): the same decisions the way inmap made them before the embedding index and the
  predictions table (``git show 2476497:inmap/pipeline.py``): ``fs.find`` listing, every shard
  downloaded whole for its uri and etag columns (``fs.cat_file`` then ``pq.read_table``, as the
  old ``storage.read_table``), the predictions read whole file by file; same process, same store;
- 1%-new tick (inmap): N/100 new JPEGs under a new date prefix; list, plan, embed them, index,
  plan predictions, choose the proxy (must be reused), predict, commit, record the run;
- no-op tick (inmap) again after `inmap maintain` (`inmap.maintenance.maintain`: every Delta
  table compacted, checkpointed and vacuumed), as a scheduled maintenance would leave it.

Listing dominates the ticks' time on moto, which lists about 2,500 keys a second on this machine
(CPU-bound, one process); a real S3 bucket lists 100k keys in ~100 pages of 1000, ~16 at a time
(see benchmarks/listing.py), so the tables also give the seconds without listing.

Requests and bytes are counted by tests/faults.py's FaultProxy (faults off) in a child process
between inmap and moto, per bucket: "output" is ``out-N`` (the archive), "source" ``src-N``.
Peak memory is the resident high-water mark (VmHWM, reset per stage through
``/proc/self/clear_refs``) above the resident size when the stage started: Arrow, delta-rs and
Python alike; before each stage freed memory is handed back (gc, Arrow's `release_unused`,
`malloc_trim`), though an allocator may still keep some, so a stage can read a little low. A
tick's peak is its highest mark above the resident size when its first stage started. With
``--backend local`` (no moto, for 1M) bytes are this process's ``rchar`` from /proc/self/io
(everything read, source included) and requests its read system calls.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from embed import SAMPLE_IMAGES  # benchmarks run as scripts: this folder is on sys.path
from listing import (
    MotoChild,
    find_listing,
    object_key,
    proc_status,
    reset_peak,
    stop_child,
)

if TYPE_CHECKING:
    import pyarrow as pa

HERE = Path(__file__).resolve()
REPO_ROOT = HERE.parents[1]
MIB = 2**20
CLASSES = tuple(f"object {number:03d}" for number in range(100))
SHARD_SIZE = 2000


# --- counting requests and bytes: FaultProxy in a child process ----------------------------------


class CountingProxy:
    """tests/faults.py's FaultProxy (no faults) in front of `upstream`, in a child process, so
    its threads do not compete with the measured process for the GIL. `take()` returns the
    counts since the last call: ``{bucket: {"GET": n, "LIST": n, ..., "down": bytes, "up":
    bytes}}``."""

    def __init__(self, upstream: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE), "--serve-proxy", upstream],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = json.loads(self.process.stdout.readline())["url"]

    def take(self) -> dict[str, Counter]:
        return {bucket: Counter(c) for bucket, c in self._ask("take")}

    def trace(self) -> list[list]:
        """[bucket, kind, path?query, range, bytes down] of each request since the last call
        (of either)."""
        return self._ask("trace")

    def _ask(self, command: str):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        stop_child(self.process)


def _serve_proxy(upstream: str) -> None:
    """The child: FaultProxy, its handler wrapped to count per bucket and kind of request.

    Bytes down are counted as each block is written (before the client can have it), so a
    `take` after a call returns never misses its tail."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests import faults

    lock = threading.Lock()
    counts: dict[str, Counter] = {}
    trace: list[list] = []
    read_body, write = faults._Handler._read_body, faults._Handler._write

    def counted_read_body(handler):
        body = read_body(handler)
        parts = urlsplit(handler.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        kind = handler.command
        if kind == "GET" and (not key or "list-type" in parts.query):
            kind = "LIST"
        handler.bucket = bucket
        handler.entry = [bucket, kind, unquote(handler.path), handler.headers.get("Range"), 0]
        with lock:
            bucket_counts = counts.setdefault(bucket, Counter())
            bucket_counts[kind] += 1
            bucket_counts["up"] += len(body or b"")
            trace.append(handler.entry)
        return body

    def counted_write(handler, proxy, data, *, chunked=False):
        with lock:
            counts.setdefault(getattr(handler, "bucket", "?"), Counter())["down"] += len(data)
            if hasattr(handler, "entry"):
                handler.entry[4] += len(data)
        write(handler, proxy, data, chunked=chunked)

    faults._Handler._read_body = counted_read_body
    faults._Handler._write = counted_write
    proxy = faults.FaultProxy(upstream).start()
    print(json.dumps({"url": proxy.url}), flush=True)
    for line in sys.stdin:
        with lock:
            if line.strip() == "trace":
                reply, trace[:] = list(trace), []
            else:
                reply = [(bucket, dict(c)) for bucket, c in counts.items()]
                counts.clear()
                trace.clear()
        print(json.dumps(reply), flush=True)
    proxy.stop()


class LocalCounter:
    """For --backend local: this process's bytes read (rchar) and read system calls (syscr)."""

    url = None

    def __init__(self) -> None:
        self.last = self._io()

    @staticmethod
    def _io() -> Counter:
        with open("/proc/self/io") as f:
            values = dict(line.split(": ") for line in f.read().splitlines())
        return Counter({"down": int(values["rchar"]), "GET": int(values["syscr"])})

    def take(self) -> dict[str, Counter]:
        now = self._io()
        delta, self.last = now - self.last, now
        return {"local": delta}

    def stop(self) -> None:
        pass


# --- stages, measured ----------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    seconds: float
    peak: int  # bytes of VmHWM above VmRSS at the stage's start
    peak_absolute: int
    counts: dict[str, Counter]
    trace: list[list] = field(default_factory=list)


@dataclass
class Tick:
    name: str
    images: int
    rss_start: int = 0  # VmRSS when its first stage starts
    stages: list[Stage] = field(default_factory=list)

    def total(self, key: str, buckets: tuple[str, ...]) -> int:
        return sum(stage.counts.get(b, Counter())[key] for stage in self.stages for b in buckets)

    @property
    def seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def peak(self) -> int:
        return max(stage.peak_absolute for stage in self.stages) - self.rss_start


def release_memory() -> None:
    """Hand freed memory back to the system (Python, Arrow's pool, malloc), so a stage's resident
    peak is measured from what is really in use."""
    import ctypes

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """Times a stage, takes its request counts (and with `trace`, each request) and its resident
    peak."""

    def __init__(self, counter, trace: bool = False) -> None:
        self.counter = counter
        self.trace = trace and hasattr(counter, "trace")

    @contextlib.contextmanager
    def stage(self, tick: Tick, name: str):
        self.counter.take()  # drop whatever came before
        release_memory()
        reset_peak()
        before = proc_status("VmRSS")
        if not tick.stages:
            tick.rss_start = before
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        hwm = proc_status("VmHWM")
        trace = self.counter.trace() if self.trace else []
        tick.stages.append(Stage(name, seconds, hwm - before, hwm, self.counter.take(), trace))


# --- the ticks -----------------------------------------------------------------------------------


def noop_tick(
    job, meter: Meter, images: int, record: bool = True, cached: int | None = None
) -> Tick:
    """flows/inmap_flow.py's label_partition while nothing is new: the bodies of its tasks
    (tasks/stages.py, `.fn`: no Prefect), list, plan the embedding (which reads the index once;
    with nothing embedded it is not read again), plan the predictions; then the runs row."""
    from inmap import report
    from tasks import stages

    tick = Tick("no-op (inmap)", images)
    summary = report.RunSummary.start(job)
    with meter.stage(tick, "list"):
        found = stages.list_images.fn(job)
    with meter.stage(tick, "plan-embedding"):
        plan = stages.plan_embedding.fn(found.images, job)
    expected = images if cached is None else cached
    assert not plan.shards and plan.cached == expected, (len(plan.shards), plan.cached)
    index = plan.index  # as the flow does when no shard was planned
    with meter.stage(tick, "plan-predictions"):
        todo = stages.plan_predictions.fn(found.images, index, job)
    assert not todo, sum(p.images for p in todo)
    if record:
        summary.listed, summary.cached = len(found), plan.cached
        summary.listing_mark = found.images["uri"][-1].as_py()
        summary.finished_at = datetime.now(timezone.utc)
        with meter.stage(tick, "record-run"):
            stages.record_run.fn(summary, job)
    return tick


def old_index(job) -> pa.Table:
    """The embedding index as inmap read it before `_index` (pipeline.embedding_index at
    2476497): every shard's uri and etag, each shard downloaded whole (storage.read_table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inmap import layout, storage

    tables = []
    shards = storage.list_files(layout.embedding_dir(job.output, job.model), job.options)
    for url in sorted(u for u in shards if u.endswith(".parquet")):
        fs, path = storage.url_to_fs(url, job.options)
        pairs = pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["uri", "etag"])
        tables.append(pairs.append_column("shard_uri", pa.array([url] * len(pairs), pa.string())))
    return pa.concat_tables(tables)


def old_done_predictions(job) -> pa.Table:
    """(uri, etag) predicted for the labelset as inmap read them before the predictions table
    (pipeline.committed_predictions at 2476497): each file of the labelset's predictions read
    whole. The files are this table's live data files of the partition."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inmap import layout, storage, tables

    directory = layout.predictions_dir(job.output)
    table = tables.open_table(directory, job.options)
    files = table.file_uris(file_pruning_predicate=[("labelset", "=", job.labelset)])
    parts = []
    for url in files:
        fs, path = storage.url_to_fs(url, job.options)
        part = pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["uri", "etag"])
        parts.append(part.cast(pa.schema([("uri", pa.string()), ("etag", pa.string())])))
    return pa.concat_tables(parts)


def old_noop_tick(job, meter: Meter, images: int) -> Tick:
    """The same decisions the old way (see `old_index`, `old_done_predictions`)."""
    from inmap import embedding, failures, prediction

    tick = Tick("no-op (old: whole files)", images)
    with meter.stage(tick, "list"):
        manifest = find_listing(job.source, job.options)
    with meter.stage(tick, "plan-embedding"):
        index = old_index(job)
        plan = embedding.plan_embedding(manifest, index, failures.known_failures(job), job)
    assert not plan.shards and plan.cached == images, (len(plan.shards), plan.cached)
    with meter.stage(tick, "index-embeddings"):
        index = old_index(job)
    with meter.stage(tick, "plan-predictions"):
        todo = prediction.plan_predictions(manifest, index, old_done_predictions(job))
    assert not todo
    return tick


def new_images_tick(job, meter: Meter, images: int, new: int) -> tuple[Tick, dict]:
    """The partition's stages when `new` images arrived, as the flow runs them: the bodies of
    tasks/stages.py's tasks (`.fn`), and for embedding and the proxy the inmap calls those
    tasks make (their Prefect progress artifacts left out)."""
    from inmap import embedding, learning, report
    from tasks import stages

    tick = Tick("1% new (inmap)", images)
    summary = report.RunSummary.start(job)
    with meter.stage(tick, "list"):
        found = stages.list_images.fn(job)
    with meter.stage(tick, "plan-embedding"):
        plan = stages.plan_embedding.fn(found.images, job)
    planned = sum(len(shard.uris) for shard in plan.shards)
    assert planned == new, (planned, new)
    with meter.stage(tick, "embed"):
        shards = [embedding.embed_shard(shard, job) for shard in plan.shards]
    assert sum(s.embedded for s in shards) == new and not any(s.failed for s in shards), shards
    with meter.stage(tick, "index-embeddings"):
        index = stages.index_embeddings.fn(job)
    with meter.stage(tick, "plan-predictions"):
        todo = stages.plan_predictions.fn(found.images, index, job)
    to_predict = sum(p.images for p in todo)
    assert to_predict == new, (to_predict, new)
    with meter.stage(tick, "learn (choose proxy)"):
        choice = learning.vision_proxy(found.images, index, to_predict, job)
    assert not choice.learned, choice.reason
    with meter.stage(tick, "predict"):
        parts = [stages.predict_shard.fn(p, choice.proxy, job) for p in todo]
    with meter.stage(tick, "commit"):
        inserted = stages.commit_predictions.fn(parts, job)
    assert inserted == new, (inserted, new)
    summary.listed, summary.cached = len(found), plan.cached
    summary.embedded, summary.predicted = new, inserted
    summary.proxy_id, summary.proxy_reason = choice.proxy.proxy_id, choice.reason
    summary.proxy_images = choice.proxy.n_images
    summary.finished_at = datetime.now(timezone.utc)
    with meter.stage(tick, "record-run"):
        stages.record_run.fn(summary, job)
    return tick, {"embedded": new, "shards": len(shards), "proxy": choice.reason}


# --- building an archive -------------------------------------------------------------------------


@dataclass
class Archive:
    images: int
    dim: int
    shards: int
    embedding_bytes: int  # the shard files
    index_bytes: int  # the _index table's files, log included
    predictions_bytes: int
    seconds: float


def make_job(source: str, output: str, options: dict | None, run_id: str):
    from inmap.job import Job
    from inmap.model import resolve_model
    from inmap.options import RunOptions

    return Job(
        source=source,
        output=output,
        model=resolve_model("inmap-tiny", None, "cpu"),
        classes=CLASSES,
        run_id=run_id,
        settings=RunOptions(storage_options=options),
    )


def unit_vectors(rng, n: int, dim: int):
    import numpy as np

    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float16)


def shard_table(uris, etags, dim: int, metadata: dict, rng):
    """An embedding shard in the project's schema, with the encoder's metadata."""
    import numpy as np
    import pyarrow as pa

    from inmap.schemas import embedding_schema, with_json_metadata

    n = len(uris)
    flat = pa.array(unit_vectors(rng, n, dim).reshape(-1), pa.float16())
    sizes = rng.integers(200, 1000, (2, n), dtype=np.int32)
    schema = with_json_metadata(embedding_schema(dim), **metadata)
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "etag": pa.array(etags, pa.string()),
            "width": sizes[0],
            "height": sizes[1],
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        },
        schema=schema,
    )


def prediction_table(manifest, job, proxy_id: str, rng):
    """`PREDICTIONS_SCHEMA` rows for every image of `manifest`, as predict_shard makes them."""
    import numpy as np
    import pyarrow as pa

    from inmap.schemas import PREDICTIONS_SCHEMA

    n, k = manifest.num_rows, job.settings.top_k
    classes = np.asarray(job.classes, dtype=object)
    top = rng.integers(0, len(classes), (n, k)).astype(np.int32)
    scores = np.sort(rng.random((n, k), dtype=np.float32), axis=1)[:, ::-1]
    zero_shot = rng.integers(0, len(classes), n).astype(np.int32)
    now = datetime.now(timezone.utc)
    return pa.table(
        {
            "uri": manifest["uri"],
            "etag": manifest["etag"],
            "label": classes[top[:, 0]].tolist(),
            "class_id": top[:, 0],
            "score": scores[:, 0],
            "zero_shot_label": classes[zero_shot].tolist(),
            "zero_shot_class_id": zero_shot,
            "zero_shot_score": rng.random(n, dtype=np.float32),
            "top_k_labels": classes[top].tolist(),
            "top_k_class_ids": top.tolist(),
            "top_k_scores": scores.tolist(),
            "run_id": [job.run_id] * n,
            "model": [job.model.name] * n,
            "pretrained": [job.model.pretrained or "none"] * n,
            "proxy_id": [proxy_id] * n,
            "predicted_at": [now] * n,
            "labelset": [job.labelset] * n,
        },
        schema=PREDICTIONS_SCHEMA,
    )


def write_proxy(job, images: int, scratch: Path):
    """A vision proxy saved by `learn_proxy`, learned on 2000 random vectors of the model's
    width; its stats then record what a run over an archive of `images` images records: the
    images it was fitted on, at most `job.settings.max_train_images` (a uniform sample beyond),
    and the archive's size then."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inmap import learning, storage
    from inmap.encoder import load_encoder
    from inmap.schemas import json_metadata, with_json_metadata

    encoder = load_encoder(job.model)
    rng = np.random.default_rng(1)
    uris = [f"sample://{number}.jpg" for number in range(SHARD_SIZE)]
    etags = [str(number) for number in range(SHARD_SIZE)]
    sample = scratch / "proxy-sample.parquet"
    pq.write_table(shard_table(uris, etags, encoder.dim, {}, rng), sample)
    rows = pa.table({"uri": uris, "etag": etags, "shard_uri": [str(sample)] * SHARD_SIZE})
    artifact = learning.learn_proxy(rows, learning.build_text_proxy(job), job)
    table = storage.read_parquet(artifact.uri, storage_options=job.options)
    meta = json_metadata(table.schema)
    fitted = min(images, job.settings.max_train_images or images)
    meta["stats"] = {**meta["stats"], "n_images": fitted, "archive_images": images}
    storage.write_parquet_atomic(
        table.cast(with_json_metadata(table.schema.with_metadata({}), **meta)),
        artifact.uri,
        job.options,
    )
    return artifact.proxy_id


def build_archive(n: int, dim: int, setup_job, moto, drop_images: int, scratch: Path) -> Archive:
    import numpy as np

    from inmap import embedding, failures, layout, listing, prediction, report, storage
    from inmap.encoder import load_encoder
    from inmap.schemas import EMBEDDING_INDEX_SCHEMA

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    bucket = setup_job.source.removeprefix("s3://").split("/", 1)[0]
    if moto is not None:
        moto.fill(bucket, "drops", 0, n)
    else:
        fill_local_source(Path(setup_job.source), 0, n)
    manifest = listing.list_images(setup_job.source, setup_job.options).images
    assert manifest.num_rows == n, manifest.num_rows
    log(f"{n}: source of {n} objects ready, {time.perf_counter() - started:.0f}s")

    # Shards named by inmap's planning, vectors random, each indexed by embed_shard.
    nothing, known = EMBEDDING_INDEX_SCHEMA.empty_table(), failures.known_failures(setup_job)
    plan = embedding.plan_embedding(manifest, nothing, known, setup_job)
    metadata = {**load_encoder(setup_job.model).metadata(), "dim": dim}
    for number, shard in enumerate(plan.shards):
        url = layout.shard_uri(setup_job.output, setup_job.model, shard.shard_id)
        table = shard_table(list(shard.uris), list(shard.etags), dim, metadata, rng)
        storage.write_parquet_atomic(table, url, setup_job.options)
        result = embedding.embed_shard(shard, setup_job)  # finds the file: indexes it
        assert result.cached and result.embedded == len(shard.uris), result
        if number % 10 == 9:
            log(f"{n}: {number + 1}/{len(plan.shards)} shards written and indexed")
    log(f"{n}: {len(plan.shards)} shards, {time.perf_counter() - started:.0f}s")

    # The proxy and the predictions of the runs that built the archive.
    proxy_id = write_proxy(setup_job, n, scratch)
    fitted = min(n, setup_job.max_train_images or n)
    drops = max(drop_images, -(-n // 10))  # at most 10 commits
    for number, start in enumerate(range(0, n, drops)):
        run = setup_job.for_partition(setup_job.source, f"archive-{number:03d}")
        rows = prediction_table(manifest.slice(start, drops), run, proxy_id, rng)
        assert prediction.commit_predictions([rows], run) == rows.num_rows
    summary = report.RunSummary.start(setup_job)
    summary.listed = summary.embedded = summary.predicted = n
    summary.proxy_images = fitted
    summary.proxy_id, summary.proxy_learned = proxy_id, True
    summary.listing_mark = manifest["uri"][-1].as_py()
    summary.finished_at = datetime.now(timezone.utc)
    report.record_run(summary, setup_job)
    seconds = time.perf_counter() - started
    log(f"{n}: predictions and runs row committed, {seconds:.0f}s")

    embeddings_dir = layout.embedding_dir(setup_job.output, setup_job.model)
    return Archive(
        images=n,
        dim=dim,
        shards=len(plan.shards),
        embedding_bytes=sum(storage.list_files(embeddings_dir, setup_job.options).values()),
        index_bytes=tree_bytes(embedding.index_uri(setup_job), setup_job.options),
        predictions_bytes=tree_bytes(layout.predictions_dir(setup_job.output), setup_job.options),
        seconds=seconds,
    )


def tree_bytes(url: str, options: dict | None) -> int:
    from inmap import storage

    fs, path = storage.url_to_fs(url, options)
    fs.invalidate_cache()
    return sum(fs.du(path, total=False).values())


def fill_local_source(root: Path, start: int, stop: int) -> None:
    """Local stand-ins for the source objects: empty files (their etags are size-mtime)."""
    for day in range(30):
        (root / f"day={day:02d}").mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT
    for number in range(start, stop):
        os.close(os.open(root.parent / object_key(root.name, number), flags, 0o644))


def add_new_images(job, moto_options: dict | None, count: int) -> None:
    """`count` real JPEGs under a new date prefix of the source."""
    from inmap import storage

    paths = sorted(SAMPLE_IMAGES.glob("*.JPEG"))
    if not paths:
        sys.exit(f"no *.JPEG images under {SAMPLE_IMAGES}")
    data = {
        f"{job.source}/day=30/new-{number:07d}.jpg": paths[number % len(paths)].read_bytes()
        for number in range(count)
    }
    if job.source.startswith("s3://"):
        fs, _ = storage.url_to_fs(job.source, moto_options)
        fs.pipe({url.removeprefix("s3://"): blob for url, blob in data.items()})
    else:
        for url, blob in data.items():
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            Path(url).write_bytes(blob)


# --- reporting -----------------------------------------------------------------------------------


STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"# [{time.perf_counter() - STARTED:4.0f}s] {message}", file=sys.stderr, flush=True)


def fmt_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", MIB), ("KiB", 1024)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def requests(counts: Counter) -> int:
    return sum(v for k, v in counts.items() if k not in ("down", "up"))


def request_mix(counts: Counter) -> str:
    kinds = sorted((k, v) for k, v in counts.items() if k not in ("down", "up") and v)
    return " ".join(f"{k}:{v}" for k, v in kinds) or "-"


def print_archives(archives: list[Archive]) -> None:
    print("\n### Archives\n")
    print(
        "| images | dim | shards | embeddings stored | index (Delta) | index B/image "
        "| predictions (Delta) | setup s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a in archives:
        print(
            f"| {a.images:,} | {a.dim} | {a.shards} | {fmt_bytes(a.embedding_bytes)} "
            f"| {fmt_bytes(a.index_bytes)} | {a.index_bytes / a.images:.0f} "
            f"| {fmt_bytes(a.predictions_bytes)} | {a.seconds:.0f} |"
        )


def print_stages(ticks: list[Tick], output: tuple[str, ...], source: tuple[str, ...]) -> None:
    print("\n### Stages\n")
    print(
        "| images | tick | stage | seconds | output requests | output read | source requests "
        "| source read | peak MiB |"
    )
    print("|---:|---|---|---:|---|---:|---:|---:|---:|")
    for tick in ticks:
        for s in tick.stages:
            out = sum((s.counts.get(b, Counter()) for b in output), Counter())
            src = sum((s.counts.get(b, Counter()) for b in source), Counter())
            print(
                f"| {tick.images:,} | {tick.name} | {s.name} | {s.seconds:.2f} "
                f"| {request_mix(out)} | {fmt_bytes(out['down'])} | {requests(src)} "
                f"| {fmt_bytes(src['down'])} | {max(s.peak, 0) / MIB:.0f} |"
            )


def print_summary(
    ticks: list[Tick],
    archives: dict[int, Archive],
    output: tuple[str, ...],
    source: tuple[str, ...],
    local: bool = False,
) -> None:
    print("\n### Ticks\n")
    if local:
        print(
            "Local backend: 'output read' is everything this process read (/proc/self/io "
            "rchar), the new images of the 1%-new tick included; requests are read system "
            "calls.\n"
        )
    print(
        "| images | tick | seconds | seconds without list | output requests | output read "
        "| read / embeddings stored | output read B/image | source read | peak MiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tick in ticks:
        archive = archives[tick.images]
        down = tick.total("down", output)
        listed = sum(s.seconds for s in tick.stages if s.name == "list")
        reqs = sum(requests(s.counts.get(b, Counter())) for s in tick.stages for b in output)
        print(
            f"| {tick.images:,} | {tick.name} | {tick.seconds:.1f} | {tick.seconds - listed:.1f} "
            f"| {reqs} | {fmt_bytes(down)} | {down / archive.embedding_bytes:.1%} "
            f"| {down / tick.images:.0f} | {fmt_bytes(tick.total('down', source))} "
            f"| {max(tick.peak, 0) / MIB:.0f} |"
        )


def print_verdicts(ticks: list[Tick], archives: dict[int, Archive], output, notes) -> None:
    print("\n### Targets\n")
    for name in ("no-op (inmap)", "no-op (inmap), after `inmap maintain`"):
        noop = {t.images: t for t in ticks if t.name == name}
        for images, tick in sorted(noop.items()):
            archive = archives[images]
            share = tick.total("down", output) / archive.embedding_bytes
            index_read = sum(
                s.counts.get(b, Counter())["down"]
                for s in tick.stages
                if s.name in ("plan-embedding", "index-embeddings")
                for b in output
            )
            print(
                f"- {name}, {images:,} images ({archive.dim}-d): read {share:.1%} of the stored "
                f"embedding bytes ({'within' if share <= 0.10 else 'above'} 10%); "
                f"{tick.total('down', output) / images:.0f} B per archived image in all, of "
                f"which the two index reads {index_read / images:.0f} B (the index holds "
                f"{archive.index_bytes / images:.0f} B per image as built)."
            )
        if len(noop) > 1:
            sizes = sorted(noop)
            small, large = noop[sizes[0]], noop[sizes[-1]]
            growth = (large.total("down", output) - small.total("down", output)) / (
                large.images - small.images
            )
            print(
                f"- {name}, from {small.images:,} to {large.images:,} images: "
                f"{growth:.0f} B read per added archived image."
            )
    for images, note in sorted(notes.items()):
        tick = next(t for t in ticks if t.images == images and t.name.startswith("1%"))
        embed = sum(s.seconds for s in tick.stages if s.name == "embed")
        rest = tick.seconds - sum(s.seconds for s in tick.stages if s.name == "list")
        print(
            f"- {images:,} images, 1% new: embedded {note['embedded']} images in "
            f"{note['shards']} shard(s); proxy reused ({note['proxy']}); embedding took "
            f"{embed:.1f} s of {tick.seconds:.1f} s ({embed / tick.seconds:.0%}), "
            f"{embed / rest:.0%} of the {rest:.1f} s besides listing."
        )


def print_trace(ticks: list[Tick]) -> None:
    for tick in ticks:
        for stage in tick.stages:
            print(f"\n#### {tick.images:,} images, {tick.name}, {stage.name}\n")
            for _bucket, kind, path, ranged, down in stage.trace:
                print(f"    {kind:4} {fmt_bytes(down):>10} {ranged or '':24} {path[:150]}")


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512, help="archived vectors' width")
    parser.add_argument("--backend", choices=["s3", "local"], default="s3")
    parser.add_argument("--new", type=float, default=0.01, help="share of new images")
    parser.add_argument("--drop-images", type=int, default=10_000, help="images per past run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trace", action="store_true", help="print every request, per stage")
    parser.add_argument("--serve-proxy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_proxy:
        return _serve_proxy(args.serve_proxy)

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from inmap.encoder import RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)
    import torch

    from inmap import maintenance

    print(
        f"# {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f}; backend {args.backend}; archived vectors {args.dim}-d "
        f"float16; model inmap-tiny (64-d, random weights) for the new images",
        flush=True,
    )
    moto = counter = None
    scratch = Path(tempfile.mkdtemp(prefix="inmap-tick-"))
    archives: dict[int, Archive] = {}
    ticks: list[Tick] = []
    notes: dict[int, dict] = {}
    try:
        if args.backend == "s3":
            moto = MotoChild()
            counter = CountingProxy(moto.endpoint)
            direct, counted = {"endpoint_url": moto.endpoint}, {"endpoint_url": counter.url}
        else:
            counter, direct, counted = LocalCounter(), None, None
        meter = Meter(counter, args.trace)
        for n in sorted(args.sizes):
            if args.backend == "s3":
                moto.create_bucket(f"out-{n}")
                source, output = f"s3://src-{n}/drops", f"s3://out-{n}/out"
            else:
                source, output = str(scratch / f"src-{n}" / "drops"), str(scratch / f"out-{n}")
            setup = make_job(source, output, direct, "archive")
            archives[n] = build_archive(n, args.dim, setup, moto, args.drop_images, scratch)
            job = make_job(source, output, counted, f"tick-{n}-noop")
            if not ticks:  # warm up once: clients, pools, kernels
                noop_tick(job, meter, n, record=False)
            ticks.append(noop_tick(job, meter, n))
            ticks.append(old_noop_tick(job, meter, n))
            log(f"{n}: no-op ticks done")
            new = max(1, round(n * args.new))
            add_new_images(setup, direct, new)
            job = make_job(source, output, counted, f"tick-{n}-new")
            tick, notes[n] = new_images_tick(job, meter, n, new)
            ticks.append(tick)
            log(f"{n}: 1%-new tick done")
            # `inmap maintain` (compact, checkpoint, vacuum every table), then a no-op again.
            started = time.perf_counter()
            for line in maintenance.maintain(output, direct):
                log(line)
            log(f"{n}: maintained in {time.perf_counter() - started:.0f}s")
            job = make_job(source, output, counted, f"tick-{n}-maintained")
            tick = noop_tick(job, meter, n, cached=n + new)
            tick.name = "no-op (inmap), after `inmap maintain`"
            ticks.append(tick)
    finally:
        if counter is not None:
            counter.stop()
        if moto is not None:
            moto.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    output_buckets = tuple(f"out-{n}" for n in args.sizes) + ("local",)
    source_buckets = tuple(f"src-{n}" for n in args.sizes)
    print_archives(list(archives.values()))
    print_stages(ticks, output_buckets, source_buckets)
    print_summary(ticks, archives, output_buckets, source_buckets, args.backend == "local")
    print_verdicts(ticks, archives, output_buckets, notes)
    if args.trace:
        print_trace(ticks)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "archives": [a.__dict__ for a in archives.values()],
                    "ticks": [
                        {
                            "name": t.name,
                            "images": t.images,
                            "stages": [
                                {**s.__dict__, "counts": {b: dict(c) for b, c in s.counts.items()}}
                                for s in t.stages
                            ],
                        }
                        for t in ticks
                    ],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
