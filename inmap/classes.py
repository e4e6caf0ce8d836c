"""The class list: the one reader of class names, for labelling and evaluation alike."""

from __future__ import annotations

import json
from collections.abc import Sequence

from inmap import storage
from inmap.errors import ClassesError, NotFound


def read_classes(classes: Sequence[str] | str, storage_options: dict | None = None) -> list[str]:
    """Class names from a list, or from the URL of a text file (one per line) or a JSON list.

    A trailing newline is normal; an empty line in the middle, an empty or duplicate name (case
    aside) or a single class are mistakes, refused with the line or entry named."""
    if not isinstance(classes, str):
        return check_classes(list(classes), "the classes parameter")
    source = classes
    try:
        data = storage.read_bytes(classes, storage_options)
    except NotFound:
        raise ClassesError(f"classes file {classes} does not exist") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ClassesError(
            f"classes file {source} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset "
            f"{error.start} cannot be decoded; save it as UTF-8"
        ) from None
    if source.lower().endswith(".json") or text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as error:
            raise ClassesError(f"classes file {source} is not valid JSON: {error}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ClassesError(f"classes file {source} must hold a JSON list of strings")
        return check_classes(names, f"classes file {source}")
    names = text.splitlines()
    while names and not names[-1].strip():
        names.pop()
    for number, name in enumerate(names, start=1):
        if not name.strip():
            raise ClassesError(f"classes file {source} line {number} is empty")
    return check_classes(names, f"classes file {source}")


def check_classes(names: list[str], source: str) -> list[str]:
    """Stripped names, refusing empty, duplicate (case aside) and fewer than two."""
    names = [name.strip() for name in names]
    if not names:
        raise ClassesError(f"{source} holds no class names")
    empty = [i + 1 for i, name in enumerate(names) if not name]
    if empty:
        raise ClassesError(f"{source} has an empty class name (entry {empty[0]})")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name.lower() in seen:
            raise ClassesError(
                f"{source} names {name!r} twice (entries {seen[name.lower()] + 1} and {index + 1})"
            )
        seen[name.lower()] = index
    if len(names) < 2:
        raise ClassesError(f"{source} must name at least 2 classes to choose between")
    return names
