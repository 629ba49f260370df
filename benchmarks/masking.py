"""Log masking throughput: a 256 MiB log streamed in 64 KiB chunks through the redactor with
10, 100 and 1,000 registered secrets (each with all its encodings), against an unmasked copy of
the same stream (the same chunks written to the same sink). Prints MB/s and ratios."""

from __future__ import annotations

import argparse
import os
import random
import string
import time

from stockade.secrets.redact import Masker, Redactor

CHUNK = 64 * 1024


def make_log(size: int, secrets: list[bytes]) -> bytes:
    """Build-output-like lines, with a secret or an encoding of one now and then."""
    rng = random.Random(7)
    words = [b"compiling", b"module", b"test", b"PASSED", b"warning:", b"src/app/main.py",
             b"Downloading", b"https://files.example.test/pkg-1.2.3.tar.gz", b"ok", b"12.5s"]
    lines, total = [], 0
    while total < size:
        line = b" ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        if secrets and rng.random() < 0.001:
            line += b" token=" + rng.choice(secrets)
        lines.append(line + b"\n")
        total += len(line) + 1
    return b"".join(lines)[:size]


def measure(data: bytes, masker: Masker | None) -> float:
    """Seconds to stream ``data`` through the redactor (or straight) into /dev/null."""
    sink = os.open(os.devnull, os.O_WRONLY)
    redactor = Redactor(masker) if masker is not None else None
    view = memoryview(data)
    start = time.perf_counter()
    for pos in range(0, len(data), CHUNK):
        chunk = bytes(view[pos:pos + CHUNK])
        os.write(sink, redactor.feed(chunk) if redactor else chunk)
    if redactor:
        os.write(sink, redactor.flush())
    elapsed = time.perf_counter() - start
    os.close(sink)
    return elapsed


def main() -> None:
    """Run the three sizes, each interleaved with an unmasked copy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + "-_/+="
    pool = [("".join(rng.choice(alphabet) for _ in range(rng.randint(20, 48)))).encode()
            for _ in range(1000)]
    size = args.mib * 1024 * 1024
    for count in (10, 100, 1000):
        started = time.perf_counter()
        masker = Masker(pool[:count])
        built = time.perf_counter() - started
        data = make_log(size, pool[:count])
        masked = min(measure(data, masker) for _ in range(2))
        plain = min(measure(data, None) for _ in range(2))
        mbs = size / masked / 1e6
        print(f"{count:5d} secrets ({len(masker._patterns):5d} patterns): "
              f"{mbs:5.0f} MB/s masked vs {size / plain / 1e6:6.0f} MB/s unmasked copy "
              f"(masked/copy throughput ratio {plain / masked:.3f}; automaton built in "
              f"{built * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
