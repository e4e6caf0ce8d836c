"""Maintenance of an output's tables, served as the deployment `inmap/maintain`.

It is a flow of its own, named `inmap` like the labelling flow, so that its deployment reads
`inmap/maintain` beside `inmap/label-bucket` and `inmap/backfill`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.inmap_flow import StorageOptions
from inmap.maintenance import DEFAULT_RETENTION_HOURS
from tasks import stages


@flow(name="inmap", flow_run_name="maintain {output}", persist_result=False,
      result_serializer="json")  # fmt: skip
def maintain_flow(
    output: str,
    storage_options: StorageOptions = None,
    credentials_block: str | None = None,
    retention_hours: float = DEFAULT_RETENTION_HOURS,
) -> list[str]:
    """Compact, checkpoint and vacuum the tables under `output`."""
    report = stages.maintain(output, storage_options, credentials_block, retention_hours)
    for line in report:
        get_run_logger().info(line)
    return report
