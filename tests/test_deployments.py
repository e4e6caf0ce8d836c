"""The deployments are defined once: `deployments/serve.py` builds them from the definitions, and
`deployments/prefect.yaml` says the same."""

from __future__ import annotations

import yaml

from deployments.definitions import DEFINITIONS
from deployments.serve import build_deployments
from tests.conftest import REPO_ROOT


def test_prefect_yaml_agrees_with_the_definitions():
    config = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in config["deployments"]}
    assert set(by_name) == {d.name for d in DEFINITIONS}
    for definition in DEFINITIONS:
        entry = by_name[definition.name]
        assert entry["entrypoint"] == definition.entrypoint
        assert entry["description"] == definition.description
        assert tuple(entry["tags"]) == definition.tags
        crons = [s["cron"] for s in entry.get("schedules", [])]
        assert crons == ([definition.cron] if definition.cron else [])
        limit = entry.get("concurrency_limit", {}).get("limit")
        assert limit == definition.concurrency_limit
        assert "storage_options" not in entry.get("parameters", {})  # never secrets in yaml


def test_served_deployments_follow_the_definitions():
    served = build_deployments(
        parameters={
            "source": "s3://b/drops",
            "classes": ["a", "b"],
            "output": "s3://b/out",
            "top_k": 3,
        }  # fmt: skip
    )
    assert [d.name for d in served] == [d.name for d in DEFINITIONS]
    for deployment, definition in zip(served, DEFINITIONS, strict=True):
        assert deployment.description == definition.description
        assert tuple(deployment.tags) == definition.tags
        crons = [s.schedule.cron for s in deployment.schedules or []]
        assert crons == ([definition.cron] if definition.cron else [])
        assert deployment.flow_name == "inmap"
    label_bucket, backfill, maintain = served
    assert label_bucket.parameters["source"] == "s3://b/drops"
    assert label_bucket.parameters["top_k"] == 3 and backfill.parameters["top_k"] == 3
    assert "source" not in backfill.parameters
    assert maintain.parameters == {"output": "s3://b/out"}


def test_serve_takes_the_runner_options_inmap_label_takes(monkeypatch, capsys):
    """The serving process's runner flags are RunnerOptions' (as `inmap label` has them), and
    what it is given reaches its served runs through the INMAP_* variables they read."""
    from deployments import serve
    from inmap.options import RunnerOptions

    for variable in RunnerOptions.ENVIRONMENT.values():
        monkeypatch.setenv(variable, "")  # so that the test's exports are undone after it
    flags = {a.dest: a.option_strings for a in serve.parser()._actions}
    for name in RunnerOptions.model_fields:
        assert flags[name] == [f"--{name.replace('_', '-')}"], name
    runner = RunnerOptions.parse({"dask_address": "tcp://gpu-node:8786", "dask_gpus": True})
    build_deployments(parameters={"output": "s3://b/out"}, runner=runner)
    import os

    served = RunnerOptions.from_environment(os.environ)  # what a served run reads
    assert (served.runner, served.dask_address, served.dask_gpus) == ("dask", "tcp://gpu-node:8786",
                                                                     True)  # fmt: skip
    # A bad value is one line and exit 2, before anything is served.
    for argv, message in [
        (["--dask-workers", "0"], "--dask-workers"),
        (["--task-runner", "thread", "--dask-gpus"], "--task-runner dask"),
    ]:
        try:
            serve.main(argv)
        except SystemExit as stop:
            assert stop.code == 2, argv
        else:
            raise AssertionError(f"{argv} was served")
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
