"""What a run did: the `RunSummary`, declared once, for the runs table, the Prefect artifact and
the command line's last lines."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from inmap import layout, tables
from inmap.job import Job
from inmap.schemas import RUNS_SCHEMA


@dataclass
class RunSummary:
    """One partition run. Counts are images."""

    run_id: str
    source: str
    output: str
    labelset: str
    model: str
    pretrained: str | None
    weights_id: str
    started_at: datetime
    status: str = "completed"  # "completed" | "failed"
    listed: int = 0
    embedded: int = 0
    cached: int = 0
    failed: int = 0  # decode failures and vanished objects (error rows)
    unreadable: int = 0  # still unreadable after retrying: the partition committed nothing
    predicted: int = 0
    changed_from_zero_shot: int = 0
    unknowns: int | None = None  # predicted images flagged none of the classes; None: unknown=off
    proxy_id: str | None = None
    proxy_learned: bool = False
    proxy_reason: str = ""
    proxy_images: int = 0
    listing_mark: str | None = None
    label_histogram: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    embedded_on: dict[str, int] = field(default_factory=dict)  # "host device" -> images
    finished_at: datetime | None = None

    @classmethod
    def start(cls, job: Job) -> RunSummary:
        return cls(
            run_id=job.run_id,
            source=job.source,
            output=job.output,
            labelset=job.labelset,
            model=job.model.name,
            pretrained=job.model.pretrained,
            weights_id=job.model.weights_id,
            started_at=datetime.now(timezone.utc),
        )

    def line(self) -> str:
        """The command line's summary of this run."""
        proxy = ""
        if self.proxy_id:
            how = "learned" if self.proxy_learned else "reused"
            proxy = f", proxy {self.proxy_id} {how}"
        unknowns = "" if self.unknowns is None else f" ({self.unknowns} unknown)"
        return (
            f"{self.source}: {self.predicted} predicted{unknowns}, {self.embedded} embedded, "
            f"{self.cached} cached, {self.failed} failed{proxy} -> {self.output}"
        )

    def markdown(self) -> str:
        """Counts, the proxy, warnings, time per stage and the label histogram."""
        lines = [
            f"# inmap run over `{self.source}`",
            "",
            f"Model `{self.model}` / `{self.pretrained or 'none'}`, labelset `{self.labelset}`.",
            "",
            "| listed | embedded | cached | failed | unreadable | predicted |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {self.listed} | {self.embedded} | {self.cached} | {self.failed} | "
            f"{self.unreadable} | {self.predicted} |",
            "",
        ]
        if self.embedded_on:
            lines += ["| embedded on (host device) | images |", "|---|---:|"]
            lines += [f"| {where} | {count} |" for where, count in self.embedded_on.items()]
            lines += [""]
        if self.proxy_id:
            how = "learned" if self.proxy_learned else "reused"
            lines += [f"Vision proxy `{self.proxy_id}` {how}: {self.proxy_reason}.", ""]
        if self.predicted:
            share = self.changed_from_zero_shot / self.predicted
            lines += [f"InMaP changed the zero-shot label of {share:.1%} of predicted images.", ""]
            if self.unknowns is not None:
                lines += [
                    f"{self.unknowns} of {self.predicted} predicted images "
                    f"({self.unknowns / self.predicted:.1%}) look like none of the classes "
                    "(`is_unknown`).",
                    "",
                ]
        else:
            lines += ["No image needed a prediction in this run.", ""]
        for warning in self.warnings:
            lines += [f"**Warning:** {warning}", ""]
        if self.error:
            lines += [f"**Failed:** {self.error}", ""]
        lines += ["| stage | seconds |", "|---|---:|"]
        lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in self.stage_seconds.items()]
        if self.label_histogram:
            lines += ["", "| label | images |", "|---|---:|"]
            shown = list(self.label_histogram.items())[:50]
            lines += [f"| {label} | {count} |" for label, count in shown]
            if len(self.label_histogram) > 50:
                lines.append(f"| … {len(self.label_histogram) - 50} more labels | |")
        return "\n".join(lines) + "\n"

    def row(self) -> pa.Table:
        record = asdict(self)
        record["warnings"] = list(self.warnings)
        record["stage_seconds"] = json.dumps(self.stage_seconds)
        record["embedded_on"] = json.dumps(self.embedded_on)
        return pa.Table.from_pylist([{name: record.get(name) for name in RUNS_SCHEMA.names}],
                                    schema=RUNS_SCHEMA)  # fmt: skip


def prediction_statistics(parts: Sequence[pa.Table]) -> tuple[Counter[str], int, list[str]]:
    """A run's label histogram, how many labels differ from zero-shot, and its warnings."""
    from inmap.refine import disagreement_warning

    parts = [part for part in parts if part.num_rows]
    if not parts:
        return Counter(), 0, []
    table = pa.concat_tables(parts)
    changed = pc.sum(pc.not_equal(table["class_id"], table["zero_shot_class_id"])).as_py() or 0
    warning = disagreement_warning(
        table["zero_shot_class_id"].to_numpy(),
        table["zero_shot_score"].to_numpy(),
        table["class_id"].to_numpy(),
    )
    return Counter(table["label"].to_pylist()), int(changed), [warning] if warning else []


def unknown_count(parts: Sequence[pa.Table]) -> int | None:
    """How many predicted images were flagged `is_unknown`; None when none was judged (the run's
    unknown option was "off")."""
    flags = [
        part["is_unknown"] for part in parts if part.num_rows and "is_unknown" in part.schema.names
    ]
    if not flags or all(column.null_count == len(column) for column in flags):
        return None
    return int(sum(pc.sum(column).as_py() or 0 for column in flags))


def record_run(summary: RunSummary, job: Job) -> None:
    """Append the summary to the runs table (once per run id)."""
    tables.append(
        layout.runs_dir(job.output), summary.row(), job.options, app_id=f"inmap-run-{job.run_id}"
    )


def read_runs(output: str, storage_options: dict | None = None) -> pa.Table:
    """Every recorded run, newest first."""
    runs = tables.read(layout.runs_dir(output), storage_options)
    if runs is None:
        return RUNS_SCHEMA.empty_table()
    return runs.sort_by([("started_at", "descending")])


def latest_proxy_id(job: Job) -> str | None:
    """The proxy of the labelset's latest completed run that predicted with one."""
    runs = _completed_runs(job)
    mine = runs.filter(pc.and_(pc.equal(runs["labelset"], job.labelset),
                               pc.is_valid(runs["proxy_id"])))  # fmt: skip
    if mine.num_rows == 0:
        return None
    return mine.sort_by([("finished_at", "descending")])["proxy_id"][0].as_py()


def listing_mark(job: Job) -> str | None:
    """The greatest uri listed by a completed run of this labelset over this source: where a
    cursor listing (`listing="after-last"`) starts."""
    runs = _completed_runs(job)
    mine = runs.filter(
        pc.and_(pc.equal(runs["labelset"], job.labelset), pc.equal(runs["source"], job.source))
    )
    marks = [mark for mark in mine["listing_mark"].to_pylist() if mark]
    return max(marks) if marks else None


def _completed_runs(job: Job) -> pa.Table:
    columns = ["status", "source", "labelset", "proxy_id", "listing_mark", "finished_at"]
    runs = tables.read(layout.runs_dir(job.output), job.options, columns=columns)
    if runs is None:
        return RUNS_SCHEMA.empty_table().select(columns)
    return runs.filter(pc.equal(runs["status"], "completed"))
