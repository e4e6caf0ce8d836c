"""Which model embeds the images: name, weights and device, resolved once, before any cache key.

`resolve_model` is the one place where a user's `--model`, `--pretrained` and `--device` become a
`ModelSpec`. The spec names its weights by content, so a cache key changes exactly when the
embeddings would:
- random weights (`None`, "", "none", "random": all one spec) by seed and library versions;
- a local checkpoint by the sha256 of its bytes (computed once per path, size and mtime);
- a hub tag by the revision the Hugging Face cache resolved, else by the tag and open_clip's
  version.

The project's tiny test model is registered with open_clip from `inmap/model_configs/`, the way
open_clip ships its own configs.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from inmap.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from inmap.errors import InputError, ModelNotFoundError, WeightsUnavailableError

TINY_MODEL = "inmap-tiny"  # tests and CI: 64 px input, 2-layer width-64 towers, random weights

RANDOM_WEIGHTS = ("", "none", "random")
HF_HUB_PREFIX = "hf-hub:"
RANDOM_WEIGHTS_SEED = 0  # random weights are reproducible across processes

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
if TINY_MODEL not in open_clip.list_models():
    open_clip.add_model_config(MODEL_CONFIG_DIR)

HUB_PROBE_SECONDS = 5.0
OFFLINE_ADVICE = (
    "To try inmap without weights, run with --model inmap-tiny --pretrained none (random "
    "weights: the pipeline runs, the labels mean nothing). If this machine is offline, either "
    "pass a local checkpoint (--pretrained "
    "/path/to/open_clip_model.safetensors on the command line, pretrained='/path/...' in Python; "
    "for OpenAI's weights name the model with -quickgelu, e.g. --model ViT-B-32-quickgelu), "
    "or fill the Hugging Face cache on a connected machine and point HF_HOME at it, with "
    "HF_HUB_OFFLINE=1 so nothing is fetched (offline, loading then fails at once instead of after "
    "a minute of retries)."
)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: part of every cache key through `weights_id`."""

    name: str  # an open_clip model name
    pretrained: str | None  # None: random weights; an absolute checkpoint path; or a hub tag
    weights_id: str  # what the weights are, by content
    # "cpu", "cuda", "cuda:1", ...; None: "auto", decided by the process that loads the model
    # (on a cluster, the worker that embeds or learns; see `resolve_model(device_here=False)`).
    device: str | None

    @property
    def key(self) -> str:
        """A short, path-safe name for this model's embedding space (the device is not part of
        it: the same weights embed alike anywhere)."""
        tag = os.path.basename(self.pretrained) if self.pretrained else "random"
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.name}-{tag}")[-48:]
        digest = hashlib.sha256(f"{self.name}\0{self.weights_id}".encode()).hexdigest()
        return f"{readable}-{digest[:8]}"


def resolve_model(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | None = "auto",
    *,
    device_here: bool = True,
) -> ModelSpec:
    """Normalise a model name, its weights and a device; fetch hub weights if needed.

    With `device_here` the device is resolved for this machine ("auto": CUDA when available). A
    job that may run elsewhere (Dask workers) passes False: "auto" stays None and a CUDA device is
    only checked for spelling: the process that loads the model decides (`inmap.encoder`).

    Raises `ModelNotFoundError` for unknown names or tags, `WeightsUnavailableError` when the
    weights cannot be had, and `InputError` for a misspelt device, or one this machine does not
    have (with `device_here`)."""
    name = normalise_name(name)
    pretrained = normalise_pretrained(pretrained)
    resolved_device = resolve_device(device) if device_here else check_device(device)
    if name.startswith(HF_HUB_PREFIX):  # the repo brings its own weights, fetched on loading
        return ModelSpec(name, name, f"{name}:open_clip-{open_clip.__version__}", resolved_device)
    if pretrained is None:
        versions = f"open_clip-{open_clip.__version__}:torch-{torch.__version__.split('+')[0]}"
        return ModelSpec(
            name, None, f"random:seed{RANDOM_WEIGHTS_SEED}:{versions}", resolved_device
        )
    if os.path.isfile(pretrained):
        return ModelSpec(name, pretrained, f"sha256:{file_sha256(pretrained)}", resolved_device)
    tag_config = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_config:
        raise _unknown_weights_error(name, pretrained)
    path = download_weights(name, pretrained, tag_config)
    revision = re.search(r"/snapshots/([0-9a-f]{40})/", path.replace(os.sep, "/"))
    if revision:
        repo = tag_config.get("hf_hub", "").strip("/")
        weights_id = f"hf:{repo}@{revision.group(1)}"
    else:
        weights_id = f"tag:{pretrained}:open_clip-{open_clip.__version__}"
    return ModelSpec(name, pretrained, weights_id, resolved_device)


def normalise_name(name: str) -> str:
    if name.startswith(HF_HUB_PREFIX):  # "hf-hub:org/repo": open_clip resolves it itself
        return name
    name = name.replace("/", "-")  # "ViT-B/32" is how OpenAI writes it
    known = open_clip.list_models()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
    if not close:  # "vit-b-32" -> "ViT-B-32"
        lowered = {known_name.lower(): known_name for known_name in known}
        close = [lowered[m] for m in difflib.get_close_matches(name.lower(), lowered, n=6)]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelNotFoundError(
        f"unknown open_clip model {name!r}.{hint} open_clip.list_models() lists all names."
    )


def normalise_pretrained(pretrained: str | os.PathLike | None) -> str | None:
    """None for random weights; an absolute path for a local file; else the tag as given."""
    if pretrained is None:
        return None
    pretrained = os.fspath(pretrained).strip()
    if pretrained.lower() in RANDOM_WEIGHTS:
        return None
    expanded = os.path.expanduser(pretrained)
    if os.path.isfile(expanded):
        return os.path.abspath(expanded)
    return pretrained


def resolve_device(device: str | None) -> str:
    """ "auto" (or None) is CUDA when available, else the CPU; anything else must exist here."""
    device = check_device(device)
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            host = socket.gethostname()
            raise InputError(f"device {device!r} was asked for; CUDA is not available on {host}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(
                f"device {device!r} does not exist on {socket.gethostname()}: "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def check_device(device: str | None) -> str | None:
    """A device's spelling, checked without asking this machine: None for "auto"."""
    if device is None or str(device) == "auto":
        return None
    try:
        return str(torch.device(str(device)))
    except RuntimeError as error:
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error


# --- weights -------------------------------------------------------------------------------------

_checksum_lock = threading.Lock()


def file_sha256(path: str) -> str:
    """sha256 of a checkpoint, remembered in ~/.cache/inmap by path, size, mtime, inode and ctime,
    so a 600 MB file is hashed once, and again whenever it is replaced: a copy that keeps the old
    mtime (`cp -p`, rsync -t, tar) still gets a new inode or ctime."""
    stat = os.stat(path)
    key = "\0".join(
        str(part)
        for part in (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino,
                     stat.st_ctime_ns)
    )  # fmt: skip
    cache_path = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "inmap"
    cache_file = cache_path / "checkpoint-sha256.json"
    with _checksum_lock:
        cache = _read_json(cache_file)
        if key in cache:
            return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _checksum_lock:
        cache = _read_json(cache_file)
        cache[key] = value
        try:
            cache_path.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home only costs hashing again next time
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def download_weights(name: str, tag: str, tag_config: dict) -> str:
    """Fetch (or find in the cache) the weights of `tag`; a clear error when that is impossible.

    When the hub's host cannot be reached at all, only the cache is tried, so an offline machine
    hears so in seconds rather than after a minute of download retries."""
    unreachable = _unreachable_hub()
    try:
        with _hub_offline(unreachable is not None):
            return open_clip.download_pretrained(tag_config)
    except Exception as error:
        repo = tag_config.get("hf_hub", "").strip("/")
        fetch = f" (e.g. `hf download {repo}`)" if repo else ""
        cause = unreachable or " ".join(str(error).split())
        if len(cause) > 400:
            cause = cause[:400].rsplit(" ", 1)[0] + " ..."
        raise WeightsUnavailableError(
            f"could not download the pretrained weights {tag!r} of {name}: {cause}. "
            + OFFLINE_ADVICE.replace("connected machine", f"connected machine{fetch}")
        ) from error


def _unreachable_hub() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None when it can (or when a proxy
    stands between, which only the download itself can tell)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return None
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        return f"{host} cannot be reached from here ({error}) and the weights are not cached"
    return None


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's offline mode for one call: the cache, or an error at once."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _unknown_weights_error(name: str, pretrained: str) -> Exception:
    looks_like_path = os.sep in pretrained or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".npz")
    )
    if looks_like_path:
        return WeightsUnavailableError(
            f"checkpoint file {pretrained} does not exist (pretrained={pretrained!r})"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    known = (
        f"known tags for {name}: {', '.join(tags)}"
        if tags
        else f"open_clip has no pretrained weights for {name}; pass a checkpoint path"
    )
    return ModelNotFoundError(f"unknown pretrained tag {pretrained!r} for {name}; {known}")
