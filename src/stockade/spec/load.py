"""Loading a job spec file: a bounded read, then a cache of validated specs, then validation.

The file is whatever path the user gave: a FIFO, a device or a directory is refused without
blocking (``stat`` first, then ``O_NONBLOCK`` and ``fstat`` on what was really opened), and at
most :data:`MAX_SPEC_BYTES` are read.

Validation (YAML + pydantic) costs more than starting a sandbox, so the validated form of a
spec is cached in ``$STOCKADE_HOME/cache/specs/`` keyed by the sha256 of the file's bytes and
of the validator's own source: an unchanged spec is validated once, and any change to the
spec or to stockade's validation rules misses the cache.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stockade import __version__
from stockade.hashing import sha256
from stockade.spec.job import Job
from stockade.spec.problems import spec_error

MAX_SPEC_BYTES = 1024 * 1024
CACHE_ENTRIES = 256
_VALIDATOR_SOURCES = ("model.py", "parse.py", "units.py", "job.py", "yamldoc.py", "problems.py")
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def load_spec(path: Path, cache_dir: Path | None = None) -> Job:
    """Read and validate the job spec at ``path`` (``SpecError`` if it is invalid)."""
    data = read_spec_file(path)
    entry = cache_dir / f"{_cache_key(data)}.json" if cache_dir else None
    if entry is not None:
        try:
            return Job.from_json(entry.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or unreadable: validate again
    from stockade.spec.parse import parse_spec

    job = parse_spec(data, source=str(path)).to_job()
    if entry is not None:
        _store(entry, job)
    return job


def read_spec_file(path: Path) -> bytes:
    """The bytes of the regular file at ``path``; never blocks, never reads more than
    :data:`MAX_SPEC_BYTES` + 1 (``SpecError`` otherwise)."""
    try:
        _check_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            _check_regular(path, os.fstat(fd))  # what was opened, not what was looked at
            chunks, size = [], 0
            while size <= MAX_SPEC_BYTES:
                chunk = os.read(fd, MAX_SPEC_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except OSError as e:
        raise spec_error(str(path), [f"cannot read the file: {e.strerror or e}"]) from e
    if size > MAX_SPEC_BYTES:
        raise spec_error(str(path), [f"the file is larger than {MAX_SPEC_BYTES} bytes; "
                                     "a job spec is a short YAML file"])
    return b"".join(chunks)


def _check_regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        if st.st_size > MAX_SPEC_BYTES:
            raise spec_error(str(path), [f"the file is larger than {MAX_SPEC_BYTES} bytes; "
                                         "a job spec is a short YAML file"])
        return
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
    raise spec_error(str(path), [f"{kind}, not a regular file; give the path of a YAML file"])


def _cache_key(data: bytes) -> str:
    h = sha256(__version__.encode())
    here = Path(__file__).parent
    for name in _VALIDATOR_SOURCES:
        h.update((here / name).read_bytes())
    h.update(data)
    return h.hexdigest()


def _store(entry: Path, job: Job) -> None:
    try:
        entry.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(job.to_json())
        os.replace(tmp, entry)
        entries = sorted(entry.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-CACHE_ENTRIES]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be written only costs time
