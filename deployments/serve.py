"""Serve `inmap/label-bucket`, `inmap/backfill` and `inmap/maintain` from this process.

    python -m deployments.serve --source s3://bucket/drops --classes s3://bucket/classes.txt \\
        --output s3://bucket/inmap --credentials-block prod-s3

`label-bucket` runs on its cron schedule with at most one run at a time, labelling new drops;
`backfill` runs only when asked (`prefect deployment run inmap/backfill --params ...`);
`maintain` compacts the output's tables daily. Every flow parameter can also be given per run with
`--params`. Secrets are never parameters: credentials come from this process's environment (AWS_*
variables, AWS_PROFILE, roles) or from the Prefect block named by --credentials-block.
"""

from __future__ import annotations

import argparse
import json
import os

from deployments.definitions import DEFINITIONS, SERVED_PARAMETERS, Definition

# A served run whose process died is marked Crashed after missed heartbeats (see the README's
# "When a run is killed"); the flow-run processes inherit this from the serving process.
HEARTBEAT_SECONDS = "30"


def build_deployments(
    *,
    parameters: dict | None = None,
    cron: dict[str, str | None] | None = None,
    task_runner: str = "thread",
    dask_address: str | None = None,
):
    """The deployments of DEFINITIONS; `parameters` (source, classes, output, ...) become the
    defaults of those that take them. `cron` overrides schedules by deployment name."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from inmap.credentials import refuse_secrets

    parameters = dict(parameters or {})
    refuse_secrets(parameters.get("storage_options"))
    # Served runs load the flow afresh in their own process, which reads these variables.
    os.environ["INMAP_TASK_RUNNER"] = task_runner
    if dask_address:
        os.environ["INMAP_DASK_ADDRESS"] = dask_address
    deployments = []
    for definition in DEFINITIONS:
        defaults = {
            name: value
            for name, value in parameters.items()
            if name in definition.served_parameters
            or (definition.takes_flow_parameters and name not in SERVED_PARAMETERS)
        }
        schedule = (cron or {}).get(definition.name, definition.cron)
        # A schedule without its required parameters would fail every tick; serve unscheduled.
        if not set(definition.required_for_schedule) <= defaults.keys():
            schedule = None
        limit = None
        if definition.concurrency_limit:
            limit = ConcurrencyLimitConfig(
                limit=definition.concurrency_limit,
                collision_strategy=ConcurrencyLimitStrategy.ENQUEUE,
            )
        deployments.append(
            _flow_of(definition).to_deployment(
                name=definition.name,
                cron=schedule,
                parameters=defaults,
                concurrency_limit=limit,
                description=definition.description,
                tags=list(definition.tags),
            )
        )
    return deployments


def _flow_of(definition: Definition):
    if definition.entrypoint.endswith(":maintain_flow"):
        from flows.maintain_flow import maintain_flow

        return maintain_flow
    from flows.inmap_flow import inmap_flow

    return inmap_flow


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
        default=env("INMAP_CRON"),
        help="label-bucket's schedule (default '*/15 * * * *'; '' for none)",
    )
    parser.add_argument(
        "--maintain-cron",
        default=env("INMAP_MAINTAIN_CRON"),
        help="maintain's schedule (default daily; '' for none)",
    )
    parser.add_argument(
        "--storage-options",
        default=env("INMAP_STORAGE_OPTIONS"),
        help="JSON dict of non-secret fsspec/s3fs options, e.g. an endpoint_url",
    )
    parser.add_argument(
        "--credentials-block",
        default=env("INMAP_CREDENTIALS_BLOCK"),
        help="name of a Prefect AwsCredentials block for S3",
    )
    parser.add_argument("--params", default=None, help="JSON dict of further flow parameters")
    parser.add_argument("--task-runner", choices=["thread", "dask"], default="thread")
    parser.add_argument("--dask-address", default=env("INMAP_DASK_ADDRESS"))
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "inmap")  # progress in run logs
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_SECONDS)
    parameters = json.loads(args.params) if args.params else {}
    for name in ("source", "classes", "output", "credentials_block"):
        if getattr(args, name):
            parameters[name] = getattr(args, name)
    if args.storage_options:
        parameters["storage_options"] = json.loads(args.storage_options)
    cron = {}
    if args.cron is not None:
        cron["label-bucket"] = args.cron or None
    if args.maintain_cron is not None:
        cron["maintain"] = args.maintain_cron or None
    from prefect import serve

    serve(
        *build_deployments(
            parameters=parameters,
            cron=cron,
            task_runner=args.task_runner,
            dask_address=args.dask_address,
        )
    )


if __name__ == "__main__":
    main()
