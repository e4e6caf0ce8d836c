"""Image URLs in, embedding and error tables out: the read-decode-batch machinery.

- objects are read by a pool of threads, well ahead of decoding (object stores are latency-bound),
  retrying transient failures for a while;
- a pool of decode threads turns bytes into model-sized uint8 pixels (PIL decodes, with JPEG draft
  for large photos; torch resizes; both release the GIL), within a budget of pixels in flight;
- batches go to the model as uint8. On a GPU the next batches decode while the model runs; on the
  CPU decoding and the model take turns, each with every core.

Every pool is shut down before `embed_images` returns, also when it fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from inmap import storage
from inmap.decode import (
    DEFAULT_PIXEL_BUDGET,
    DecodeError,
    PixelBudget,
    Preprocessing,
    decode_pixels,
)
from inmap.encoder import Encoder
from inmap.errors import MissingBucketError, NotFound
from inmap.schemas import EMBEDDING_VALUE_TYPE, embedding_schema, with_json_metadata

# Called after each batch with (images done, images in all).
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Failure:
    """An image that could not be read or decoded.

    stage "decode": the bytes are not an image (not retried until the object changes);
    "missing": the object was gone when read; "read": it could not be read even after retrying,
    which blocks its partition's commit."""

    stage: str
    reason: str


Decoded = tuple[torch.Tensor, tuple[int, int]]  # (s, s, 3) uint8 pixels, full (width, height)


@dataclass(frozen=True)
class Throughput:
    """How images are read and decoded; none of it changes an embedding."""

    batch_size: int = 64  # images per model batch
    num_workers: int | None = None  # decode threads (default: one per CPU)
    read_workers: int = storage.DEFAULT_READ_WORKERS  # reads in flight
    retry_seconds: float = storage.DEFAULT_RETRY_SECONDS  # retry window per object
    pixel_budget: int = DEFAULT_PIXEL_BUDGET  # decoded pixels in flight

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class EmbeddedImages:
    embeddings: pa.Table  # embedding_schema, input order, the encoder's metadata
    failures: list[tuple[str, str, Failure]]  # (uri, etag, failure), input order


def default_num_workers() -> int:
    """Decode threads: one per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def embed_images(
    encoder: Encoder,
    items: Iterable[tuple[str, str]],
    *,
    storage_options: dict | None = None,
    throughput: Throughput = Throughput(),  # noqa: B008 - frozen dataclass
    on_progress: ProgressCallback | None = None,
) -> EmbeddedImages:
    """Embed the images at `items` ((uri, etag) pairs); every failure is returned with a reason."""
    items = list(items)
    on_cpu = encoder.device.type == "cpu"  # then decoding and the model take turns
    uris, etags, sizes, vectors = [], [], [], []
    failures: list[tuple[str, str, Failure]] = []
    pin = encoder.device.type == "cuda"
    buffer = _PixelBuffer(throughput.batch_size, encoder.image_size, pin=pin)
    done = 0
    batches = decode_batches(
        items,
        encoder.preprocessing,
        prefetch=0 if on_cpu else 2,
        storage_options=storage_options,
        throughput=throughput,
    )
    with contextlib.closing(batches):
        for batch_items, results in batches:
            buffer.clear()
            for (uri, etag), result in zip(batch_items, results, strict=True):
                if isinstance(result, Failure):
                    failures.append((uri, etag, result))
                    continue
                pixels, size = result
                buffer.add(pixels)
                uris.append(uri)
                etags.append(etag)
                sizes.append(size)
            if buffer.count:
                vectors.append(encoder.encode_pixels(buffer.filled()))
            done += len(batch_items)
            if on_progress:
                on_progress(done, len(items))
    embeddings = np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float16)
    schema = with_json_metadata(embedding_schema(encoder.dim), **encoder.metadata())
    table = pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "etag": pa.array(etags, pa.string()),
            "width": pa.array([w for w, _ in sizes], pa.int32()),
            "height": pa.array([h for _, h in sizes], pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.reshape(-1), EMBEDDING_VALUE_TYPE), encoder.dim
            ),
        },
        schema=schema,
    )
    return EmbeddedImages(table, failures)


def decode_batches(
    items: list[tuple[str, str]],
    preprocessing: Preprocessing,
    *,
    prefetch: int = 2,
    storage_options: dict | None = None,
    throughput: Throughput = Throughput(),  # noqa: B008 - frozen dataclass
) -> Iterator[tuple[list[tuple[str, str]], list[Decoded | Failure]]]:
    """Read and decode `items` in order, a batch at a time: yield (items, results) per batch.

    Objects are read by `read_workers` threads, well ahead of decoding. Each batch is decoded by
    `num_workers` threads (default: one per CPU). With `prefetch` > 0, that many further batches
    decode while the caller works on the one just yielded; with 0, the next batch starts only when
    the caller asks for it, so decoding and the caller's work never overlap.

    While decoding runs, torch is limited to one intra-op thread (see `_one_torch_thread`): with
    `prefetch` > 0 that is for the generator's whole life, so a caller computing on the CPU should
    use `prefetch=0`. Close the generator (or exhaust it) to stop every thread it started.
    """
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    reads = storage.read_bytes_many(
        [uri for uri, _ in items],
        storage_options,
        throughput.read_workers,
        throughput.retry_seconds,
    )
    budget = PixelBudget(throughput.pixel_budget)
    workers = throughput.num_workers or default_num_workers()
    batch_size = throughput.batch_size
    queued: deque[tuple[list[tuple[str, str]], list[Future | Failure]]] = deque()
    position = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inmap-decode")

    def queue_next_batch() -> None:
        nonlocal position
        batch_items = items[position : position + batch_size]
        position += len(batch_items)
        if not batch_items:
            return
        pending: list[Future | Failure] = []
        for uri, data in itertools.islice(reads, len(batch_items)):
            if isinstance(data, Exception):
                pending.append(_read_failure(uri, data))
            else:
                pending.append(pool.submit(_decode_one, data, preprocessing, budget))
        queued.append((batch_items, pending))

    try:
        if prefetch:
            with _one_torch_thread():  # decoding runs all along, so for the generator's life
                for _ in range(1 + prefetch):
                    queue_next_batch()
                while queued:
                    batch_items, pending = queued.popleft()
                    results = [_resolve(entry) for entry in pending]
                    queue_next_batch()
                    yield batch_items, results
        else:
            while True:
                with _one_torch_thread():  # only while decoding: the caller's turn gets all threads
                    queue_next_batch()
                    if not queued:
                        return
                    batch_items, pending = queued.popleft()
                    results = [_resolve(entry) for entry in pending]
                yield batch_items, results
    finally:
        reads.close()
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_one(
    data: bytes, preprocessing: Preprocessing, budget: PixelBudget
) -> Decoded | Failure:
    try:
        return decode_pixels(data, preprocessing, budget=budget)
    except DecodeError as error:
        return Failure("decode", error.reason)


def _resolve(entry: Future | Failure) -> Decoded | Failure:
    if isinstance(entry, Failure):
        return entry
    try:
        return entry.result()
    except Exception as error:  # a decoder bug must not lose the shard: record it
        return Failure("decode", f"{type(error).__name__}: {error}")


def _read_failure(uri: str, error: Exception) -> Failure:
    message = str(error) or type(error).__name__
    reason = message if uri in message else f"{uri}: {message}"
    if isinstance(error, NotFound) and not isinstance(error, MissingBucketError):
        return Failure("missing", reason)
    return Failure("read", reason)


_torch_threads_lock = threading.Lock()
_torch_threads_users = 0
_torch_threads_saved = 1


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread (a process-wide setting) while decode workers run.

    The decode workers resize with torch; on every call each would otherwise start a team of
    OpenMP threads, oversubscribing the cores the workers already fill (measured here: up to 4x
    the CPU time per image). Nested and concurrent uses restore the setting once, at the end.
    """
    global _torch_threads_users, _torch_threads_saved
    with _torch_threads_lock:
        if _torch_threads_users == 0:
            _torch_threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_threads_users += 1
    try:
        yield
    finally:
        with _torch_threads_lock:
            _torch_threads_users -= 1
            if _torch_threads_users == 0:
                torch.set_num_threads(_torch_threads_saved)


class _PixelBuffer:
    """A reusable (batch, s, s, 3) uint8 buffer, pinned on CUDA hosts for async copies.

    Reuse is safe because `encode_pixels` returns only after the batch's results are on the host.
    """

    def __init__(self, batch_size: int, size: int, pin: bool):
        self.buffer = torch.empty((batch_size, size, size, 3), dtype=torch.uint8, pin_memory=pin)
        self.count = 0

    def clear(self) -> None:
        self.count = 0

    def add(self, pixels: torch.Tensor) -> None:
        self.buffer[self.count].copy_(pixels)
        self.count += 1

    def filled(self) -> torch.Tensor:
        return self.buffer[: self.count]
