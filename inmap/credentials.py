"""Secrets never travel as parameters: Prefect stores flow and deployment parameters in plain text
(its database, API, UI and `--watch` output).

Storage options given to a run may hold where and how to connect (`endpoint_url`, a region,
`anon`, a profile or account name), never a secret. Credentials come from the standard sources of
each store, read by its client and by delta-rs (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, instance and IRSA roles; GOOGLE_APPLICATION_CREDENTIALS or the instance's service
account; AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_KEY or a service principal), or
from a Prefect credentials block named by the run, loaded inside the tasks that touch storage (see
tasks/credentials.py) and never passed back out. `merge_options` is the one place where options
and those secrets meet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from inmap.errors import CredentialsRefusedError

# Option names, in any case and at any depth, that hold a secret: s3fs (key, secret, token),
# botocore client_kwargs (aws_access_key_id, aws_secret_access_key, aws_session_token), delta-rs
# and object_store (AWS_SECRET_ACCESS_KEY, ...), and other stores' passwords, tokens and keys.
SECRET_NAMES = frozenset({"key", "secret", "token", "password", "passwd", "session_token"})
SECRET_PARTS = ("secret", "password", "token", "access_key", "account_key", "credential",
                "private_key", "sas", "connection_string")  # fmt: skip

SAFE_WAYS = (
    "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of the "
    "process that runs the flow, use an instance or IRSA role, or save a Prefect AwsCredentials "
    "block and name it (--credentials-block NAME, or the flow parameter credentials_block); for "
    "GCS set GOOGLE_APPLICATION_CREDENTIALS, for Azure AZURE_STORAGE_CONNECTION_STRING or "
    "AZURE_STORAGE_ACCOUNT_KEY"
)


def _any_case(text: str) -> str:
    """A regular expression matching `text` in any case, without inline flags (JSON Schema's
    ECMA 262 dialect has none)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)


_SECRET_NAME_PATTERN = "|".join(
    [f"^{_any_case(name)}$" for name in sorted(SECRET_NAMES)]
    + [_any_case(part) for part in SECRET_PARTS]
)
_NO_SECRET_NAMES = {"propertyNames": {"not": {"pattern": _SECRET_NAME_PATTERN}}}
# The JSON schema of a storage_options parameter: an object whose keys, at any of the first two
# levels (`client_kwargs`), are not secret names. Prefect checks a deployment run's parameters
# against its schema before it stores them, so a secret is refused before it reaches the database.
STORAGE_OPTIONS_SCHEMA: dict = {
    "anyOf": [
        {
            "type": "object",
            **_NO_SECRET_NAMES,
            "additionalProperties": {
                "anyOf": [{"type": "object", **_NO_SECRET_NAMES}, {"not": {"type": "object"}}]
            },
        },
        {"type": "null"},
    ],
    "default": None,
    "title": "storage_options",
    "description": "Non-secret fsspec options (endpoint_url, region_name, anon, account_name); "
    "credentials come from the environment, a profile, a role or credentials_block.",
}


def secret_fields(options: Mapping | None, prefix: str = "") -> list[str]:
    """Dotted names of the fields of `options` that hold secrets."""
    found = []
    for name, value in (options or {}).items():
        dotted = f"{prefix}{name}"
        lowered = str(name).lower()
        if isinstance(value, Mapping):
            found += secret_fields(value, dotted + ".")
        elif lowered in SECRET_NAMES or any(part in lowered for part in SECRET_PARTS):
            found.append(dotted)
    return found


def refuse_secrets(options: Mapping | None, where: str = "storage_options") -> dict:
    """`options` as a plain dict, or `CredentialsRefusedError` naming the secret fields."""
    found = secret_fields(options)
    if found:
        raise CredentialsRefusedError(
            f"{where} hold secret field(s) {', '.join(found)}, which Prefect would store in plain "
            f"text; pass only non-secret options (endpoint_url, region_name, anon) and instead "
            f"{SAFE_WAYS}"
        )
    return dict(options or {})


def merge_options(*layers: Mapping | None) -> dict | None:
    """The one merge of storage options and credentials: later layers win, and `client_kwargs`
    (an endpoint, a region) merges key by key, so a block's region keeps a user's endpoint."""
    merged: dict = {}
    for layer in layers:
        for name, value in (layer or {}).items():
            if name == "client_kwargs" and isinstance(merged.get(name), Mapping):
                value = {**merged[name], **(value or {})}
            merged[name] = value
    return merged or None


def s3fs_options(
    *,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
    profile: str | None = None,
    region: str | None = None,
) -> dict:
    """s3fs options for explicit credentials (from a block): what `Job.credentials` holds."""
    options: dict = {}
    if access_key_id:
        options["key"] = access_key_id
    if secret_access_key:
        options["secret"] = secret_access_key
    if session_token:
        options["token"] = session_token
    if profile:
        options["profile"] = profile
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options
