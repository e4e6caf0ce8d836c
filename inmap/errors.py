"""Telling a user's mistake from a bug, for the command line."""

from __future__ import annotations


def is_user_error(error: BaseException) -> bool:
    """True for inmap's own error types (bad classes file, unknown model, storage access, ...),
    which carry a message meant for the user; a bug keeps its traceback."""
    return any(cls.__module__.startswith("inmap.") for cls in type(error).__mro__[:-2])
