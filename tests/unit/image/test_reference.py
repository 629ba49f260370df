"""Image references: the registry always named, tag or digest, nothing a URL or a cache path
could be bent by."""

from __future__ import annotations

import pytest

from stockade.errors import UsageError
from stockade.image.reference import ImageRef, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, expected", [
    (f"registry.example/team/base@{D}", ImageRef("registry.example", "team/base", None, D)),
    ("registry.example:5000/base:1.2", ImageRef("registry.example:5000", "base", "1.2", None)),
    ("localhost/a/b/c:latest", ImageRef("localhost", "a/b/c", "latest", None)),
    (f"127.0.0.1:5000/x:v1@{D}", ImageRef("127.0.0.1:5000", "x", "v1", D)),
    ("[::1]:5000/x:y", ImageRef("[::1]:5000", "x", "y", None)),
])
def test_good_references(text: str, expected: ImageRef) -> None:
    assert parse_reference(text) == expected
    assert str(expected).startswith(expected.registry + "/")


@pytest.mark.parametrize("text, why", [
    ("debian:12", "name the registry"),
    ("team/base:1", "name the registry"),
    ("registry.example/base", "name a tag or a digest"),
    ("registry.example/Base:1", "repository"),
    ("registry.example/../etc:1", "repository"),
    ("registry.example/a//b:1", "repository"),
    ("registry.example/a:-x", "tag"),
    ("registry.example/a@sha256:abc", "digest"),
    (f"registry.example/a@sha512:{'0' * 128}", "digest"),
    ("registry.example/a:1 b", "printable"),
    ("registry.example/a:1\n", "printable"),
    ("régistry.example/a:1", "printable"),
    ("registry.example/" + "a" * 600 + ":1", "printable"),
    ("", "printable"),
])
def test_bad_references_say_why(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as caught:
        parse_reference(text)
    assert "\n" not in caught.value.message
