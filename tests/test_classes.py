"""The class list: one reader, clear errors naming the file and the line."""

from __future__ import annotations

import json

import pytest

from inmap.classes import read_classes
from inmap.errors import ClassesError, InputError


def test_classes_from_list_file_and_json(tmp_path):
    text_file = tmp_path / "classes.txt"
    text_file.write_text("cat\ndog\n\n")
    json_file = tmp_path / "classes.json"
    json_file.write_text(json.dumps(["cat", "dog"]))
    assert read_classes(["cat", " dog "]) == ["cat", "dog"]
    assert read_classes(str(text_file)) == ["cat", "dog"]
    assert read_classes(str(json_file)) == ["cat", "dog"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no class names"),
        ("cat\n\ndog\n", "line 2 is empty"),
        ("cat\ndog\nCat\n", "names 'Cat' twice"),
        ("cat\n", "at least 2 classes"),
        ("[1, 2]", "JSON list of strings"),
        ('["cat", ', "not valid JSON"),
    ],
)
def test_bad_classes_file_is_named_in_the_error(tmp_path, content, message):
    path = tmp_path / "classes.txt"
    path.write_text(content)
    with pytest.raises(ClassesError, match=message) as error:
        read_classes(str(path))
    assert "classes.txt" in str(error.value)
    assert isinstance(error.value, InputError)  # a mistake: one line, never retried


def test_missing_classes_file_is_named(tmp_path):
    with pytest.raises(ClassesError, match="nope.txt does not exist"):
        read_classes(str(tmp_path / "nope.txt"))


def test_a_classes_file_that_is_not_utf8_is_one_clear_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\nthé\n".encode("latin-1"))
    with pytest.raises(ClassesError, match=r"latin1.txt is not UTF-8 text: byte 0xe9 at offset 3"):
        read_classes(str(path))


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffcat\ndog\n".encode())
    assert read_classes(str(path)) == ["cat", "dog"]
