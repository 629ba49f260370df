"""stockade.hashing: the interpreter's own SHA-256 gives hashlib's digests."""

import hashlib

from stockade.hashing import sha256


def test_it_hashes_as_hashlib_does() -> None:
    for data in (b"", b"abc", bytes(range(256)) * 300):
        assert sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    h = sha256(b"ab")
    h.update(b"c")
    assert h.digest() == hashlib.sha256(b"abc").digest()
