"""The compiled seccomp filter's cache: its key and its content come from the same profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.sandbox import seccomp, seccomp_profile


def test_a_profile_changed_after_import_is_compiled_as_it_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade in place: a long-running process imported the old profile, then the file
    changed. Its next compile must cache the new profile's filter under the new key, or every
    later process would load the old filter under the new profile's name."""
    assert "ptrace" in seccomp_profile.ALLOW  # (imported: the "old" profile of this process)
    changed = tmp_path / "seccomp_profile.py"
    changed.write_bytes(seccomp._PROFILE_SOURCE.read_bytes().replace(b" ptrace ", b" "))
    cache = tmp_path / "cache"
    cache.mkdir()
    old = seccomp.load_bpf(cache)
    monkeypatch.setattr(seccomp, "_PROFILE_SOURCE", changed)
    new = seccomp.load_bpf(cache)
    assert new != old and new != seccomp.compile_bpf()  # not the imported profile's filter
    assert len(list(cache.glob("seccomp-*.bpf"))) == 2
    assert seccomp.load_bpf(cache) == new  # (read back from the cache)
    monkeypatch.setattr(seccomp, "_PROFILE_SOURCE", tmp_path / "missing.py")  # no sources:
    assert seccomp.load_bpf(cache) == old  # the imported values make the key and the filter
