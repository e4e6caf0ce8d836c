"""The `inmap` command line: quick help, one-line mistakes, and looking at results."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from inmap.cli import main
from tests.conftest import REPO_ROOT, read_delta


def test_help_is_quick_and_documents_every_command():
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "--help"], capture_output=True, text=True, check=True
    )
    elapsed = time.perf_counter() - start
    for command in ("label", "runs", "labels", "errors", "maintain", "eval"):
        assert command in completed.stdout
    # No torch, open_clip or Prefect at import: checked by what is loaded, not by a clock.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, inmap.cli; inmap.cli.build_parser();"
         "print(' '.join(m for m in ('torch', 'open_clip', 'prefect') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert loaded == "", f"--help imports {loaded} ({elapsed:.1f}s)"


def test_label_help_lists_hyperparameters(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    out = capsys.readouterr().out
    for option in ("--classes", "--pretrained", "--tau-t", "--alpha", "--refine", "--dask-address",
                   "--credentials-block", "--relearn", "--listing", "--lease-wait"):  # fmt: skip
        assert option in out


TINY = ["--model", "inmap-tiny", "--pretrained", "none", "--device", "cpu", "--iters", "50"]


@pytest.mark.usefixtures("prefect_harness")
def test_label_runs_the_flow_and_the_results_can_be_read_back(image_folder, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\nbird\ndog\n")
    output = tmp_path / "out"
    args = ["label", str(image_folder), "--classes", str(classes), "--output", str(output)]
    assert main([*args, *TINY, "--no-progress"]) == 0
    assert "12 predicted, 12 embedded, 0 cached, 3 failed" in capsys.readouterr().out
    assert read_delta(output / "predictions").height == 12

    assert main(["runs", str(output)]) == 0
    runs = capsys.readouterr().out
    assert "completed" in runs and "(learned)" in runs and str(image_folder) in runs
    assert main(["labels", str(output), "--format", "csv"]) == 0
    labels = capsys.readouterr().out.strip().splitlines()
    assert labels[0].startswith('"uri","etag","label"') and len(labels) == 13
    assert main(["errors", str(output)]) == 0
    errors = capsys.readouterr().out
    assert "3 failed image(s): 3 decode" in errors and "truncated.jpg" in errors
    parquet = tmp_path / "labels.parquet"
    assert main(["labels", str(output), "--format", "parquet", "--to", str(parquet)]) == 0
    import polars as pl

    assert pl.read_parquet(parquet).height == 12
    assert main(["maintain", str(output)]) == 0
    assert "predictions" in capsys.readouterr().out


def test_bad_classes_file_is_a_one_line_error_before_anything_starts(image_folder, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\n\nbird\n")
    completed = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "label", str(image_folder), "--classes", str(classes),
         "--output", str(tmp_path / "o"), *TINY],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip() == f"inmap: error: classes file {classes} line 2 is empty"


@pytest.mark.parametrize("mistake", ["missing source", "output is a file"])
def test_a_missing_source_or_an_output_that_is_a_file_is_one_line_before_anything_starts(
    image_folder, tmp_path, mistake
):
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\nbird\n")
    source, output = image_folder, tmp_path / "o"
    if mistake == "missing source":
        source = tmp_path / "no such folder"
        expected = f"inmap: error: source {source} does not exist"
    else:
        output.write_text("not a folder")
        expected = f"inmap: error: output {output} is a file; the output must be a folder"
        expected += " (or a prefix)"
    completed = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "label", str(source), "--classes", str(classes),
         "--output", str(output), *TINY],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip() == expected  # no server started, no traceback


def test_looking_at_a_path_where_no_run_wrote_is_a_one_line_mistake(tmp_path, capsys):
    for command in ("runs", "labels", "errors"):
        assert main([command, str(tmp_path / "typo")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"inmap: error: no inmap output at {tmp_path / 'typo'}: no run has recorded anything "
            "there; check the path (it is what `inmap label --output` was given)"
        )
    assert main(["maintain", str(tmp_path), "--retention-hours", "-5"]) == 2
    assert "--retention-hours: must be >= 0, got -5.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('{"key": "AKIA", "secret": "s"}', "hold secret field(s) key, secret"),
        (
            '{"client_kwargs": {"aws_secret_access_key": "s"}}',
            "client_kwargs.aws_secret_access_key",
        ),
        ("{not json", "--storage-options: is not valid JSON"),
    ],
)
def test_secrets_in_storage_options_are_refused_naming_the_safe_ways(tmp_path, options, message):
    completed = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "label", str(tmp_path), "--classes", "c.txt",
         "--output", str(tmp_path / "o"), "--storage-options", options],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr and "Traceback" not in completed.stderr
    if "secret" in message:
        assert "AWS_PROFILE" in completed.stderr and "--credentials-block" in completed.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_live_display_in_a_terminal_shows_every_stage_and_log_lines_as_written(
    image_folder, tmp_path, capsys
):
    """In a real pseudo-terminal: a bar per stage that ends complete, and Prefect's log lines
    printed above the bars as Prefect writes them (a source named `[a]` is not taken as markup)."""
    import os
    import pty
    import re
    import shutil

    from prefect.settings import PREFECT_API_URL

    source = tmp_path / "drop [a]"
    shutil.copytree(image_folder, source)
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\nbird\ndog\n")
    command = [sys.executable, "-m", "inmap.cli", "label", str(source), "--classes", str(classes),
               "--output", str(tmp_path / "out"), *TINY, "--verbose"]  # fmt: skip
    primary, secondary = pty.openpty()
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "160"}
    process = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary,
                               env=environment, cwd=REPO_ROOT)  # fmt: skip
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(timeout=300) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    for stage, done in (("listed", "15/15"), ("embedded", "15/15"), ("learning", "50/50"),
                        ("predicted", "12/12")):  # fmt: skip
        assert re.search(rf"{stage}\s+━+ {done}", screen), f"no complete {stage} bar"
    assert f"Flow run '{source}'" in screen  # Prefect's own line (--verbose), as Prefect writes it
    assert "12 predicted, 12 embedded" in screen
    # The result tables show the names as they are too.
    for command in ("labels", "errors", "runs"):
        assert main([command, str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert f"{source}/a/" in shown and f"{source}/notes.jpg" in shown and f"{source}  " in shown


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the watchdog reads /proc")
def test_a_killed_cli_leaves_no_embedded_prefect_server_behind(image_folder, tmp_path):
    import os
    import signal

    from inmap import watchdog

    classes = tmp_path / "classes.txt"
    classes.write_text("fish\nbird\ndog\n")
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environment["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    command = [sys.executable, "-m", "inmap.cli", "label", str(image_folder), "--classes",
               str(classes), "--output", str(tmp_path / "out"), *TINY, "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, env=environment, cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    servers = []
    while not servers:
        assert process.poll() is None, "the run ended before its server was seen"
        assert time.monotonic() < deadline, "no embedded server started"
        servers = watchdog.servers_of(process.pid)
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    deadline = time.monotonic() + 30
    while not watchdog._is_zombie(servers[0]):
        assert time.monotonic() < deadline, f"the embedded server {servers[0]} outlived its CLI"
        time.sleep(0.2)
