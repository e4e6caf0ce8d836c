"""One small object per kind of store: local disk, S3, GCS, Azure (and memory:// in tests).

Each store owns what differs between them, and nothing else:
- opening its filesystem (fsspec: s3fs, gcsfs, adlfs) from a URL and storage options;
- how a source's images are listed (`lister`: `inmap.listing` holds the listers);
- exclusive create: O_EXCL locally, If-None-Match on S3 and Azure, ``ifGenerationMatch=0`` on GCS.
  A store that cannot create exclusively refuses (`ExclusiveCreateUnsupported`), so the run lease
  is never silently weakened to check-then-write;
- the delta-rs (object_store) options for the same location and identity;
- the credential options a Prefect block's secrets become;
- translating its library's errors into inmap's kinds: `NotFound` (`MissingBucketError`),
  `AccessDenied`, `NoCredentials`, `Transient`, or a plain `StorageError`.

`store_for(url)` picks one by the URL's scheme. Everything else in inmap goes through
`inmap.storage`, which asks the store.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from typing import ClassVar

import fsspec

from inmap.errors import (
    AccessDenied,
    ExclusiveCreateUnsupported,
    MissingBucketError,
    NoCredentials,
    NotFound,
    StorageError,
    Transient,
)

# OS errors that retrying cannot fix.
_PERMANENT_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
    errno.ENAMETOOLONG, errno.EEXIST, errno.EROFS, errno.ENOSPC, errno.EINVAL,
}  # fmt: skip
# Network failures of the HTTP clients under s3fs, gcsfs and adlfs (aiohttp, botocore): by type.
_TRANSIENT_TYPE_NAMES = frozenset({
    "ClientOSError", "ServerDisconnectedError", "ClientPayloadError", "ClientConnectorError",
    "ServerTimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
    "ConnectionClosedError", "ResponseStreamingError", "IncompleteReadError",
    "ServiceRequestError", "ServiceResponseError",
})  # fmt: skip


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and the errors it was raised from, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


class Store:
    """A store reached through fsspec; subclasses say what differs."""

    name: ClassVar[str] = "storage"
    schemes: ClassVar[tuple[str, ...]] = ()
    credentials_advice: ClassVar[str] = "check the storage options and credentials"
    # How `inmap.listing` lists a source here: "find" (one recursive fsspec find) or "s3" (pages
    # of ListObjectsV2, sub-prefixes at once).
    lister: ClassVar[str] = "find"

    # --- the filesystem ---------------------------------------------------------------------

    def filesystem(self, url: str, options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(url, **dict(options or {}))

    def reader(self, url: str, options: dict | None) -> fsspec.AbstractFileSystem:
        """The filesystem for many concurrent reads (inmap retries them itself)."""
        return self.filesystem(url, options)[0]

    def read(self, fs: fsspec.AbstractFileSystem, path: str) -> bytes:
        return fs.cat_file(path)

    def bucket(self, path: str) -> str:
        return path.split("/", 1)[0]

    def bucket_exists(self, fs: fsspec.AbstractFileSystem, path: str) -> bool:
        """Whether the bucket of `path` exists: asked only after something was not found."""
        try:
            fs.invalidate_cache(self.bucket(path))
            return fs.exists(self.bucket(path))
        except Exception:  # cannot tell: say it exists, and report what was not found
            return True

    # --- exclusive create -------------------------------------------------------------------

    def create_exclusive(self, fs, path: str, data: bytes, url: str) -> bool:
        """Create `path` only if nothing is there; False if something already was."""
        raise ExclusiveCreateUnsupported(
            f"{url}: {self.name} cannot create an object only if it is absent, so a run lease "
            "there would not keep two runs apart; write the output to local disk, S3, GCS or Azure"
        )

    def _create_with_mode(self, fs, path: str, data: bytes) -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    # --- delta-rs ---------------------------------------------------------------------------

    def delta_options(self, options: dict | None) -> dict[str, str] | None:
        """object_store options for delta-rs, for the same location and identity."""
        return {}

    # --- errors -----------------------------------------------------------------------------

    def translate(
        self, error: BaseException, url: str, action: str, fs=None, path: str | None = None
    ) -> StorageError:
        """`error` as one of inmap's kinds, with a message naming `url` and what to do."""
        if isinstance(error, StorageError):
            return error
        kind = self.kind(error)
        if (
            kind is NotFound
            and fs is not None
            and path is not None
            and self._no_bucket(error, fs, path)
        ):
            kind = MissingBucketError
        return _error(kind, url, action, error, self.credentials_advice)

    def kind(self, error: BaseException) -> type[StorageError]:
        """The kind of a library error: the store's own view first, then the common one."""
        for cause in causes(error):
            kind = self.library_kind(cause)
            if kind is not None:
                return kind
        return common_kind(error)

    def library_kind(self, error: BaseException) -> type[StorageError] | None:
        return None

    def _no_bucket(self, error: BaseException, fs, path: str) -> bool:
        return not self.bucket_exists(fs, path)


def common_kind(error: BaseException) -> type[StorageError]:
    """The kind of an error from Python or an HTTP client, by its type (and errno)."""
    for cause in causes(error):
        if isinstance(cause, (FileNotFoundError, NotADirectoryError)):
            return NotFound
        if isinstance(cause, PermissionError):
            return AccessDenied
        if isinstance(cause, (FileExistsError, IsADirectoryError)):
            return StorageError
        if type(cause).__name__ in _TRANSIENT_TYPE_NAMES:
            return Transient
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return Transient
        if isinstance(cause, OSError) and cause.errno in _PERMANENT_ERRNOS:
            return StorageError
    if isinstance(error, OSError):  # a network or device failure with no telling errno
        return Transient
    return StorageError


def _error(
    kind: type[StorageError], url: str, action: str, cause: BaseException, advice: str
) -> StorageError:
    detail = " ".join(str(cause).split())[:400] or type(cause).__name__
    if kind is MissingBucketError:
        return kind(f"cannot {action} {url}: the bucket does not exist")
    if kind is NotFound:
        return kind(f"cannot {action} {url}: not found ({detail})")
    if kind is AccessDenied:
        return kind(f"cannot {action} {url}: permission denied ({detail}); {advice}")
    if kind is NoCredentials:
        return kind(f"cannot {action} {url}: {type(cause).__name__}: {detail}; {advice}")
    message = f"cannot {action} {url}: {type(cause).__name__}: {detail}"
    if kind is StorageError and isinstance(cause, OSError) and cause.errno == errno.ELOOP:
        message = f"cannot {action} {url}: symbolic link loop"
    elif kind is StorageError and action in ("write", "create"):
        message += "; check that the output location is a writable directory or bucket"
    return kind(message)


# --- local disk ----------------------------------------------------------------------------------


class LocalStore(Store):
    name = "local disk"
    schemes = ("", "file")

    def filesystem(self, url, options):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), os.path.abspath(url.removeprefix("file://"))

    def translate(self, error, url, action, fs=None, path=None):
        if isinstance(error, StorageError):
            return error
        kind = self.kind(error)
        if kind is AccessDenied:
            advice = (
                "check that this user may read it"
                if action in ("read", "check", "list")
                else "check the directory exists and this user may write to it"
            )
            return AccessDenied(f"cannot {action} {url}: permission denied ({error}); {advice}")
        if kind is NotFound and action not in ("read", "check"):
            return NotFound(f"cannot {action} {url}: {error}; does the directory exist?")
        return _error(kind, url, action, error, "")

    def bucket_exists(self, fs, path):
        return True

    def create_exclusive(self, fs, path, data, url):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_directory(directory)
        return True

    def delta_options(self, options):
        return None


def fsync_directory(directory: str) -> None:
    """Make a rename or create in `directory` durable (a crash must not undo it)."""
    try:  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- memory:// (tests) ---------------------------------------------------------------------------


class MemoryStore(Store):
    """fsspec's in-process memory filesystem: one process, one dict, so its create-if-absent
    (fsspec's ``mode="create"``) cannot race with another process."""

    name = "memory"
    schemes = ("memory",)

    def bucket_exists(self, fs, path):
        return True

    def create_exclusive(self, fs, path, data, url):
        return self._create_with_mode(fs, path, data)

    def delta_options(self, options):
        return None


# --- S3 ------------------------------------------------------------------------------------------

S3_ADVICE = (
    "check the credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, use an "
    "instance or IRSA role, or name a Prefect AwsCredentials block (--credentials-block); for "
    "S3-compatible stores also set the endpoint (storage_options={'endpoint_url': ...} or "
    "AWS_ENDPOINT_URL_S3)"
)
_S3_NO_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                                "InvalidToken", "TokenRefreshRequired"})  # fmt: skip
_S3_TRANSIENT = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                           "InternalError", "ServiceUnavailable"})  # fmt: skip


class S3Store(Store):
    name = "S3"
    schemes = ("s3", "s3a")
    credentials_advice = S3_ADVICE
    lister = "s3"

    def reader(self, url, options):
        """s3fs and botocore would each retry a failed GET several times (about 45 s for one
        object of a store answering 503) under inmap's own loop; here they try once."""
        options = dict(options or {})
        config = dict(options.get("config_kwargs") or {})
        config["retries"] = {"total_max_attempts": 1}
        fs = self.filesystem(url, {**options, "config_kwargs": config})[0]
        fs.retries = 1
        return fs

    def read(self, fs, path):
        """GET one object by its exact key. s3fs would read ``photo?versionId=1.jpg`` as the key
        ``photo`` at version ``1.jpg``; a key is a key."""
        from fsspec.asyn import sync

        bucket, _, key = path.partition("/")

        async def get() -> bytes:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read()

        return sync(fs.loop, get)

    def create_exclusive(self, fs, path, data, url):
        # s3fs sends If-None-Match: * and turns 412 PreconditionFailed into FileExistsError.
        # Some stores answer 409 ConditionalRequestConflict to a racing create: it lost too.
        try:
            return self._create_with_mode(fs, path, data)
        except OSError as error:
            if any(_s3_code(cause) == "ConditionalRequestConflict" for cause in causes(error)):
                return False
            raise

    def library_kind(self, error):
        code = _s3_code(error)
        name = type(error).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return NoCredentials
        if name == "ParamValidationError":
            return StorageError
        if code is None:
            return None
        status = _s3_status(error)
        if code == "NoSuchBucket":
            return MissingBucketError
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound
        if code in _S3_NO_CREDENTIALS:
            return NoCredentials
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return AccessDenied
        if code in _S3_TRANSIENT or (status is not None and (status >= 500 or status == 429)):
            return Transient
        return StorageError

    def _no_bucket(self, error, fs, path):
        if any(_s3_code(cause) == "NoSuchBucket" for cause in causes(error)):
            return True
        if any(_s3_code(cause) is not None for cause in causes(error)):
            return False  # the store said what was missing: not the bucket
        return not self.bucket_exists(fs, path)

    def delta_options(self, options):
        """fsspec/s3fs options as delta-rs (object_store) options.

        Keys not given here come from the environment, as for s3fs; a profile (the `profile`
        option or AWS_PROFILE) is resolved to its keys by botocore, as s3fs would: delta-rs
        ignores AWS_PROFILE unless forced."""
        options = dict(options or {})
        client_kwargs = dict(options.get("client_kwargs") or {})
        delta: dict[str, str] = {}
        endpoint = (
            options.get("endpoint_url")
            or client_kwargs.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:  # an empty AWS_ENDPOINT_URL makes delta-rs panic: only a real one
            delta["AWS_ENDPOINT_URL"] = str(endpoint)
            if str(endpoint).startswith("http://"):
                delta["AWS_ALLOW_HTTP"] = "true"
        region = (
            options.get("region_name")
            or client_kwargs.get("region_name")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"  # botocore's default too; without one, delta-rs asks the instance
        )
        delta["AWS_REGION"] = str(region)
        for ours, theirs in (
            ("key", "AWS_ACCESS_KEY_ID"),
            ("secret", "AWS_SECRET_ACCESS_KEY"),
            ("token", "AWS_SESSION_TOKEN"),
        ):
            if options.get(ours):
                delta[theirs] = str(options[ours])
        if options.get("anon"):
            delta["AWS_SKIP_SIGNATURE"] = "true"
        profile = options.get("profile") or os.environ.get("AWS_PROFILE")
        if profile and "AWS_ACCESS_KEY_ID" not in delta:
            delta.update(_profile_keys(str(profile)))
        return delta


def _s3_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return (response.get("Error") or {}).get("Code")
    return None


def _s3_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return None


def _profile_keys(profile: str) -> dict[str, str]:
    import botocore.session

    credentials = botocore.session.Session(profile=profile).get_credentials()
    if credentials is None:
        return {}
    frozen = credentials.get_frozen_credentials()
    keys = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}
    if frozen.token:
        keys["AWS_SESSION_TOKEN"] = frozen.token
    return keys


# --- Google Cloud Storage ------------------------------------------------------------------------

GCS_ADVICE = (
    "check the credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service account file, run "
    "`gcloud auth application-default login`, or use the instance's service account; for an "
    "emulator set storage_options={'endpoint_url': ..., 'token': 'anon'} or STORAGE_EMULATOR_HOST"
)


class GCSStore(Store):
    name = "GCS"
    schemes = ("gs", "gcs")
    credentials_advice = GCS_ADVICE

    def filesystem(self, url, options):
        # gcsfs's default class asks a gRPC control plane for each bucket's layout (zonal or
        # hierarchical buckets) and waits a minute where there is none, as on an emulator; the
        # core class speaks the JSON API only, which every bucket answers.
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(**dict(options or {}))
        return fs, fs._strip_protocol(url)

    def create_exclusive(self, fs, path, data, url):
        # gcsfs uploads with ifGenerationMatch=0 and turns 412 into FileExistsError.
        return self._create_with_mode(fs, path, data)

    def library_kind(self, error):
        module = type(error).__module__ or ""
        name = type(error).__name__
        if module.startswith("google.auth") and name in (
            "DefaultCredentialsError", "RefreshError", "TransportError"
        ):  # fmt: skip
            return Transient if name == "TransportError" else NoCredentials
        code = getattr(error, "code", None)
        if module.startswith("gcsfs") and isinstance(code, int):
            if code == 401:
                return NoCredentials
            if code == 403:
                return AccessDenied
            if code == 404:
                return NotFound
            if code in (408, 429) or code >= 500:
                return Transient
            return StorageError
        return None

    def delta_options(self, options):
        """gcsfs options as object_store options. object_store reads the endpoint of an emulator
        only from a service account key (`gcs_base_url`, `disable_oauth`); elsewhere credentials
        come from GOOGLE_APPLICATION_CREDENTIALS or the instance, as for gcsfs."""
        options = dict(options or {})
        endpoint = options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
        token = options.get("token")
        delta: dict[str, str] = {}
        key: dict | None = None
        if isinstance(token, dict):
            key = dict(token)
        elif isinstance(token, str) and os.path.isfile(token):  # a service account file
            if endpoint:
                with open(token) as f:
                    key = json.load(f)
            else:
                delta["google_service_account"] = token
        if endpoint:
            endpoint = str(endpoint)
            if "://" not in endpoint:
                endpoint = f"http://{endpoint}"
            key = key or {"client_email": "", "private_key": "", "private_key_id": ""}
            key["gcs_base_url"] = endpoint.rstrip("/")
            if token == "anon" or not (key.get("private_key")):
                key["disable_oauth"] = True
            if endpoint.startswith("http://"):
                delta["allow_http"] = "true"
        elif token == "anon":
            delta["google_skip_signature"] = "true"
        if key is not None:
            delta["google_service_account_key"] = json.dumps(key)
        return delta


# --- Azure Blob Storage --------------------------------------------------------------------------

AZURE_ADVICE = (
    "check the credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME "
    "with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or a service principal "
    "(AZURE_STORAGE_CLIENT_ID / _SECRET / AZURE_STORAGE_TENANT_ID), in the environment of the "
    "process that runs the flow; storage_options may name the account_name, never a key"
)


# Azure's error codes for a key or token it does not accept. (403 AuthorizationFailure is a
# permission refused to a known identity, an AccessDenied; Azurite also answers it to a wrong key.)
_AZURE_NO_CREDENTIALS = frozenset({"AuthenticationFailed", "InvalidAuthenticationInfo",
                                   "NoAuthenticationInformation"})  # fmt: skip


class AzureStore(Store):
    name = "Azure Blob Storage"
    schemes = ("az", "abfs", "abfss")
    credentials_advice = AZURE_ADVICE

    def create_exclusive(self, fs, path, data, url):
        # adlfs uploads with overwrite=False, which azure-storage-blob sends as If-None-Match: *;
        # 409 BlobAlreadyExists becomes FileExistsError.
        return self._create_with_mode(fs, path, data)

    def bucket_exists(self, fs, path):
        from fsspec.asyn import sync

        container = self.bucket(path)

        async def exists() -> bool:
            async with fs.service_client.get_container_client(container) as client:
                return await client.exists()

        try:
            return sync(fs.loop, exists)
        except Exception:
            return True

    def library_kind(self, error):
        module = type(error).__module__ or ""
        name = type(error).__name__
        if not module.startswith("azure"):
            return None
        code = getattr(error, "error_code", None)
        if name == "CredentialUnavailableError" or code in _AZURE_NO_CREDENTIALS:
            return NoCredentials
        if code == "ContainerNotFound":
            return MissingBucketError
        if name == "ResourceNotFoundError":
            return NotFound
        if name in ("ServiceRequestError", "ServiceResponseError", "ServiceRequestTimeoutError",
                    "ServiceResponseTimeoutError"):  # fmt: skip
            return Transient
        status = getattr(error, "status_code", None)
        if status == 401:
            return NoCredentials
        if status == 403 or name == "ClientAuthenticationError":
            return AccessDenied
        if isinstance(status, int) and (status >= 500 or status in (408, 429)):
            return Transient
        return StorageError if name == "HttpResponseError" or status else None

    def delta_options(self, options):
        """adlfs options (and its environment variables) as object_store options: object_store
        reads no connection string, so one is taken apart here.

        Azurite (AZURITE_BLOB_STORAGE_URL set, or UseDevelopmentStorage=true) is reached through
        object_store's emulator mode, which reads that variable: delta-rs 1.6 loses a custom
        `azure_storage_endpoint` in a MERGE that reads existing files ("Invalid table version")."""
        options = dict(options or {})
        env = os.environ
        parts = _connection_string_parts(
            options.get("connection_string") or env.get("AZURE_STORAGE_CONNECTION_STRING") or ""
        )
        account = (
            options.get("account_name")
            or parts.get("accountname")
            or env.get("AZURE_STORAGE_ACCOUNT_NAME")
        )
        key = options.get("account_key") or parts.get("accountkey")
        key = key or env.get("AZURE_STORAGE_ACCOUNT_KEY")
        sas = options.get("sas_token") or parts.get("sharedaccesssignature")
        sas = sas or env.get("AZURE_STORAGE_SAS_TOKEN")
        endpoint = parts.get("blobendpoint")
        if not endpoint and options.get("account_host"):
            endpoint = f"https://{options['account_host']}"
        delta: dict[str, str] = {}
        if account:
            delta["azure_storage_account_name"] = str(account)
        if key:
            delta["azure_storage_account_key"] = str(key)
        elif sas:
            delta["azure_storage_sas_key"] = str(sas).lstrip("?")
        for ours, theirs in (
            ("client_id", "azure_storage_client_id"),
            ("client_secret", "azure_storage_client_secret"),
            ("tenant_id", "azure_storage_tenant_id"),
        ):
            value = options.get(ours) or env.get(f"AZURE_STORAGE_{ours.upper()}")
            if value:
                delta[theirs] = str(value)
        if options.get("anon"):
            delta["azure_skip_signature"] = "true"
        emulator = env.get("AZURITE_BLOB_STORAGE_URL") or parts.get("usedevelopmentstorage")
        if emulator:
            delta["azure_storage_use_emulator"] = "true"
        elif endpoint:
            delta["azure_storage_endpoint"] = str(endpoint).rstrip("/")
            if str(endpoint).startswith("http://"):
                delta["allow_http"] = "true"
        return delta


def _connection_string_parts(text: str) -> dict[str, str]:
    parts = {}
    for item in text.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            parts[name.strip().lower()] = value.strip()
    return parts


# --- any other fsspec filesystem -----------------------------------------------------------------


class OtherStore(Store):
    """A scheme inmap has no store for: readable and listable through fsspec, never leased."""

    name = "this store"

    def delta_options(self, options):
        return {str(k): str(v) for k, v in (options or {}).items() if not isinstance(v, dict)}


STORES: tuple[Store, ...] = (LocalStore(), S3Store(), GCSStore(), AzureStore(), MemoryStore())
_OTHER = OtherStore()


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def store_for(url: str) -> Store:
    """The store of `url`, by its scheme."""
    scheme = scheme_of(url)
    for store in STORES:
        if scheme in store.schemes:
            return store
    return _OTHER
