"""A `Job`: everything one run decides before any work, in one frozen value.

Every stage takes `(item, job)`, so a fan-out reads ``.map(items, unmapped(job))`` and no stage
has a dozen positional parameters. A backfill runs one job per source prefix
(`Job.for_partition`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from inmap import layout, storage
from inmap.config import FitOptions, ProxyConfig
from inmap.decode import DEFAULT_PIXEL_BUDGET
from inmap.errors import InputError
from inmap.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec

RELEARN_POLICIES = ("grown", "always", "never")
LISTING_MODES = ("full", "after-last")
TEMPLATE_SETS = ("paper", "openai")


@dataclass(frozen=True)
class Job:
    """One run over one source prefix, writing under `output`."""

    source: str
    output: str
    model: ModelSpec
    classes: tuple[str, ...]
    run_id: str
    templates: str | tuple[str, ...] = "paper"
    hyperparameters: ProxyConfig = field(default_factory=ProxyConfig)
    fit: FitOptions = field(default_factory=FitOptions)  # its device is the model's
    batch_size: int = 64
    shard_size: int = 2000
    top_k: int = 5
    max_train_images: int | None = 200_000
    relearn: str = "grown"  # "grown" | "always" | "never": see inmap.learning.choose_proxy
    listing: str = "full"  # "full" | "after-last": see inmap.listing and the README
    read_retry_seconds: float = storage.DEFAULT_RETRY_SECONDS
    pixel_budget: int = DEFAULT_PIXEL_BUDGET
    # Non-secret fsspec options (endpoint, region, anon); see inmap.credentials.
    storage_options: Mapping[str, object] = field(default_factory=dict)
    credentials_block: str | None = None  # a Prefect AwsCredentials block, loaded by tasks
    lease: str | None = None  # the URL of the lease this run holds, checked before committing

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.relearn not in RELEARN_POLICIES:
            raise InputError(f"relearn must be one of {', '.join(RELEARN_POLICIES)}")
        if self.listing not in LISTING_MODES:
            raise InputError(f"listing must be one of {', '.join(LISTING_MODES)}")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ValueError(f"max_train_images must be at least 1, got {self.max_train_images}")
        if self.fit.device != self.model.device:  # one device for every stage
            object.__setattr__(self, "fit", replace(self.fit, device=self.model.device))

    @property
    def labelset(self) -> str:
        return layout.labelset_id(self.classes, self.model, self.templates)

    @property
    def credentials(self) -> Mapping[str, str] | None:
        """Secrets the task layer attached for the length of one task (`with_credentials`). Not a
        field: no serialisation of a Job (JSON for Prefect, pickle for Dask) carries them."""
        return self.__dict__.get(_CREDENTIALS)

    @property
    def options(self) -> dict | None:
        """fsspec storage options: the job's, with any loaded credentials."""
        credentials = self.credentials or {}
        merged = {**self.storage_options, **credentials}
        client_kwargs = {
            **dict(self.storage_options.get("client_kwargs") or {}),
            **dict(credentials.get("client_kwargs") or {}),
        }
        if client_kwargs:
            merged["client_kwargs"] = client_kwargs
        return merged or None

    @property
    def throughput(self):
        """How images are read and decoded (inmap.batches.Throughput)."""
        from inmap.batches import Throughput

        return Throughput(
            batch_size=self.batch_size,
            retry_seconds=self.read_retry_seconds,
            pixel_budget=self.pixel_budget,
        )

    def for_partition(self, source: str, run_id: str) -> Job:
        return replace(self, source=source, run_id=run_id)

    def with_credentials(self, credentials: Mapping[str, str] | None) -> Job:
        job = replace(self)
        job.__dict__[_CREDENTIALS] = credentials
        return job

    def __getstate__(self) -> dict:  # secrets never leave the process that loaded them
        return {k: v for k, v in self.__dict__.items() if k != _CREDENTIALS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


_CREDENTIALS = "_credentials"


@dataclass(frozen=True)
class JobRequest:
    """What a user asks for, as the flow's parameters give it; `make_job` checks and resolves it."""

    source: str | tuple[str, ...]
    classes: tuple[str, ...] | str
    output: str
    run_id: str
    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    device: str = "auto"
    templates: str | tuple[str, ...] = "paper"
    hyperparameters: ProxyConfig = field(default_factory=ProxyConfig)
    precision: str = "float32"
    batch_size: int = 64
    shard_size: int = 2000
    top_k: int = 5
    max_train_images: int | None = 200_000
    relearn: str = "grown"
    listing: str = "full"
    read_retry_seconds: float = storage.DEFAULT_RETRY_SECONDS
    pixel_budget: int = DEFAULT_PIXEL_BUDGET
    storage_options: Mapping[str, object] | None = None
    credentials_block: str | None = None

    @property
    def partitions(self) -> list[str]:
        """One source prefix is one partition; a list of them is a backfill."""
        sources = [self.source] if isinstance(self.source, str) else list(self.source)
        if not sources or not all(isinstance(s, str) and s.strip() for s in sources):
            raise InputError(f"source must be a prefix or a list of prefixes, got {self.source!r}")
        return sources


def make_job(request: JobRequest, credentials: Mapping[str, str] | None = None) -> Job:
    """Check a request and resolve everything a run needs before any work: the model and its
    weights (downloading them if needed), the class list, the output path, the storage options.

    `credentials` are the secrets of the request's credentials block, for reading the class list;
    the job does not keep them."""
    from inmap.classes import read_classes
    from inmap.credentials import refuse_secrets
    from inmap.model import resolve_model
    from inmap.tables import check_table_path

    options = refuse_secrets(request.storage_options)
    partitions = request.partitions
    check_table_path(request.output)
    templates = request.templates
    if not isinstance(templates, str):
        templates = tuple(templates)
    elif templates not in TEMPLATE_SETS:
        raise InputError(f"unknown template set {templates!r}; choose from {TEMPLATE_SETS}")
    model = resolve_model(request.model, request.pretrained, request.device)
    read_options = {**options, **(credentials or {})} or None
    classes = request.classes
    if not isinstance(classes, str):
        classes = list(classes)
    return Job(
        source=partitions[0],
        output=request.output,
        model=model,
        classes=tuple(read_classes(classes, read_options)),
        run_id=request.run_id,
        templates=templates,
        hyperparameters=request.hyperparameters,
        fit=FitOptions(device=model.device, precision=request.precision),
        batch_size=request.batch_size,
        shard_size=request.shard_size,
        top_k=request.top_k,
        max_train_images=request.max_train_images,
        relearn=request.relearn,
        listing=request.listing,
        read_retry_seconds=request.read_retry_seconds,
        pixel_budget=request.pixel_budget,
        storage_options=options,
        credentials_block=request.credentials_block,
    )
