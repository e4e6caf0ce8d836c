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
import importlib
import json
import os

from deployments.definitions import DEFINITIONS, SERVED_PARAMETERS, Definition
from inmap.cli import add_options
from inmap.errors import InputError
from inmap.options import RunnerOptions

# A run whose process was killed must not hold label-bucket's concurrency slot: Prefect renews a
# running run's slot for 300 s at a time, and only a final state frees it at once. So served runs
# send a heartbeat every HEARTBEAT_SECONDS, an automation marks a run Crashed after
# ZOMBIE_SECONDS without one, and a restarted serving process crashes the runs it left behind.
HEARTBEAT_SECONDS = 30
ZOMBIE_SECONDS = 90
ZOMBIE_AUTOMATION = "inmap: crash flow runs without a heartbeat"


def build_deployments(
    *,
    parameters: dict | None = None,
    cron: dict[str, str | None] | None = None,
    runner: RunnerOptions | None = None,
):
    """The deployments of DEFINITIONS; `parameters` (source, classes, output, ...) become the
    defaults of those that take them. `cron` overrides schedules by deployment name. `runner`'s
    given options are exported as the INMAP_* variables a served run reads."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from inmap.credentials import refuse_secrets

    parameters = dict(parameters or {})
    refuse_secrets(parameters.get("storage_options"))
    # Served runs load the flow afresh in their own process, which reads these variables.
    if runner is not None:
        runner.runner  # noqa: B018  (refuses contradicting options here, not in every run)
        for name in runner.model_fields_set:
            value = getattr(runner, name)
            os.environ[RunnerOptions.ENVIRONMENT[name]] = (
                ("1" if value else "") if isinstance(value, bool) else str(value)
            )
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
    module, name = definition.entrypoint.split(":")
    return getattr(importlib.import_module(module), name)


def parser() -> argparse.ArgumentParser:
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
    add_options(parser, RunnerOptions)  # --task-runner, --dask-address, ... as `inmap label` has
    return parser


def main(argv: list[str] | None = None) -> None:
    options = parser()
    args = options.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "inmap")  # progress in run logs
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
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

    given = {name: getattr(args, name) for name in RunnerOptions.model_fields if name in args}
    try:
        runner = RunnerOptions.parse(given, flags=True)
        deployments = build_deployments(parameters=parameters, cron=cron, runner=runner)
    except InputError as error:  # a bad option, or secrets in --storage-options: nothing served
        options.exit(2, f"deployments.serve: error: {error}\n")
    ensure_zombie_automation()
    crash_runs_left_behind([d.name for d in deployments])
    serve(*deployments, heartbeat_seconds=HEARTBEAT_SECONDS)


def ensure_zombie_automation() -> None:
    """Create, once per server, the automation that marks a flow run Crashed when its heartbeats
    stop (its process was killed), which frees its concurrency slot at once."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:  # none yet
        pass
    final = ("Completed", "Failed", "Cancelled", "Crashed")
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in final)},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_SECONDS),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {ZOMBIE_SECONDS}s: the flow-run process is gone.",
            )
        ],
    ).create()


def crash_runs_left_behind(deployment_names: list[str]) -> None:
    """Mark Crashed the runs of these deployments still Running or Pending when this serving
    process starts: with one serving process per deployment, they died with its predecessor."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                )
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=deployment_names)),
        )
        # Their partition subflows ran in the same process: crash those too.
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id for run in runs]),
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                ),
            )
        ) if runs else []  # fmt: skip
        for run in [*runs, *children]:
            client.set_flow_run_state(
                run.id,
                Crashed(message="its serving process was restarted; the run died with it"),
                force=True,
            )


if __name__ == "__main__":
    main()
