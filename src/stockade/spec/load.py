"""Loading a job spec file: size cap, then a cache of validated specs, then full validation.

Validation (YAML + pydantic) costs more than starting a sandbox, so the validated form of a
spec is cached in ``$STOCKADE_HOME/cache/specs/`` keyed by the sha256 of the file's bytes and
of the validator's own source: an unchanged spec is validated once, and any change to the
spec or to stockade's validation rules misses the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from stockade import __version__
from stockade.errors import SpecError
from stockade.spec.job import Job

MAX_SPEC_BYTES = 1024 * 1024
CACHE_ENTRIES = 256
_VALIDATOR_SOURCES = ("model.py", "parse.py", "units.py", "job.py")


def load_spec(path: Path, cache_dir: Path | None = None) -> Job:
    """Read and validate the job spec at ``path`` (``SpecError`` if it is invalid)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(str(path), [f"cannot read the file: {e.strerror}"]) from e
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(path), [f"the file is larger than {MAX_SPEC_BYTES} bytes"])
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


def _cache_key(data: bytes) -> str:
    h = hashlib.sha256(__version__.encode())
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
