"""open_clip in, unit-norm float16 embeddings out.

`load_encoder` builds one model per resolved `ModelSpec` and process. Image batches arrive as uint8
pixels (see `inmap.batches`): on CUDA they are copied from pinned memory and normalised on the GPU
under fp16 autocast.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import open_clip
import torch

from inmap.decode import Preprocessing, normalize
from inmap.errors import WeightsUnavailableError
from inmap.model import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    OFFLINE_ADVICE,
    RANDOM_WEIGHTS_SEED,
    ModelSpec,
    resolve_device,
    resolve_model,
)

logger = logging.getLogger(__name__)


class RandomWeightsWarning(UserWarning):
    """The encoder has random weights: its embeddings and labels mean nothing."""


@dataclass
class Encoder:
    """A loaded open_clip model and everything needed to feed it."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Callable  # open_clip's own eval transform, PIL image -> (3, s, s) tensor
    tokenizer: Callable  # list of str -> (n, context_length) token ids, for text proxies
    image_size: int
    dim: int
    dtype: torch.dtype  # compute dtype of image encoding: float16 autocast on CUDA, else float32
    preprocessing: Preprocessing

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    @property
    def model_name(self) -> str:
        return self.spec.name

    @property
    def pretrained(self) -> str | None:
        return self.spec.pretrained

    @property
    def preprocessing_id(self) -> str:
        """Changes whenever the pixels fed to the model would change (for cache keys)."""
        return self.preprocessing.id

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
            "model": self.spec.name,
            "pretrained": self.spec.pretrained or "none",
            "weights_id": self.spec.weights_id,
            "dim": self.dim,
            "preprocessing": self.preprocessing.describe(),
            "preprocessing_id": self.preprocessing_id,
            "inmap_version": __version__,
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
            # Where these embeddings were made: the device the embedding process resolved.
            "host": socket.gethostname(),
            "device": str(self.device),
        }

    def _encode(self, images: torch.Tensor) -> np.ndarray:
        autocast = self.device.type == "cuda" and self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            features = self.model.encode_image(images)  # (b, dim)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.to(torch.float16).cpu().numpy()


def load_encoder(
    model: str | ModelSpec = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str = "auto",
    precision: str = "auto",
) -> Encoder:
    """Load an open_clip model once per process (later calls return the same Encoder).

    `model` is a resolved `ModelSpec`, or a name resolved here with `pretrained` (an open_clip tag
    fetched through the Hugging Face cache, a local checkpoint path, or None / "none" for random
    weights: tests only, warns loudly) and `device` ("auto": CUDA when available). For a local copy
    of OpenAI's weights pass the "-quickgelu" model name (e.g. "ViT-B-32-quickgelu"), since a file
    does not say which activation it was trained with. `precision` "auto" is fp16 autocast on CUDA
    and fp32 on CPU; "bf16" and "fp32" force one.
    """
    spec = model if isinstance(model, ModelSpec) else resolve_model(model, pretrained, device)
    return _load_once(spec, precision)


def preprocessing_id(spec: ModelSpec) -> str:
    """How images are fed to `spec`'s model (for shard ids), without its device: the process that
    plans a run may have none of the workers' GPUs. Uses the encoder this process loaded, if any;
    else loads the model on the CPU."""
    for loaded in _loaded.values():
        if replace(loaded.spec, device=spec.device) == spec:
            return loaded.preprocessing_id
    return _load_once(replace(spec, device="cpu"), "auto").preprocessing_id


_loaded: dict[tuple[ModelSpec, str], Encoder] = {}  # what _load_encoder's cache holds
# One load at a time in a process: the task threads of one run ask for the same model together,
# and seeding random weights sets torch's global generator, so two loads at once would each get
# different weights (and a model twice in memory).
_loading = threading.Lock()


def _load_once(spec: ModelSpec, precision: str) -> Encoder:
    """The encoder of `spec` on the device this process resolves: "auto" (None) and CUDA are
    decided here, where the model runs, never by the process that planned the job."""
    resolved = replace(spec, device=resolve_device(spec.device))
    with _loading:
        return _load_encoder(resolved, precision)


@functools.lru_cache(maxsize=4)
def _load_encoder(spec: ModelSpec, precision: str) -> Encoder:
    encoder = _build_encoder(spec, precision)
    if len(_loaded) >= 4:
        _loaded.clear()
    _loaded[(spec, precision)] = encoder
    return encoder


def _build_encoder(spec: ModelSpec, precision: str) -> Encoder:
    create_kwargs: dict = {}
    pretrained = spec.pretrained
    if spec.name.startswith("hf-hub:"):
        pretrained = None
    elif pretrained is None:
        _warn_random_weights(spec.name)
    elif not _is_file(pretrained):
        # OpenAI trained with QuickGELU, and open_clip's plain "ViT-B-32" config uses nn.GELU:
        # turn QuickGELU on whenever the tag says the weights were trained with it, as the
        # "-quickgelu" config names do.
        tag_config = open_clip.get_pretrained_cfg(spec.name, pretrained)
        model_quick_gelu = open_clip.get_model_config(spec.name).get("quick_gelu", False)
        if tag_config.get("quick_gelu", False) and not model_quick_gelu:
            create_kwargs["force_quick_gelu"] = True
    try:
        # Random weights are seeded: Dask workers, and reruns that mix cached and new shards, must
        # all embed with the same model. The caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=pretrained, device=spec.device, **create_kwargs
            )
    except (RuntimeError, OSError, AssertionError, KeyError, ValueError) as error:
        if pretrained and _is_file(pretrained):  # open_clip asserts on some shape mismatches
            raise WeightsUnavailableError(
                f"checkpoint {pretrained} does not fit model {spec.name}: {error}. Pass the model "
                "name the checkpoint was trained as (e.g. 'ViT-B-32-quickgelu' for OpenAI weights)."
            ) from error
        raise WeightsUnavailableError(
            f"could not load {spec.name}: {error}. {OFFLINE_ADVICE}"
        ) from error
    model.eval()
    preprocessing = _preprocessing_of(model, spec.name)
    return Encoder(
        spec=spec,
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(spec.name),
        image_size=preprocessing.size,
        dim=_embedding_dim(model, preprocessing.size, spec.device),
        dtype=_compute_dtype(spec.device, precision),
        preprocessing=preprocessing,
    )


def _is_file(path: str) -> bool:
    return os.path.isfile(path)


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
