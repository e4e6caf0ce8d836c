"""Maintenance of an output's tables, served as the deployment `inmap/maintain`.

It is a flow of its own, named `inmap` like the labelling flow, so that its deployment reads
`inmap/maintain` beside `inmap/label-bucket` and `inmap/backfill`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from inmap.options import MaintainRequest, takes_options
from tasks import stages


@flow(name="inmap", flow_run_name="maintain {output}", persist_result=False,
      result_serializer="json")  # fmt: skip
@takes_options(MaintainRequest)
def maintain_flow(**parameters) -> list[str]:
    """Compact, checkpoint and vacuum the tables under `output`."""
    report = stages.maintain(MaintainRequest.parse(parameters))
    for line in report:
        get_run_logger().info(line)
    return report
