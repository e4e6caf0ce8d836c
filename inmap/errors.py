"""inmap's errors: one base class, and one subclass for mistakes in the input.

The command line prints an `InmapError` as one line (`inmap: error: ...`); an `InputError` also
exits 2 and is never retried by the Prefect tasks, since waiting does not fix a typo. Anything else
is a bug or an outage and keeps its traceback.
"""

from __future__ import annotations


class InmapError(Exception):
    """An error whose message is meant for the user: what was wrong, with which input, and what
    to do about it."""


class InputError(InmapError):
    """A mistake in what the user gave: never retried; the command line exits 2."""


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
    """A storage operation failed; the message names the URL and what to do about it."""


class TransientStorageError(StorageError):
    """A storage failure that may pass: 5xx, throttling, a reset connection, a timeout."""


class MissingBucketError(StorageError):
    """The bucket of a URL does not exist."""


class UnreadableImagesError(InmapError):
    """Images that still could not be read after retrying; their partition commits nothing."""


class OutputBusyError(InmapError):
    """Another run holds the output's lease; the message names it and when it expires."""


def is_input_error(error: BaseException) -> bool:
    return isinstance(error, InputError)


# Errors whose message says all a user needs (what, which, what to do): the CLI prints the one
# line and keeps their tracebacks out of the console.
SAYS_IT_ALL = (InputError, OutputBusyError, UnreadableImagesError)
