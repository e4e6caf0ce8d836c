"""The `inmap` command line."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest

from inmap.cli import build_parser, main


def test_help_documents_every_command():
    completed = subprocess.run(
        [sys.executable, "-m", "inmap.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "label" in completed.stdout and "eval" in completed.stdout
    label_help = build_parser().parse_args(["label", "x", "--classes", "c", "--output", "o"])
    assert label_help.model and label_help.pretrained  # defaults exist for every option


def test_label_help_lists_hyperparameters(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    out = capsys.readouterr().out
    for option in ("--classes", "--pretrained", "--tau-t", "--alpha", "--refine", "--dask-address"):
        assert option in out


@pytest.mark.usefixtures("prefect_harness")
def test_label_runs_the_flow_and_reports_counts(image_folder, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\nbird\ndog\n")
    output = tmp_path / "out"
    code = main(
        ["label", str(image_folder), "--classes", str(classes), "--output", str(output),
         "--model", "inmap-tiny", "--pretrained", "none", "--device", "cpu", "--iters", "50"]
    )  # fmt: skip
    assert code == 0
    assert "12 predicted, 12 embedded, 0 cached, 3 failed" in capsys.readouterr().out
    assert pl.read_parquet(output / "predictions" / "**" / "*.parquet").height == 12


@pytest.mark.usefixtures("prefect_harness")
def test_bad_classes_file_is_a_one_line_error_not_a_traceback(image_folder, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\n\nbird\n")
    code = main(
        ["label", str(image_folder), "--classes", str(classes), "--output", str(tmp_path / "o"),
         "--model", "inmap-tiny", "--pretrained", "none"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "inmap: error:" in err and "classes.txt line 2 is empty" in err
    assert "Traceback" not in err
