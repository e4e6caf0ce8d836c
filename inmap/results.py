"""Looking at an output without writing code: `inmap runs`, `inmap labels`, `inmap errors`."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from inmap import layout, tables
from inmap.errors import InputError
from inmap.report import read_runs
from inmap.schemas import ERRORS_SCHEMA, PREDICTIONS_SCHEMA

LABEL_COLUMNS = ["uri", "etag", "label", "score", "zero_shot_label", "zero_shot_score",
                 "predicted_at", "run_id", "labelset"]  # fmt: skip


FORMATS = ("table", "csv", "json", "parquet")


def recent_runs(output: str, storage_options: dict | None = None, *, limit: int = 20) -> pa.Table:
    """The most recent runs on `output`, newest first."""
    return read_runs(output, storage_options).slice(0, limit)


def runs_text(runs: pa.Table) -> str:
    if runs.num_rows == 0:
        return "no runs recorded"
    rows, notes = [], []  # notes: lines under a run's row, outside the columns
    for run in runs.to_pylist():  # an interrupted run's row has only its times and its error
        seconds = sum(json.loads(run["stage_seconds"] or "{}").values())
        proxy = run["proxy_id"] or "-"
        if run["proxy_id"]:
            proxy += " (learned)" if run["proxy_learned"] else " (reused)"
        rows.append(
            [
                f"{run['started_at']:%Y-%m-%d %H:%M:%S}",
                run["status"],
                run["source"] or "-",
                _count(run["listed"]),
                _count(run["embedded"]),
                _count(run["cached"]),
                _count(run["failed"], run["unreadable"]),
                _count(run["predicted"]),
                proxy,
                run["labelset"] or "-",
                f"{seconds:.0f}s" if run["stage_seconds"] else "-",
            ]
        )
        note = []
        if run["proxy_reason"]:
            why = "learned, as" if run["proxy_learned"] else "reused, as"
            note.append(f"proxy {why} {run['proxy_reason'][:200]}")
        if run["error"]:
            note.append(f"error: {run['error'][:200]}")
        notes.append(note)
    head = ["started (UTC)", "status", "source", "listed", "embedded", "cached", "failed",
            "predicted", "proxy", "labelset", "time"]  # fmt: skip
    head_line, *lines = _format(head, rows).splitlines()  # one line per row: cells are one line
    indent = " " * (head_line.index("status") + 2)  # under the status column
    out = [head_line]
    for line, note in zip(lines, notes, strict=True):
        out += [line, *(indent + text for text in note)]
    return "\n".join(out)


OPEN_SET_COLUMNS = ["unknown_score", "is_unknown"]  # absent from tables older than open-set runs


def latest_labels(
    output: str,
    storage_options: dict | None = None,
    *,
    labelset: str | None = None,
    unknown_only: bool = False,
) -> pa.Table:
    """The latest prediction of each image (uri) for one labelset: `labelset`, or the labelset
    of the most recent prediction; only the images flagged `is_unknown` if `unknown_only`."""
    url = layout.predictions_dir(output)
    table = tables.open_table(url, storage_options)
    present = set(table.schema().to_arrow().names) if table is not None else set()
    columns = LABEL_COLUMNS + [c for c in OPEN_SET_COLUMNS if c in present]
    if labelset is None:
        recent = tables.read(url, storage_options, columns=["labelset", "predicted_at"])
        if recent is None or recent.num_rows == 0:
            return PREDICTIONS_SCHEMA.empty_table().select(LABEL_COLUMNS)
        newest = pc.sort_indices(recent, [("predicted_at", "descending")])[0].as_py()
        labelset = recent["labelset"][newest].as_py()
    predictions = tables.read(url, storage_options, columns=columns,
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
    if unknown_only:
        flagged = pl.col("is_unknown") if "is_unknown" in latest.columns else pl.lit(False)
        latest = latest.filter(flagged.fill_null(False))
    return latest.to_arrow()


def labels_text(table: pa.Table) -> str:
    flags = "is_unknown" in table.schema.names and table["is_unknown"].null_count < len(table)
    rows = []
    for row in table.to_pylist():  # a table older than open-set runs has no is_unknown
        cells = [row["uri"], row["label"], f"{row['score']:.3f}", row["zero_shot_label"],
                 f"{row['zero_shot_score']:.3f}"]  # fmt: skip
        rows.append(cells + (["unknown" if row["is_unknown"] else ""] if flags else []))
    head = ["uri", "label", "score", "zero-shot label", "zero-shot score"] + ["none of"] * flags
    text = _format(head, rows)
    return f"{text}\n{table.num_rows} image(s)"


def write_result(table: pa.Table, form: str, to: str | None, text: Callable[[pa.Table], str]):
    """Write a result as a text table (`text` renders it), CSV, JSON (an array of rows) or
    Parquet, to the file `to` or to stdout. Parquet goes to stdout only when it is not a
    terminal."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if form not in FORMATS:
        raise InputError(f"unknown format {form!r}: choose from {', '.join(FORMATS)}")
    to_stdout = not to or to == "-"
    if form == "parquet" and to_stdout and sys.stdout.isatty():
        raise InputError("Parquet is binary: pass --to FILE, or pipe the output to a file")
    buffer = io.BytesIO()
    if form == "parquet":
        pq.write_table(table, buffer)
    elif form == "csv":
        pacsv.write_csv(_flat(table), buffer)
    elif form == "json":
        pl.from_arrow(table).write_json(buffer)
        buffer.write(b"\n")
    else:
        buffer.write((text(table) + "\n").encode())
    if to_stdout:
        sys.stdout.flush()
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.buffer.flush()
    else:
        with open(to, "wb") as f:
            f.write(buffer.getvalue())


def recent_errors(output: str, storage_options: dict | None = None, *, limit: int = 50):
    """The failed images recorded on `output`, newest first (all of them when `limit` is None)."""
    errors = tables.read(layout.errors_dir(output), storage_options)
    if errors is None:
        return ERRORS_SCHEMA.empty_table()
    errors = errors.select(ERRORS_SCHEMA.names).sort_by([("recorded_at", "descending")])
    return errors if limit is None else errors.slice(0, limit)


def errors_text(errors: pa.Table, limit: int | None = None) -> str:
    """How many failed, by stage, and the newest `limit` of them with their reasons."""
    if errors.num_rows == 0:
        return "no failed images recorded"
    counts = errors.group_by("stage").aggregate([("uri", "count")]).to_pylist()
    summary = ", ".join(f"{row['uri_count']} {row['stage']}" for row in counts)
    shown = errors if limit is None else errors.slice(0, limit)
    rows = [[row["stage"], row["uri"], row["error"][:120]] for row in shown.to_pylist()]
    return f"{errors.num_rows} failed image(s): {summary}\n" + _format(
        ["stage", "uri", "reason"], rows
    )


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _count(*counts: int | None) -> str:
    """A count, or the sum of several; "-" where the run recorded none."""
    known = [count for count in counts if count is not None]
    return str(sum(known)) if known else "-"


def _flat(table: pa.Table) -> pa.Table:
    """CSV has no lists or structs: such a column becomes its JSON text."""
    for index, column in enumerate(table.columns):
        if pa.types.is_nested(column.type):
            text = pa.array([None if v is None else json.dumps(v, default=str)
                             for v in column.to_pylist()], pa.string())  # fmt: skip
            table = table.set_column(index, table.field(index).name, text)
    return table


def _format(head: list[str], rows: list[list[str]]) -> str:
    """A plain text table (rich's, when it is installed as Prefect's dependency)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*head, box=None, show_edge=False, pad_edge=False)
    for row in rows:  # Text: a key such as `dir [x]/a.jpg` is shown as it is, never as markup;
        # a line break in a key is shown escaped, so that every row is one line
        table.add_row(*(Text(_one_line(str(cell))) for cell in row))
    # As wide as the widest row needs: a uri is never cut short or wrapped, whatever the
    # terminal (a narrower one wraps the lines itself).
    console = Console(file=io.StringIO(), width=100_000, color_system=None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().rstrip().splitlines())
