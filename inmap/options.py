"""Every option, declared once: its name, type, default, bounds or choices, and help.

Everything else is derived from these models:
- the `inmap label`, `inmap maintain` and `inmap eval` flags, and those of
  `python -m deployments.serve` (`inmap.cli.add_options` walks the fields); `label` and `eval`
  share the model (`EncoderOptions`) and the method (`MethodOptions`);
- the flows' parameters, and so a deployment's parameter schema, which Prefect checks when a run
  is created (`takes_options` gives a flow the signature of a model);
- the `Job` (`inmap.job.Job.settings` is a `RunOptions`).

Adding an option is one field here and the code that uses it. The models are light (pydantic
only), so `inmap --help` stays quick.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from inmap.config import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    LEASE_TTL,
    LEASE_WAIT,
    PRECISIONS,
    REFINEMENTS,
    ProxyConfig,
)
from inmap.credentials import STORAGE_OPTIONS_SCHEMA, refuse_secrets
from inmap.errors import OptionError

TEMPLATE_SETS = ("paper", "openai")
# auto, cpu, cuda, cuda:N, mps: checked for existence where the work runs, not here.
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
# A deployment refuses secret option names before Prefect stores a run's parameters.
StorageOptions = Annotated[dict | None, WithJsonSchema(STORAGE_OPTIONS_SCHEMA)]


class Options(BaseModel):
    """A frozen set of options; unknown names are mistakes, not ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def parse(cls, values: Mapping[str, Any], *, flags: bool = False):
        """Check `values`; a mistake is one `OptionError` line that names the option (as a
        command-line flag when `flags`) and what it takes."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as error:
            raise OptionError(_one_line(error, flags)) from None

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {name: f.default for name, f in cls.model_fields.items() if not f.is_required()}


class StorageAccess(Options):
    """Where and how to reach storage. Never a secret: see inmap.credentials."""

    storage_options: StorageOptions = Field(
        None,
        description='JSON dict of non-secret fsspec options, e.g. {"endpoint_url": "http://..."}; '
        "credentials come from the environment, a profile, a role or a credentials block",
    )
    credentials_block: str | None = Field(
        None, description="name of a Prefect credentials block holding the storage credentials"
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _storage_options(cls, value):
        value = _json_text(value, "storage_options")
        return refuse_secrets(value) or None  # the one boundary where secrets are refused


class EncoderOptions(Options):
    """The CLIP model that embeds images and class names, and where it runs."""

    model: str = Field(DEFAULT_MODEL, description="open_clip model name, or hf-hub:org/repo")
    pretrained: str | None = Field(
        DEFAULT_PRETRAINED,
        description="pretrained tag, local checkpoint path, or 'none' for random weights",
    )
    templates: Literal["paper", "openai"] | list[str] = Field(
        "paper", description="prompt templates: 'paper' (7), 'openai' (80), or a JSON list"
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,  # the schema's check; `_device` says it in words first
        description="auto, cpu, cuda or cuda:N, for every stage; auto is decided where the work "
        "runs",
    )
    batch_size: int = Field(64, ge=1, description="images per model batch")

    @field_validator("templates", mode="before")
    @classmethod
    def _templates(cls, value):
        value = _json_text(value, "templates") if str(value).startswith("[") else value
        if isinstance(value, (list, tuple)) and not all(
            isinstance(t, str) and "{}" in t for t in value
        ):
            raise ValueError("every template must be a string with {} where the class name goes")
        return list(value) if isinstance(value, tuple) else value

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value):
        if not isinstance(value, str) or not re.match(DEVICE_PATTERN, value):
            raise ValueError("use auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, value):
        return None if value is None or str(value).strip().lower() in ("", "none") else value


class MethodOptions(Options):
    """InMaP's hyper-parameters (the paper's by default, from ProxyConfig) and the arithmetic
    of the fit."""

    precision: Literal[PRECISIONS] = Field(
        "float32", description="proxy-learning arithmetic; tf32/bf16 are faster on GPUs"
    )
    tau_t: float = Field(ProxyConfig.tau_t, gt=0, description="temperature of the pseudo-labels")
    tau_i: float = Field(ProxyConfig.tau_i, gt=0, description="temperature of the proxy softmax")
    alpha: float = Field(
        ProxyConfig.alpha, ge=0, le=1, description="pseudo-labels above this become one-hot"
    )
    gamma: float = Field(
        ProxyConfig.gamma, ge=0, description="Sinkhorn class marginal ∝ mass^γ; 0 is uniform"
    )
    lr: float = Field(ProxyConfig.lr, gt=0, description="proxy-learning step size")
    iters: int = Field(ProxyConfig.iters, ge=0, description="proxy-learning steps")
    sinkhorn_iters: int = Field(ProxyConfig.sinkhorn_iters, ge=0, description="Sinkhorn rounds")
    refine: Literal[REFINEMENTS] = Field(
        ProxyConfig.refine,
        description="pseudo-label refinement: adaptive is safe on skewed drops, sinkhorn is the "
        "paper's",
    )

    @property
    def hyperparameters(self) -> ProxyConfig:
        return ProxyConfig(**{f.name: getattr(self, f.name) for f in fields(ProxyConfig)})


class RunOptions(MethodOptions, EncoderOptions, StorageAccess):
    """How a run labels: the model, the method, the batching and the bookkeeping."""

    shard_size: int = Field(2000, ge=1, description="images per embedding shard")
    max_train_images: int | None = Field(
        200_000, ge=1, description="learn the proxy on a uniform sample above this many images"
    )
    top_k: int = Field(5, ge=1, description="labels kept per image, best first")
    relearn: Literal["grown", "always", "never"] = Field(
        "grown",
        description="learn a new proxy: when the archive grew by 10%, every run, or never",
    )
    listing: Literal["full", "after-last"] = Field(
        "full",
        description="list everything, or only keys after the last run's (drops whose keys sort "
        "by arrival)",
    )
    read_retry_seconds: float = Field(
        120.0, ge=0, description="keep retrying an object that fails to read for this long"
    )
    pixel_budget: int = Field(
        256_000_000, ge=1, description="decoded pixels in flight across decode threads"
    )
    lease_wait: float = Field(
        LEASE_WAIT, ge=0, description="seconds to wait for another run on the same output"
    )
    lease_ttl: float = Field(
        LEASE_TTL,
        ge=10,
        description="seconds this run's lease outlives its last renewal (renewed every third of "
        "it): how soon the next run may take over the output if this one is killed",
    )
    unknown: Literal["off", "auto"] = Field(
        "off",
        description="auto: flag images that look like none of the classes (is_unknown), with a "
        "threshold chosen from the drop; unknown_score is written either way",
    )


class RunRequest(RunOptions):
    """One run as a user asks for it: what to label, with which classes, where to write."""

    source: str | list[str] = Field(
        description="image prefix(es): a folder, s3://bucket/prefix, gs://, az://, or one image; "
        "a list is a backfill, one partition each"
    )
    classes: str | list[str] = Field(
        description="class names: a text file (one per line) or a JSON list, at any URL"
    )
    output: str = Field(description="output prefix: a folder, s3://..., gs://..., az://...")

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value):
        sources = [value] if isinstance(value, str) else list(value or [])
        if not sources or not all(isinstance(s, str) and s.strip() for s in sources):
            raise ValueError("give a prefix or a list of prefixes")
        return sources[0] if len(sources) == 1 else sources

    @property
    def partitions(self) -> list[str]:
        """One source prefix is one partition; a list of them is a backfill."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @property
    def settings(self) -> RunOptions:
        return RunOptions.model_validate(self.model_dump(include=set(RunOptions.model_fields)))


class EvalRequest(MethodOptions, EncoderOptions):
    """`inmap eval`: skewed (and open-set) drops of a labelled set, top-1 per method. The model
    options matter only where images or class names must be embedded; `refine` is not one of
    them, since --methods names the refinements compared."""

    source: str = Field(
        description="labelled features (.npz, Parquet file or folder) or a folder of labelled "
        "images (class per sub-folder, or nXXXXXXXX_<class>.JPEG names)"
    )
    classes: str | None = Field(
        None,
        description="class names: a text file (one per line) or JSON list; default the npz's "
        "classnames or the distinct labels",
    )
    scenarios: str | None = Field(
        None, description="comma-separated drops to draw (default all, listed below)"
    )
    seeds: int = Field(5, ge=1, description="drops per scenario")
    first_seed: int = Field(0, ge=0, description="seed of the first drop")
    methods: str | None = Field(
        None,
        description="comma-separated: zero-shot and refine= values such as adaptive, sinkhorn, "
        "none (default zero-shot,sinkhorn,adaptive)",
    )
    text_proxy: str | None = Field(
        None,
        description=".npy (C, d) zero-shot weights in class order, instead of building them with "
        "--model",
    )
    open_set: bool = Field(
        False,
        description="also draw drops where some classes are unlisted, and report how well "
        "unknown_score separates them (AUROC) and what the label-free threshold flags",
    )
    vocabulary: float | None = Field(
        None,
        ge=0,
        description="with --open-set: classes held out as the negative vocabulary, a count or a "
        "share below 1 (default: half the classes)",
    )


class MaintainRequest(StorageAccess):
    """Compaction and cleanup of an output's tables."""

    output: str = Field(description="the output prefix given to `inmap label --output`")
    retention_hours: float = Field(
        168.0,
        ge=0,
        description="keep unreferenced table files this long, for readers of older versions",
    )


class RunnerOptions(Options):
    """Where a run's tasks execute. Not flow parameters: they pick the flow's task runner (the
    command line's flags; a served deployment reads INMAP_<NAME> from its environment)."""

    task_runner: Literal["thread", "dask"] | None = Field(
        None,
        description="thread: one process (default); dask: prefect-dask on a local cluster or "
        "--dask-address",
    )
    dask_address: str | None = Field(
        None, description="tcp://host:8786 of an existing Dask cluster (selects dask)"
    )
    dask_workers: int | None = Field(
        None, ge=1, description="workers of a local Dask cluster (selects dask; default 2)"
    )  # 2 is LOCAL_WORKERS
    dask_gpus: bool = Field(
        False,
        description="each embedding task holds one GPU: workers need --resources GPU=1 (selects "
        "dask; a local cluster starts one worker per GPU)",
    )

    # A served deployment's runner comes from the serving process's environment.
    ENVIRONMENT: ClassVar[dict[str, str]] = {
        "task_runner": "INMAP_TASK_RUNNER",
        "dask_address": "INMAP_DASK_ADDRESS",
        "dask_workers": "INMAP_DASK_WORKERS",
        "dask_gpus": "INMAP_DASK_GPU_RESOURCES",  # "1"
    }
    LOCAL_WORKERS: ClassVar[int] = 2  # a local cluster's size when --dask-workers is not given

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> RunnerOptions:
        given = {name: environ[var] for name, var in cls.ENVIRONMENT.items() if environ.get(var)}
        if "dask_gpus" in given:
            given["dask_gpus"] = given["dask_gpus"] == "1"
        return cls.parse(given)

    @property
    def workers(self) -> int:
        return self.dask_workers or self.LOCAL_WORKERS

    @property
    def runner(self) -> str:
        selected = self.dask_address or self.dask_workers is not None or self.dask_gpus
        if self.task_runner == "thread" and selected:
            raise OptionError(
                "--dask-address, --dask-workers and --dask-gpus run on Dask; drop them or use "
                "--task-runner dask"
            )
        return self.task_runner or ("dask" if selected else "thread")


def takes_options(model: type[Options]) -> Callable:
    """Give a `def f(**parameters)` the keyword-only signature of `model`'s fields, with their
    types, bounds and choices, and a docstring naming each: Prefect derives a flow's parameter
    schema from them, so a deployment rejects a bad value when the run is created."""

    def decorate(function: Callable) -> Callable:
        required = {n: f for n, f in model.model_fields.items() if f.is_required()}
        optional = {n: f for n, f in model.model_fields.items() if not f.is_required()}
        parameters = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if name in required else field.default,
                annotation=Annotated[field.annotation, field],
            )
            for name, field in {**required, **optional}.items()
        ]
        returns = inspect.signature(function).return_annotation
        function.__signature__ = inspect.Signature(parameters, return_annotation=returns)
        function.__annotations__ = {p.name: p.annotation for p in parameters}
        arguments = "\n".join(
            f"    {name}: {field.description}" for name, field in {**required, **optional}.items()
        )
        function.__doc__ = f"{inspect.cleandoc(function.__doc__ or '')}\n\nArgs:\n{arguments}\n"
        return function

    return decorate


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_UNIONS = (Union, type(int | None))


def choices(annotation) -> tuple | None:
    """The choices of a Literal annotation, or of the Literal in a union."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in _UNIONS:
        for member in get_args(annotation):
            if get_origin(member) is Literal:
                return get_args(member)
    return None


def is_literal(annotation) -> bool:
    """A Literal, or an optional one: a flag whose choices are all it takes."""
    members = get_args(annotation) if get_origin(annotation) in _UNIONS else (annotation,)
    return all(get_origin(m) is Literal or m is type(None) for m in members)


def takes_list(annotation) -> bool:
    members = get_args(annotation) if get_origin(annotation) in _UNIONS else (annotation,)
    return any(m is list or get_origin(m) is list for m in members)


def scalar_type(annotation) -> type:
    """How a flag's text is read: bool, int or float where the option is one, else str (JSON
    lists and dicts are read by the model's validators)."""
    members = get_args(annotation) if get_origin(annotation) in _UNIONS else (annotation,)
    for kind in (bool, int, float):
        if kind in members:
            return kind
    return str


def _json_text(value, name: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except ValueError as error:
        raise ValueError(f"is not valid JSON ({error})") from None


_SHORTER = (
    ("Input should be", "must be"),
    ("greater than or equal to", ">="),
    ("less than or equal to", "<="),
    ("greater than", ">"),
    ("less than", "<"),
    ("a valid", "a"),
)


def _one_line(error: ValidationError, flags: bool) -> str:
    problems, seen = [], set()
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"][:1]) or "options"
        if where in seen:  # a union reports once per member; its first says enough
            continue
        seen.add(where)
        name = flag(where) if flags else where
        message = item["msg"].removeprefix("Value error, ")
        for said, short in _SHORTER:
            message = message.replace(said, short)
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown option {name}")
        elif "input" in item and item["type"] != "missing":
            problems.append(f"{name}: {message}, got {item['input']!r}")
        else:
            problems.append(f"{name}: {message}")
    return "; ".join(problems)
