"""Log masking: throughput and registration cost, each against a baseline in the same run.

- ``secrets-N``: a 256 MiB log streamed in 64 KiB chunks through the redactor with N = 10, 100
  and 1,000 broker secrets (each with all its encodings), against an unmasked copy of the same
  stream (the same chunks written to the same sink).
- ``job-masks``: the same log with 10 broker secrets and 64 values a job registered with
  ``::add-mask::`` one at a time (each followed by output), against the copy.
- ``near-matches``: 16 MiB of ``a`` with the values ``aaaa`` and ``a`` * 4095 + ``c`` (every 4
  bytes a match, and after each one a search that looks far ahead), against the copy.
- ``register-*``: building the masker for 16 kB of ``_``, for 10 values of 14 kB, and for the
  most a job may register (256 KiB in 1 KiB values), each in a subprocess of its own (time and
  peak RSS; given up after ``--timeout`` seconds).

Each configuration ends with one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
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


def patterns(masker: Masker) -> int:
    """How many patterns the masker searches for (this version's or the previous one's)."""
    if hasattr(masker, "_current"):
        return sum(len(seg.patterns) for seg in masker._current().segments)
    return len(masker._patterns)  # type: ignore[attr-defined]


def add_job_mask(masker: Masker, value: bytes) -> None:
    """Register ``value`` as a job would (``add`` where ``add_job_mask`` does not exist)."""
    if hasattr(masker, "add_job_mask"):
        masker.add_job_mask(value)
    else:
        masker.add(value)


def report(config: str, **figures: object) -> None:
    print("RESULT " + json.dumps({"benchmark": "masking", "config": config, **figures}),
          flush=True)


def throughput(config: str, data: bytes, masker: Masker, built: float) -> None:
    """Stream ``data`` through ``masker`` and copy it as it is."""
    masked = min(measure(data, masker) for _ in range(2))
    plain = min(measure(data, None) for _ in range(2))
    size = len(data)
    print(f"{config:13s} ({patterns(masker):6d} patterns): {size / masked / 1e6:6.0f} MB/s "
          f"masked vs {size / plain / 1e6:6.0f} MB/s unmasked copy (time ratio "
          f"{masked / plain:.1f}; built in {built * 1000:.0f} ms)")
    report(config, patterns=patterns(masker), masked_mb_per_s=round(size / masked / 1e6, 1),
           copy_mb_per_s=round(size / plain / 1e6, 1),
           masked_over_copy_time=round(masked / plain, 2), build_ms=round(built * 1000, 1))


def registration(kind: str) -> dict[str, float]:
    """Build a masker of ``kind`` here (run in a subprocess): seconds and peak RSS."""
    rng = random.Random(3)
    started = time.perf_counter()
    masker = Masker()
    if kind == "register-16kB-underscores":
        masker.add(b"_" * 16384)
    elif kind == "register-10x14kB":
        for _ in range(10):
            masker.add(rng.randbytes(7000).hex().encode())
    else:  # the most a job may register, one value at a time, each followed by output
        for _ in range(256):
            add_job_mask(masker, "".join(rng.choice(string.ascii_letters + string.digits)
                                         for _ in range(1024)).encode())
            masker.mask(b"output")
    masker.mask(b"output")  # automata are built when first needed
    with open("/proc/self/status") as f:  # VmHWM: this process's peak, not its parent's
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"seconds": round(time.perf_counter() - started, 3), "peak_rss_mib": peak // 1024}


def main() -> None:
    """Run every configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--register", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.register:
        print(json.dumps(registration(args.register)))
        return
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + "-_/+="
    pool = [("".join(rng.choice(alphabet) for _ in range(rng.randint(20, 48)))).encode()
            for _ in range(1000)]
    size = args.mib * 1024 * 1024
    for count in (10, 100, 1000):
        started = time.perf_counter()
        masker = Masker()
        for i, value in enumerate(pool[:count]):
            masker.add(value, name=f"S{i}")
        masker.mask(b"x")
        built = time.perf_counter() - started
        throughput(f"secrets-{count}", make_log(size, pool[:count]), masker, built)

    started = time.perf_counter()
    masker = Masker(pool[:10])
    for value in pool[10:74]:
        add_job_mask(masker, value)
        masker.mask(b"x")
    built = time.perf_counter() - started
    throughput("job-masks", make_log(size, pool[:74]), masker, built)

    started = time.perf_counter()
    near = Masker([b"aaaa", b"a" * 4095 + b"c"])
    near.mask(b"x")
    throughput("near-matches", b"a" * (16 << 20), near, time.perf_counter() - started)

    for kind in ("register-16kB-underscores", "register-10x14kB", "register-job-maximum"):
        try:
            proc = subprocess.run([sys.executable, __file__, "--register", kind],
                                  capture_output=True, text=True, timeout=args.timeout,
                                  check=True)
            figures = json.loads(proc.stdout)
        except subprocess.TimeoutExpired:
            figures = {"seconds": None, "timed_out_after": args.timeout}
        print(f"{kind}: {figures}")
        report(kind, **figures)


if __name__ == "__main__":
    main()
