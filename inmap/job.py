"""A `Job`: everything one run decides before any work, in one frozen value.

Every stage takes `(item, job)`, so a fan-out reads ``.map(items, unmapped(job))`` and no stage
has a dozen positional parameters. A backfill runs one job per source prefix
(`Job.for_partition`). The options a user chose are `Job.settings`, declared in `inmap.options`;
the rest is what `inmap.prepare.prepare_job` resolved from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from inmap import layout
from inmap.config import FitOptions, ProxyConfig
from inmap.options import RunOptions

if TYPE_CHECKING:  # model.py brings torch and open_clip; reading results needs neither
    from inmap.model import ModelSpec


@dataclass(frozen=True)
class Job:
    """One run over one source prefix, writing under `output`."""

    source: str
    output: str
    model: ModelSpec
    classes: tuple[str, ...]
    run_id: str
    settings: RunOptions = field(default_factory=RunOptions)
    lease: str | None = None  # the URL of the lease this run holds, checked before committing

    @property
    def templates(self) -> str | tuple[str, ...]:
        templates = self.settings.templates
        return templates if isinstance(templates, str) else tuple(templates)

    @property
    def hyperparameters(self) -> ProxyConfig:
        return self.settings.hyperparameters

    @property
    def fit(self) -> FitOptions:
        """How the proxy is learned: on the model's device, at the chosen precision."""
        return FitOptions(device=self.model.device, precision=self.settings.precision)

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
        from inmap.credentials import merge_options

        return merge_options(self.settings.storage_options, self.credentials)

    @property
    def throughput(self):
        """How images are read and decoded (inmap.batches.Throughput)."""
        from inmap.batches import Throughput

        return Throughput(
            batch_size=self.settings.batch_size,
            retry_seconds=self.settings.read_retry_seconds,
            pixel_budget=self.settings.pixel_budget,
        )

    def for_partition(self, source: str, run_id: str) -> Job:
        return replace(self, source=source, run_id=run_id)

    def with_settings(self, **changes) -> Job:
        """The same job with some options changed (checked again)."""
        settings = RunOptions.parse({**self.settings.model_dump(), **changes})
        return replace(self, settings=settings)

    def with_credentials(self, credentials: Mapping[str, str] | None) -> Job:
        job = replace(self)
        job.__dict__[_CREDENTIALS] = credentials
        return job

    def __getstate__(self) -> dict:  # secrets never leave the process that loaded them
        return {k: v for k, v in self.__dict__.items() if k != _CREDENTIALS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


_CREDENTIALS = "_credentials"
