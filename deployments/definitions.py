"""The three deployments, defined once. `deployments/serve.py` builds them from here, and
`deployments/prefect.yaml` (for work pools) must say the same; tests/test_deployments.py checks
that it does.

- `inmap/label-bucket`: new drops, on a schedule, one run at a time;
- `inmap/backfill`: whole archives, run by hand, `source` a list of prefixes;
- `inmap/maintain`: compaction and cleanup of the output's tables, on its own schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LABEL_CRON = "*/15 * * * *"
MAINTAIN_CRON = "17 3 * * *"  # daily, off the quarter hours label-bucket runs on


@dataclass(frozen=True)
class Definition:
    name: str
    entrypoint: str  # module:flow of the installed package (no checkout needed on a worker)
    description: str
    tags: tuple[str, ...]
    cron: str | None = None
    concurrency_limit: int | None = None  # runs at once; later ones are enqueued
    # Parameters a deployment takes from the serving process's --source, --classes, --output,
    # --storage-options and --credentials-block; other --params go to the labelling flows only.
    served_parameters: tuple[str, ...] = field(default_factory=tuple)
    required_for_schedule: tuple[str, ...] = field(default_factory=tuple)
    takes_flow_parameters: bool = True


LABEL_BUCKET = Definition(
    name="label-bucket",
    entrypoint="flows.inmap_flow:inmap_flow",
    description="Label the images under a prefix that have no prediction yet.",
    tags=("inmap",),
    cron=LABEL_CRON,
    concurrency_limit=1,
    served_parameters=("source", "classes", "output", "storage_options", "credentials_block"),
    required_for_schedule=("source", "classes", "output"),
)
BACKFILL = Definition(
    name="backfill",
    entrypoint="flows.inmap_flow:inmap_flow",
    description="Label whole archives: `source` is a list of prefixes, each its own partition.",
    tags=("inmap", "backfill"),
    served_parameters=("classes", "output", "storage_options", "credentials_block"),
)
MAINTAIN = Definition(
    name="maintain",
    entrypoint="flows.maintain_flow:maintain_flow",
    description="Compact and vacuum the output's Delta tables.",
    tags=("inmap", "maintain"),
    cron=MAINTAIN_CRON,
    concurrency_limit=1,
    served_parameters=("output", "storage_options", "credentials_block"),
    required_for_schedule=("output",),
    takes_flow_parameters=False,
)
SERVED_PARAMETERS = frozenset(LABEL_BUCKET.served_parameters)
DEFINITIONS = (LABEL_BUCKET, BACKFILL, MAINTAIN)
