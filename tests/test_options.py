"""Every option is declared once, in inmap.options: the command line's flags, the flows'
parameters (so a deployment's parameter schema) and the Job come from it, bounds included."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from inmap.cli import build_parser
from inmap.errors import OptionError
from inmap.options import MaintainRequest, RunnerOptions, RunOptions, RunRequest, flag
from tests.conftest import REPO_ROOT

CLI_ONLY = {"--help", "--no-progress", "--verbose"}
REQUIRED = {"source": "x", "classes": "c.txt", "output": "out"}


def flags_of(command: str) -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {
        (action.option_strings[-1] if action.option_strings else action.dest): action
        for action in sub._actions
    }


def test_every_label_flag_is_a_declared_option_and_every_option_a_flag():
    declared = {**RunRequest.model_fields, **RunnerOptions.model_fields}
    flags = flags_of("label")
    expected = {("source" if name == "source" else flag(name)) for name in declared}
    assert set(flags) - CLI_ONLY == expected
    for name, field in declared.items():
        action = flags[name if name == "source" else flag(name)]
        if field.description:
            assert field.description.split(",")[0].replace("%", "%%") in action.help, name
        if not field.is_required() and field.default is not None:
            assert f"(default: {field.default})" in action.help, name


def test_every_eval_flag_is_a_declared_option_and_every_option_a_flag():
    """`inmap eval` shares the model and method options with `inmap label`: one declaration."""
    from inmap.options import EncoderOptions, EvalRequest, MethodOptions

    # --methods names the refinements compared; the fit's arithmetic is not eval's to choose.
    declared = {
        n: f for n, f in EvalRequest.model_fields.items() if n not in ("refine", "precision")
    }
    shared = {*EncoderOptions.model_fields, *MethodOptions.model_fields}
    flags = flags_of("eval")
    assert set(flags) - {"--help"} == {n if n == "source" else flag(n) for n in declared}
    label = flags_of("label")
    for name, field in declared.items():
        action = flags[name if name == "source" else flag(name)]
        assert field.description.split(",")[0].replace("%", "%%") in action.help, name
        if name in shared:  # the same option reads the same in both commands
            assert action.help == label[flag(name)].help, name
    for argv, said in [
        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
        (["--tau-t", "-1"], "--tau-t: must be > 0, got -1.0"),
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--vocabulary", "-2"], "--vocabulary: must be >= 0, got -2.0"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "inmap.cli", "eval", "features.npz", *argv],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and done.stderr.strip() == f"inmap: error: {said}", done.stderr


def test_the_flows_parameters_are_the_declaration():
    from flows.inmap_flow import inmap_flow
    from flows.maintain_flow import maintain_flow

    for flow, model in ((inmap_flow, RunRequest), (maintain_flow, MaintainRequest)):
        schema = flow.parameters.model_dump()
        assert set(schema["properties"]) == set(model.model_fields)
        assert set(schema["required"]) == {n for n, f in model.model_fields.items()
                                           if f.is_required()}  # fmt: skip
        for name, field in model.model_fields.items():
            prop = schema["properties"][name]
            if not field.is_required():
                assert prop["default"] == field.default, name
            assert prop.get("description") == field.description, name
    batch = inmap_flow.parameters.model_dump()["properties"]["batch_size"]
    assert batch["minimum"] == 1  # a bound travels into the deployment's schema
    relearn = inmap_flow.parameters.model_dump()["properties"]["relearn"]
    assert relearn["enum"] == ["grown", "always", "never"]


def test_the_job_holds_the_declared_options():
    from dataclasses import fields

    from inmap.job import Job

    by_name = {f.name: f for f in fields(Job)}
    assert by_name["settings"].type in ("RunOptions", RunOptions)
    # Nothing a user chooses is a field of its own: it is in `settings`, once. The rest is what
    # preparing the run resolved: the partition, the class list, the model with its weights.
    assert set(by_name) == {"source", "output", "classes", "model", "run_id", "lease", "settings"}


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"batch_size": 0}, "--batch-size: must be >= 1, got 0"),
        ({"shard_size": -1}, "--shard-size: must be >= 1, got -1"),
        ({"iters": -3}, "--iters: must be >= 0, got -3"),
        ({"lease_wait": -5}, "--lease-wait: must be >= 0, got -5"),
        ({"relearn": "often"}, "--relearn: must be 'grown', 'always' or 'never'"),
        ({"device": "gpu"}, "--device: use auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
        ({"templates": '["a photo"]'}, "--templates: every template must be a string with {}"),
        ({"colour": "red"}, "unknown option --colour"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option(given, said):
    with pytest.raises(OptionError) as caught:
        RunRequest.parse({**REQUIRED, **given}, flags=True)
    assert said in str(caught.value)
    assert "\n" not in str(caught.value)


def test_dask_options_select_dask_or_are_refused():
    assert RunnerOptions.parse({}).runner == "thread"
    assert RunnerOptions.parse({"dask_workers": 2}).runner == "dask"
    assert RunnerOptions.parse({"dask_gpus": True}).runner == "dask"
    with pytest.raises(OptionError, match="--task-runner dask"):
        _ = RunnerOptions.parse({"task_runner": "thread", "dask_workers": 2}).runner


@pytest.mark.parametrize(
    "flags",
    [["--batch-size", "0"], ["--shard-size", "-1"], ["--iters", "-3"], ["--lease-wait", "-5"],
     ["--task-runner", "thread", "--dask-workers", "2"]],
)  # fmt: skip
def test_a_bad_flag_exits_2_in_one_line_before_any_server(tmp_path, flags):
    (tmp_path / "images").mkdir()
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    start = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "label", str(tmp_path / "images"), "--classes",
         str(classes), "--output", str(tmp_path / "out"), *flags],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inmap: error: "), completed.stderr
    assert "starting" not in completed.stderr  # refused before Prefect's server
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - start < 60  # generous: the work is milliseconds, the machine busy
