"""What a new user meets first: a mistake is one line in seconds, the console ends with the
answer, and the result commands speak table, CSV, JSON and Parquet."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import polars as pl
import pytest

from inmap.cli import main
from tests.conftest import REPO_ROOT, free_port

TINY = ["--model", "inmap-tiny", "--pretrained", "none", "--device", "cpu", "--iters", "50"]


def inmap(*args: str, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "inmap.cli", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_a_source_that_is_a_text_file_is_a_one_line_mistake(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not images")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    done = inmap("label", str(notes), "--classes", str(classes), "--output", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"inmap: error: source {notes} is a file but not an image (bmp, gif, jpeg, jpg, png, "
        "tif, tiff, webp); give a folder or prefix of images, or one image"
    ]
    assert not (tmp_path / "o").exists()


def test_unreachable_default_weights_fail_at_once_naming_the_trial_mode(tmp_path):
    # A hub at a closed port on this machine stands for a machine without internet.
    start = time.monotonic()
    done = inmap(
        "label", str(REPO_ROOT / "examples" / "images"), "--classes",
        str(REPO_ROOT / "examples" / "classes.txt"), "--output", str(tmp_path / "o"),
        env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf"),
             "HF_HUB_OFFLINE": "0"},
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("inmap: error: could not download the pretrained weights 'openai'")
    assert "--model inmap-tiny --pretrained none" in last and "--pretrained /path/" in last
    assert "Retry" not in done.stderr  # no download retries: the hub was not reachable at all
    assert elapsed < 120, f"{elapsed:.0f}s"  # imports only; the download retries took a minute


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """One real run of the command line over the repository's example images."""
    root = tmp_path_factory.mktemp("labelled")
    source = root / "images"
    shutil.copytree(REPO_ROOT / "examples" / "images", source)
    (source / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    done = inmap("label", str(source), "--classes", str(REPO_ROOT / "examples" / "classes.txt"),
                 "--output", str(root / "out"), *TINY, timeout=600)  # fmt: skip
    return root / "out", done


def test_the_console_ends_with_the_answer(labelled):
    output, done = labelled
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith(f"see: inmap errors {output}")
    assert "10 predicted" in done.stdout and "1 failed" in done.stdout
    # Prefect's INFO lines stay in the run's logs; its server's shutdown line is not last.
    assert "Stopping temporary server" not in done.stderr
    assert "Finished in state" not in done.stderr
    assert "Error logging to API" not in done.stderr


@pytest.mark.parametrize("command", ["labels", "runs", "errors"])
def test_result_commands_write_every_format(labelled, tmp_path, command, capsys):
    output, _ = labelled
    rows = {"labels": 10, "runs": 1, "errors": 1}[command]
    assert main([command, str(output), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == rows
    assert main([command, str(output), "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == rows + 1
    target = tmp_path / f"{command}.parquet"
    assert main([command, str(output), "--format", "parquet", "--to", str(target)]) == 0
    assert pl.read_parquet(target).height == rows
    assert main([command, str(output)]) == 0
    assert capsys.readouterr().out.strip()


def test_parquet_goes_to_stdout_when_it_is_not_a_terminal(labelled):
    output, _ = labelled
    done = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "labels", str(output), "--format", "parquet"],
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert pl.read_parquet(io.BytesIO(done.stdout)).height == 10


@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_runs_state_says_why_in_one_line(tmp_path):
    from flows.inmap_flow import inmap_flow

    notes = tmp_path / "notes.txt"
    notes.write_text("not images")
    state = inmap_flow(source=str(notes), classes=["cat", "dog"], output=str(tmp_path / "o"),
                       model="inmap-tiny", pretrained=None, device="cpu",
                       return_state=True)  # fmt: skip
    assert state.is_failed()
    assert state.message == f"SourceNotFoundError: {_not_an_image(notes)}"


@pytest.mark.usefixtures("prefect_harness")
def test_progress_artifacts_have_keys(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.inmap_flow import inmap_flow

    inmap_flow(source=str(REPO_ROOT / "examples" / "images"), classes=["cat", "dog", "fish"],
               output=str(tmp_path / "o"), model="inmap-tiny", pretrained=None, device="cpu",
               iters=20)  # fmt: skip
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(sort=ArtifactSort.CREATED_DESC, limit=50)
    keys = {a.key for a in artifacts if a.type == "progress"}
    assert any(key and key.startswith("inmap-embed-") for key in keys), keys
    assert any(key and key.startswith("inmap-learn-") for key in keys), keys


def _not_an_image(path) -> str:
    return (f"source {path} is a file but not an image (bmp, gif, jpeg, jpg, png, tif, tiff, "
            "webp); give a folder or prefix of images, or one image")  # fmt: skip


@pytest.mark.slow
def test_a_deployment_run_with_a_bad_value_is_refused_when_created(prefect_server, tmp_path):
    # Register label-bucket on a real server (no runner needed: nothing may start), then ask
    # for a run the way an operator does.
    register = (
        "from deployments.serve import build_deployments\n"
        "[d.apply() for d in build_deployments(parameters={'source': 'x', 'classes': ['a'], "
        "'output': 'o'})]\n"
    )
    done = subprocess.run([sys.executable, "-c", register], env=prefect_server, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "inmap/label-bucket",
         "--param", "batch_size=0"],
        env=prefect_server, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    said = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0, said
    assert "batch_size" in said and "minimum of 1" in said, said
    assert time.monotonic() - start < 120


def test_s3_without_any_credentials_is_one_line_and_never_retried(moto_endpoint, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing"
                 ).create_bucket(Bucket="no-credentials")  # fmt: skip
    # No keys, no profile, and no instance-metadata lookup (it would leave this machine).
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare |= {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "label", "s3://no-credentials/drop", "--classes",
         str(REPO_ROOT / "examples" / "classes.txt"), "--output", "s3://no-credentials/out",
         "--storage-options", json.dumps({"endpoint_url": moto_endpoint}), *TINY],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env=bare,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("inmap: error:")]
    assert len(errors) == 1 and "NoCredentialsError" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
    assert time.monotonic() - start < 120


def test_a_misspelt_option_is_one_line_naming_the_nearest(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["label", "x", "--classes", "c", "--output", "o", "--batch-sise", "3"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "inmap: error: unrecognized arguments: --batch-sise 3 (did you mean --batch-size?); "
        "see inmap COMMAND --help"
    ]


def test_a_misspelt_required_option_is_named_not_reported_missing(capsys):
    """`--clases` also leaves --classes missing: the line names the typo, not the absence."""
    for argv, said in [
        (["label", "x", "--clases", "c", "--output", "o"],
         "inmap: error: unrecognized arguments: --clases (did you mean --classes?); "
         "see inmap COMMAND --help"),
        (["label", "x", "--class", "c"],  # an abbreviation argparse takes; --output is missing
         "inmap label: error: the following arguments are required: --output; "
         "see inmap label --help"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [said], argv
