"""Resolve a `RunRequest` into a `Job` before any work: the model and its weights (downloading
them if needed), the class list, the output path."""

from __future__ import annotations

from collections.abc import Mapping

from inmap.job import Job
from inmap.options import RunRequest


def prepare_job(
    request: RunRequest, run_id: str, credentials: Mapping[str, str] | None = None
) -> Job:
    """`credentials` are the secrets of the request's credentials block, for reading the class
    list; the job does not keep them."""
    from inmap.classes import read_classes
    from inmap.credentials import merge_options
    from inmap.model import resolve_model
    from inmap.tables import check_table_path

    settings = request.settings
    check_table_path(request.output)
    # The device is decided where the work runs (a Dask worker with a GPU uses it).
    model = resolve_model(settings.model, settings.pretrained, settings.device, device_here=False)
    classes = read_classes(request.classes, merge_options(settings.storage_options, credentials))
    return Job(
        source=request.partitions[0],
        output=request.output,
        model=model,
        classes=tuple(classes),
        run_id=run_id,
        settings=settings,
    )
