"""open_clip in, unit-norm float16 embeddings out.

`load_encoder` builds one model per (name, weights, device) and process. `embed_images` turns a list
of image URLs into an embedding table and an errors table:
- objects are read by a pool of threads, well ahead of decoding (object stores are latency-bound);
- a pool of decode threads turns bytes into model-sized uint8 pixels (PIL decodes, with JPEG
  draft for large photos; torch resizes; both release the GIL while they work);
- batches go to the model as uint8: on CUDA from pinned memory with a non-blocking copy, then
  normalised on the GPU under fp16 autocast, while the next batches decode. On the CPU, decoding
  and the model take turns.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import open_clip
import pyarrow as pa
import torch

from inmap import storage
from inmap.decode import DecodeError, Preprocessing, decode_pixels, normalize
from inmap.schemas import EMBEDDING_VALUE_TYPE, ERRORS_SCHEMA, embedding_schema, with_json_metadata

logger = logging.getLogger(__name__)

# The paper's features and our dev set are OpenAI CLIP ViT-B/32. OpenAI trained with QuickGELU, and
# open_clip's plain "ViT-B-32" config uses nn.GELU; `load_encoder` therefore turns QuickGELU on
# whenever the pretrained tag says the weights were trained with it (the "-quickgelu" config names
# do the same), so the default loads without open_clip's QuickGELU mismatch warning and gives the
# activations the weights expect.
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"

# A tiny CLIP for tests and CI: 64 px input, 2-layer width-64 towers, random weights only.
TINY_MODEL = "inmap-tiny"
TINY_MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Values of `pretrained` (besides None) meaning "no weights": random initialisation, tests only.
RANDOM_WEIGHTS = ("", "none", "random")
RANDOM_WEIGHTS_SEED = 0  # random weights are reproducible across processes
PROGRESS_SECONDS = 10.0  # how often a long shard logs its progress


def _register_tiny_model() -> None:
    """Register TINY_MODEL with open_clip, which only reads configs from JSON files."""
    if TINY_MODEL in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory(prefix="inmap-model-config-") as directory:
        path = os.path.join(directory, f"{TINY_MODEL}.json")
        with open(path, "w") as f:
            json.dump(TINY_MODEL_CONFIG, f)
        # open_clip parses the file now and keeps the config in its registry.
        open_clip.add_model_config(path)


_register_tiny_model()


class ModelNotFoundError(ValueError):
    """The model name or pretrained tag is not one open_clip knows."""


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights could not be downloaded or read."""


class RandomWeightsWarning(UserWarning):
    """The encoder has random weights: its embeddings and labels mean nothing."""


@dataclass
class Encoder:
    """A loaded open_clip model and everything needed to feed it."""

    model: torch.nn.Module
    preprocess: Callable  # open_clip's own eval transform, PIL image -> (3, s, s) tensor
    tokenizer: Callable  # list of str -> (n, context_length) token ids, for text proxies
    device: torch.device
    model_name: str
    pretrained: str | None
    image_size: int
    dim: int
    dtype: torch.dtype  # compute dtype of image encoding: float16 autocast on CUDA, else float32
    preprocessing: Preprocessing

    @property
    def preprocessing_id(self) -> str:
        """Changes whenever the pixels fed to the model would change (for cache keys)."""
        return self.preprocessing.id

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """(b, 3, s, s) normalised images -> (b, dim) float16 unit-norm embeddings."""
        with torch.inference_mode():
            images = images.to(self.device, non_blocking=True)
            return self._encode(images)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(b, s, s, 3) uint8 pixels -> (b, dim) float16 unit-norm embeddings.

        The uint8 batch is copied to the device (4x fewer bytes than float) and normalised there.
        """
        with torch.inference_mode():
            pixels = pixels.to(self.device, non_blocking=True)
            return self._encode(normalize(pixels, self.preprocessing))

    def metadata(self) -> dict[str, object]:
        """Facts about these embeddings, stored in every embedding shard."""
        from inmap import __version__

        return {
            "model": self.model_name,
            "pretrained": self.pretrained or "none",
            "dim": self.dim,
            "preprocessing": self.preprocessing.describe(),
            "preprocessing_id": self.preprocessing_id,
            "inmap_version": __version__,
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
        }

    def _encode(self, images: torch.Tensor) -> np.ndarray:
        autocast = self.device.type == "cuda" and self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            features = self.model.encode_image(images)  # (b, dim)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.to(torch.float16).cpu().numpy()


def load_encoder(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str = "auto",
    precision: str = "auto",
) -> Encoder:
    """Load an open_clip model once per process (later calls return the same Encoder).

    `pretrained` is an open_clip tag (weights come through the Hugging Face cache), a local
    checkpoint path, or None for random weights (tests only; warns loudly). For a local copy of
    OpenAI's weights pass the "-quickgelu" model name (e.g. "ViT-B-32-quickgelu"), since a file does
    not say which activation it was trained with. `device` "auto" means CUDA when available.
    `precision` "auto" is fp16 autocast on CUDA and fp32 on CPU; "bf16" and "fp32" force one.
    """
    resolved = _resolve_device(device)
    if pretrained is not None and not isinstance(pretrained, str):
        pretrained = os.fspath(pretrained)
    return _load_encoder(model, pretrained, resolved, precision)


def _resolve_device(device: str | torch.device) -> str:
    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@functools.lru_cache(maxsize=4)
def _load_encoder(model_name: str, pretrained: str | None, device: str, precision: str) -> Encoder:
    schema, _ = open_clip.factory.parse_model_name(model_name)
    if schema is None:
        model_name = model_name.replace("/", "-")  # "ViT-B/32" is how OpenAI writes it
        _check_model_name(model_name)
    create_kwargs: dict = {}
    if pretrained is None or pretrained.strip().lower() in RANDOM_WEIGHTS or schema is not None:
        if schema is None:
            _warn_random_weights(model_name)
        pretrained = None
    elif os.path.isfile(os.path.expanduser(pretrained)):
        pretrained = os.path.abspath(os.path.expanduser(pretrained))
    else:
        tag_config = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_config:
            raise _unknown_weights_error(model_name, pretrained)
        _download_weights(model_name, pretrained, tag_config)
        model_quick_gelu = open_clip.get_model_config(model_name).get("quick_gelu", False)
        if tag_config.get("quick_gelu", False) and not model_quick_gelu:
            create_kwargs["force_quick_gelu"] = True
    try:
        # Random weights are seeded: Dask workers, and reruns that mix cached and new shards, must
        # all embed with the same model. The caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, **create_kwargs
            )
    except (RuntimeError, OSError, AssertionError, KeyError, ValueError) as error:
        if schema is not None:
            raise WeightsUnavailableError(
                f"could not load {model_name}: {error}. {_OFFLINE_ADVICE}"
            ) from error
        if pretrained and os.path.isfile(pretrained):  # open_clip asserts on some shape mismatches
            raise WeightsUnavailableError(
                f"checkpoint {pretrained} does not fit model {model_name}: {error}. Pass the model "
                "name the checkpoint was trained as (e.g. 'ViT-B-32-quickgelu' for OpenAI weights)."
            ) from error
        raise
    model.eval()
    preprocessing = _preprocessing_of(model, model_name)
    dtype = _compute_dtype(device, precision)
    return Encoder(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        device=torch.device(device),
        model_name=model_name,
        pretrained=pretrained,
        image_size=preprocessing.size,
        dim=_embedding_dim(model, preprocessing.size, device),
        dtype=dtype,
        preprocessing=preprocessing,
    )


def _check_model_name(model_name: str) -> None:
    known = open_clip.list_models()
    if model_name in known:
        return
    close = difflib.get_close_matches(model_name, known, n=6, cutoff=0.6)
    if not close:  # "vit-b-32" -> "ViT-B-32"
        lowered = {name.lower(): name for name in known}
        close = [lowered[m] for m in difflib.get_close_matches(model_name.lower(), lowered, n=6)]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelNotFoundError(
        f"unknown open_clip model {model_name!r}.{hint} open_clip.list_models() lists all names."
    )


def _unknown_weights_error(model_name: str, pretrained: str) -> Exception:
    looks_like_path = os.sep in pretrained or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".npz")
    )
    if looks_like_path:
        return WeightsUnavailableError(
            f"checkpoint file {pretrained} does not exist (pretrained={pretrained!r})"
        )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    known = (
        f"known tags for {model_name}: {', '.join(tags)}"
        if tags
        else (f"open_clip has no pretrained weights for {model_name}; pass a checkpoint path")
    )
    return ModelNotFoundError(f"unknown pretrained tag {pretrained!r} for {model_name}; {known}")


_OFFLINE_ADVICE = (
    "If this machine is offline, either pass a local checkpoint (--pretrained "
    "/path/to/open_clip_model.safetensors on the command line, pretrained='/path/...' in Python), "
    "or fill the Hugging Face cache on a connected machine and point HF_HOME at it, with "
    "HF_HUB_OFFLINE=1 so nothing is fetched (offline, loading then fails at once instead of after "
    "a minute of retries)."
)


def _download_weights(model_name: str, tag: str, tag_config: dict) -> str:
    """Fetch (or find in the cache) the weights of `tag`; a clear error when that is impossible."""
    try:
        return open_clip.download_pretrained(tag_config)
    except Exception as error:
        repo = tag_config.get("hf_hub", "").strip("/")
        fetch = f" (e.g. `hf download {repo}`)" if repo else ""
        cause = " ".join(str(error).split())
        cause = cause if len(cause) <= 300 else cause[:297] + "..."
        raise WeightsUnavailableError(
            f"could not download the pretrained weights {tag!r} of {model_name}: {cause}. "
            + _OFFLINE_ADVICE.replace("connected machine", f"connected machine{fetch}")
        ) from error


def _warn_random_weights(model_name: str) -> None:
    message = (
        f"{model_name} has RANDOM weights (pretrained=None): embeddings and labels are "
        "meaningless. Use this for tests only; pass a pretrained tag or checkpoint for real use."
    )
    logger.warning(message)
    warnings.warn(message, RandomWeightsWarning, stacklevel=4)


def _preprocessing_of(model: torch.nn.Module, model_name: str) -> Preprocessing:
    config = open_clip.get_model_preprocess_cfg(model)
    size = config.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"{model_name} wants non-square input {size}, which inmap cannot feed")
        size = size[0]
    resize_mode = config.get("resize_mode", "shortest") or "shortest"
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(f"{model_name} uses resize_mode {resize_mode!r}, which inmap cannot feed")
    interpolation = config.get("interpolation", "bicubic") or "bicubic"
    if interpolation == "random":  # open_clip uses bicubic for eval in that case
        interpolation = "bicubic"
    mean, std = config.get("mean"), config.get("std")
    return Preprocessing(
        size=int(size),
        resize_mode=resize_mode,
        interpolation=interpolation,
        mean=tuple(float(m) for m in (mean or Preprocessing.mean)),
        std=tuple(float(s) for s in (std or Preprocessing.std)),
    )


def _compute_dtype(device: str, precision: str) -> torch.dtype:
    choices = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if precision not in choices:
        raise ValueError(f"precision must be 'auto' or one of {tuple(choices)}, got {precision!r}")
    return choices[precision]


def _embedding_dim(model: torch.nn.Module, size: int, device: str) -> int:
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.inference_mode():  # towers without the attribute: ask the model
        return int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])


# --- embedding many images -----------------------------------------------------------------------


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
    batch_size: int = 64,
    num_workers: int | None = None,
    read_workers: int = storage.DEFAULT_READ_WORKERS,
) -> tuple[pa.Table, pa.Table]:
    """Embed the images at `items` ((uri, etag) pairs); every failure becomes an error row.

    Returns the embedding table (`embedding_schema`, in input order, with the encoder's metadata)
    and the errors table (`ERRORS_SCHEMA`, stage "read" or "decode", run_id left empty).

    On a GPU the next batches decode while the model runs. On the CPU decoding and the model take
    turns, each with every core: running both at once only makes them fight over the cores.
    """
    items = list(items)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    on_cpu = encoder.device.type == "cpu"  # then decoding and the model take turns
    uris, etags, sizes, vectors = [], [], [], []
    errors: dict[str, list] = {"uri": [], "etag": [], "stage": [], "error": []}
    buffer = _PixelBuffer(batch_size, encoder.image_size, pin=encoder.device.type == "cuda")
    batches = decode_batches(
        items,
        encoder.preprocessing,
        batch_size=batch_size,
        prefetch=0 if on_cpu else 2,
        storage_options=storage_options,
        num_workers=num_workers,
        read_workers=read_workers,
    )
    done, started = 0, time.monotonic()
    last_report = started
    for batch_items, results in batches:
        buffer.clear()
        for (uri, etag), result in zip(batch_items, results, strict=True):
            if isinstance(result, Failure):
                row = (uri, etag, result.stage, result.reason)
                for key, value in zip(errors, row, strict=True):
                    errors[key].append(value)
                continue
            pixels, size = result
            buffer.add(pixels)
            uris.append(uri)
            etags.append(etag)
            sizes.append(size)
        if buffer.count:
            vectors.append(encoder.encode_pixels(buffer.filled()))
        done += len(batch_items)
        if time.monotonic() - last_report > PROGRESS_SECONDS or done == len(items):
            last_report = time.monotonic()
            rate = done / max(last_report - started, 1e-9)
            logger.info(
                "embedded %d/%d images (%d failed), %.1f img/s", done, len(items),
                len(errors["uri"]), rate,
            )  # fmt: skip
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
    errors_table = pa.table({**errors, "run_id": [""] * len(errors["uri"])}, schema=ERRORS_SCHEMA)
    return table, errors_table


@dataclass(frozen=True)
class Failure:
    """An image that could not be read or decoded."""

    stage: str  # "read" | "decode"
    reason: str


Decoded = tuple[torch.Tensor, tuple[int, int]]  # (s, s, 3) uint8 pixels, full (width, height)


def decode_batches(
    items: list[tuple[str, str]],
    preprocessing: Preprocessing,
    *,
    batch_size: int = 64,
    prefetch: int = 2,
    storage_options: dict | None = None,
    num_workers: int | None = None,
    read_workers: int = storage.DEFAULT_READ_WORKERS,
) -> Iterator[tuple[list[tuple[str, str]], list[Decoded | Failure]]]:
    """Read and decode `items` in order, `batch_size` at a time: yield (items, results) per batch.

    Objects are read by `read_workers` threads, well ahead of decoding. Each batch is decoded by
    `num_workers` threads (default: one per CPU). With `prefetch` > 0, that many further batches
    decode while the caller works on the one just yielded; with 0, the next batch starts only when
    the caller asks for it, so decoding and the caller's work never overlap.

    While decoding runs, torch is limited to one intra-op thread (see `_one_torch_thread`): with
    `prefetch` > 0 that is for the generator's whole life, so a caller computing on the CPU should
    use `prefetch=0`.
    """
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    reads = storage.read_bytes_many([uri for uri, _ in items], storage_options, read_workers)
    workers = num_workers or default_num_workers()
    queued: deque[tuple[list[tuple[str, str]], list[Future | Failure]]] = deque()
    position = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inmap-decode") as pool:

        def queue_next_batch() -> None:
            nonlocal position
            batch_items = items[position : position + batch_size]
            position += len(batch_items)
            if not batch_items:
                return
            pending: list[Future | Failure] = []
            for uri, data in itertools.islice(reads, len(batch_items)):
                if isinstance(data, Exception):
                    pending.append(Failure("read", _read_reason(uri, data)))
                else:
                    pending.append(pool.submit(_decode_one, data, preprocessing))
            queued.append((batch_items, pending))

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


def _decode_one(data: bytes, preprocessing: Preprocessing) -> Decoded | Failure:
    try:
        return decode_pixels(data, preprocessing)
    except DecodeError as error:
        return Failure("decode", error.reason)


def _resolve(entry: Future | Failure) -> Decoded | Failure:
    if isinstance(entry, Failure):
        return entry
    try:
        return entry.result()
    except Exception as error:  # a decoder bug must not lose the shard: record it
        return Failure("decode", f"{type(error).__name__}: {error}")


def _read_reason(uri: str, error: Exception) -> str:
    message = str(error) or type(error).__name__
    return message if uri in message else f"{uri}: {message}"


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
