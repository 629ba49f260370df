"""Argument types shared by commands: bounded, with an error that names the accepted range."""

from __future__ import annotations

import argparse

MAX_COUNT = 100_000


def count(text: str) -> int:
    """A number of items to list: 1 to 100000."""
    if not (text.isascii() and text.isdigit() and len(text) <= 6) \
            or not 1 <= int(text) <= MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"{text[:20]!r} is not a count; give a whole number from 1 to {MAX_COUNT}")
    return int(text)
