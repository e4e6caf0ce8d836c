"""inmap's errors: one base class, and one subclass for mistakes in the input.

The command line prints an `InmapError` as one line (`inmap: error: ...`); an `InputError` also
exits 2 and is never retried by the Prefect tasks, since waiting does not fix a typo. Anything else
is a bug or an outage and keeps its traceback.

Storage failures have kinds (`NotFound`, `MissingBucketError`, `AccessDenied`, `NoCredentials`,
`Transient`), given where each store's library errors are translated (`inmap.stores`); callers and
`is_transient` branch on the kind, never on the message.
"""

from __future__ import annotations


class InmapError(Exception):
    """An error whose message is meant for the user: what was wrong, with which input, and what
    to do about it."""


class InputError(InmapError):
    """A mistake in what the user gave: never retried; the command line exits 2."""


class OptionError(InputError):
    """An option with a value it cannot take: the message names the option and its bounds."""


class ClassesError(InputError):
    """The class list is missing, empty, malformed or has duplicates."""


class ModelNotFoundError(InputError):
    """The model name or pretrained tag is not one open_clip knows."""


class WeightsUnavailableError(InputError):
    """The pretrained weights could not be downloaded or read."""


class SourceNotFoundError(InputError):
    """A source folder or bucket that does not exist (an empty prefix is not an error)."""


class CredentialsRefusedError(InputError):
    """Secrets were passed where Prefect would store them."""


class OutputPathError(InputError):
    """The output location cannot be used as given."""


class StorageError(InmapError):
    """A storage operation failed; the message names the URL and what to do about it. A missing
    bucket, refused access and missing credentials are also input mistakes (exit 2, never
    retried): waiting does not fix them.

    Each store translates its library's errors into one of the kinds below at one seam
    (`inmap.stores`); callers branch on the kind, never on the message."""


class NotFound(StorageError):
    """The object, folder or bucket is not there."""


class MissingBucketError(NotFound, InputError):
    """The bucket (or container) of a URL does not exist."""


class AccessDenied(StorageError, InputError):
    """The store refused the request for these credentials (or this user)."""


class NoCredentials(StorageError, InputError):
    """No credentials were found, or they are incomplete or not accepted by the store."""


class Transient(StorageError):
    """A storage failure that may pass: 5xx, throttling, a reset connection, a timeout."""


TransientStorageError = Transient  # the older name


class ExclusiveCreateUnsupported(OutputPathError):
    """The output's store cannot create an object only if it is absent, so a lease there would
    not be exclusive; inmap refuses it rather than weaken the lease to check-then-write."""


class UnreadableImagesError(InmapError):
    """Images that still could not be read after retrying; their partition commits nothing."""


class OutputBusyError(InmapError):
    """Another run holds the output's lease; the message names it and when it expires."""


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help, read from the error's kind: a `Transient` storage failure does;
    every other inmap error (a missing object, refused credentials, a mistake in the input, a busy
    output, unreadable images) does not. An error inmap did not translate (a bug, or an outage
    outside storage) is retried, as a stage's first failure says too little to give up."""
    if isinstance(error, Transient):
        return True
    return not isinstance(error, InmapError)


# Errors whose message says all a user needs (what, which, what to do): the CLI prints the one
# line and keeps their tracebacks out of the console.
SAYS_IT_ALL = (InputError, OutputBusyError, UnreadableImagesError)
