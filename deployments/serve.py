"""Serve the `inmap/label-bucket` and `inmap/backfill` deployments from this process.

    python -m deployments.serve --source s3://bucket/drops --classes s3://bucket/classes.txt \\
        --output s3://bucket/inmap --cron "*/15 * * * *"

`label-bucket` runs on its cron schedule with at most one run at a time, labelling new drops;
`backfill` runs only when asked (`prefect deployment run inmap/backfill --params ...`). Every flow
parameter can also be given per run with `--params`.
"""

from __future__ import annotations

import argparse
import json
import os

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.inmap_flow import inmap_flow

DEFAULT_CRON = "*/15 * * * *"


def build_deployments(
    *,
    cron: str | None = DEFAULT_CRON,
    parameters: dict | None = None,
    task_runner: str = "thread",
    dask_address: str | None = None,
):
    """The two deployments of the `inmap` flow. `parameters` become label-bucket's defaults."""
    # Served runs load the flow afresh in their own process, which reads these variables.
    os.environ["INMAP_TASK_RUNNER"] = task_runner
    if dask_address:
        os.environ["INMAP_DASK_ADDRESS"] = dask_address
    flow = inmap_flow
    parameters = parameters or {}
    # A schedule without a source would fail every tick; serve it unscheduled instead.
    scheduled = bool(cron) and {"source", "classes", "output"} <= parameters.keys()
    label_bucket = flow.to_deployment(
        name="label-bucket",
        cron=cron if scheduled else None,
        parameters=parameters,
        # Scheduled runs never overlap: a tick that finds a run in progress waits for it.
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description="Label the images under a prefix that have no prediction yet.",
        tags=["inmap"],
    )
    backfill = flow.to_deployment(
        name="backfill",
        parameters={k: v for k, v in parameters.items() if k != "source"},
        description="Label whole archives: `source` is a list of prefixes, each its own partition.",
        tags=["inmap", "backfill"],
    )
    return [label_bucket, backfill]


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m deployments.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", default=env("INMAP_SOURCE"), help="prefix label-bucket watches")
    parser.add_argument("--classes", default=env("INMAP_CLASSES"), help="classes file URL")
    parser.add_argument("--output", default=env("INMAP_OUTPUT"), help="output prefix")
    parser.add_argument(
        "--cron",
        default=env("INMAP_CRON", DEFAULT_CRON),
        help=f"label-bucket schedule (default {DEFAULT_CRON!r}; '' for none)",
    )
    parser.add_argument(
        "--storage-options",
        default=env("INMAP_STORAGE_OPTIONS"),
        help="JSON dict of fsspec/s3fs options, e.g. an endpoint_url",
    )
    parser.add_argument("--params", default=None, help="JSON dict of further flow parameters")
    parser.add_argument("--task-runner", choices=["thread", "dask"], default="thread")
    parser.add_argument("--dask-address", default=env("INMAP_DASK_ADDRESS"))
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "inmap")  # progress in run logs
    parameters = json.loads(args.params) if args.params else {}
    for name in ("source", "classes", "output"):
        if getattr(args, name):
            parameters[name] = getattr(args, name)
    if args.storage_options:
        parameters["storage_options"] = json.loads(args.storage_options)
    serve(
        *build_deployments(
            cron=args.cron or None,
            parameters=parameters,
            task_runner=args.task_runner,
            dask_address=args.dask_address,
        )
    )


if __name__ == "__main__":
    main()
