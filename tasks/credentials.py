"""Credentials from a Prefect block, loaded inside the process that touches storage.

A run names an `AwsCredentials` block (prefect-aws) by its name only; the secrets are loaded here,
merged into the job for the length of one task or flow process (`Job.credentials`, which never
pickles or serialises), and never returned, logged or passed as a parameter.
"""

from __future__ import annotations

import functools

from inmap.credentials import s3fs_options
from inmap.errors import CredentialsRefusedError
from inmap.job import Job


def attach(job: Job) -> Job:
    """`job` with the secrets of its credentials block, if it names one."""
    if not job.settings.credentials_block or job.credentials is not None:
        return job
    return job.with_credentials(block_options(job.settings.credentials_block))


def block_options(name: str | None) -> dict | None:
    """The s3fs options of the named block's credentials (None without a name)."""
    return _block_options(name) if name else None


@functools.lru_cache(maxsize=8)
def _block_options(name: str) -> dict:
    from prefect_aws import AwsCredentials

    try:
        block = AwsCredentials.load(name)
    except ValueError as error:  # Prefect's "Unable to find block document named ..."
        raise CredentialsRefusedError(
            f"cannot load the AwsCredentials block {name!r}: {error}; create it with "
            "AwsCredentials(...).save(name) or in the Prefect UI"
        ) from None
    secret = block.aws_secret_access_key
    options = s3fs_options(
        access_key_id=block.aws_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        session_token=block.aws_session_token,
        profile=block.profile_name,
        region=block.region_name,
    )
    endpoint = getattr(block.aws_client_parameters, "endpoint_url", None)
    if endpoint:
        options["endpoint_url"] = endpoint
    return options
