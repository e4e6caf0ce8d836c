"""Looking at an output without writing code: `inmap runs`, `inmap labels`, `inmap errors`."""

from __future__ import annotations

import io
import json
import sys

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from inmap import layout, tables
from inmap.errors import InputError
from inmap.report import read_runs
from inmap.schemas import ERRORS_SCHEMA, PREDICTIONS_SCHEMA

LABEL_COLUMNS = ["uri", "etag", "label", "score", "zero_shot_label", "zero_shot_score",
                 "predicted_at", "run_id", "labelset"]  # fmt: skip


def runs_text(output: str, storage_options: dict | None = None, *, limit: int = 20) -> str:
    runs = read_runs(output, storage_options).slice(0, limit)
    if runs.num_rows == 0:
        return f"no runs recorded under {output}"
    rows = []
    for run in runs.to_pylist():
        seconds = sum(json.loads(run["stage_seconds"] or "{}").values())
        proxy = run["proxy_id"] or "-"
        if run["proxy_id"]:
            proxy += " (learned)" if run["proxy_learned"] else " (reused)"
        rows.append(
            [
                f"{run['started_at']:%Y-%m-%d %H:%M:%S}",
                run["status"],
                run["source"],
                str(run["listed"]),
                str(run["embedded"]),
                str(run["cached"]),
                str(run["failed"] + run["unreadable"]),
                str(run["predicted"]),
                proxy,
                run["labelset"],
                f"{seconds:.0f}s",
            ]
        )
        if run["proxy_reason"]:
            why = "learned, as" if run["proxy_learned"] else "reused, as"
            rows.append(["", "", f"  proxy {why} {run['proxy_reason'][:200]}"] + [""] * 8)
        if run["error"]:
            rows.append(["", "", f"  error: {run['error'][:200]}"] + [""] * 8)
    head = ["started (UTC)", "status", "source", "listed", "embedded", "cached", "failed",
            "predicted", "proxy", "labelset", "time"]  # fmt: skip
    return _format(head, rows)


def latest_labels(
    output: str, storage_options: dict | None = None, *, labelset: str | None = None
) -> pa.Table:
    """The latest prediction of each image (uri) for one labelset: `labelset`, or the labelset
    of the most recent prediction."""
    url = layout.predictions_dir(output)
    if labelset is None:
        recent = tables.read(url, storage_options, columns=["labelset", "predicted_at"])
        if recent is None or recent.num_rows == 0:
            return PREDICTIONS_SCHEMA.empty_table().select(LABEL_COLUMNS)
        newest = pc.sort_indices(recent, [("predicted_at", "descending")])[0].as_py()
        labelset = recent["labelset"][newest].as_py()
    predictions = tables.read(url, storage_options, columns=LABEL_COLUMNS,
                              partition=("labelset", labelset))  # fmt: skip
    if predictions is None or predictions.num_rows == 0:
        raise InputError(f"no predictions for labelset {labelset!r} under {output}")
    # One row per uri: the most recent etag's prediction (the README's query, in polars).
    latest = (
        pl.from_arrow(predictions)
        .sort("predicted_at", descending=True)
        .unique(subset="uri", keep="first")
        .sort("uri")
    )
    return latest.to_arrow()


def write_labels(table: pa.Table, form: str, to: str | None) -> None:
    """Write labels as a text table, CSV or Parquet, to a file or stdout."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if form == "parquet":
        if not to or to == "-":
            raise InputError("--format parquet needs --to FILE")
        pq.write_table(table, to)
        return
    if form == "csv":
        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        text = buffer.getvalue().decode()
    else:
        rows = [
            [row["uri"], row["label"], f"{row['score']:.3f}", row["zero_shot_label"],
             f"{row['zero_shot_score']:.3f}"]
            for row in table.to_pylist()
        ]  # fmt: skip
        text = _format(["uri", "label", "score", "zero-shot label", "zero-shot score"], rows)
        text += f"\n{table.num_rows} image(s)\n"
    if to and to != "-":
        with open(to, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def errors_text(output: str, storage_options: dict | None = None, *, limit: int = 50) -> str:
    errors = tables.read(layout.errors_dir(output), storage_options)
    if errors is None or errors.num_rows == 0:
        return f"no failed images recorded under {output}"
    errors = errors.select(ERRORS_SCHEMA.names).sort_by([("recorded_at", "descending")])
    counts = errors.group_by("stage").aggregate([("uri", "count")]).to_pylist()
    summary = ", ".join(f"{row['uri_count']} {row['stage']}" for row in counts)
    rows = [[row["stage"], row["uri"], row["error"][:120]] for row in
            errors.slice(0, limit).to_pylist()]  # fmt: skip
    return f"{errors.num_rows} failed image(s): {summary}\n" + _format(
        ["stage", "uri", "reason"], rows
    )


def _format(head: list[str], rows: list[list[str]]) -> str:
    """A plain text table (rich's, when it is installed as Prefect's dependency)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*head, box=None, show_edge=False, pad_edge=False)
    for row in rows:  # Text: a key such as `dir [x]/a.jpg` is shown as it is, never as markup
        table.add_row(*(Text(str(cell)) for cell in row))
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()
