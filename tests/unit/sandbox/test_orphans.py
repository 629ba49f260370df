"""Which job directories the reaper takes: only those whose creator is gone."""

import os
import uuid
from pathlib import Path

import pytest

from stockade.sandbox import orphans

PARENT = f"stockade-test-{uuid.uuid4().hex[:8]}"  # no such cgroup: nothing of another's touched


def _reap(jobs_dir: Path) -> list[str]:
    return orphans.reap_orphans(jobs_dir, PARENT, "p-", lambda job_id: True)


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    return tmp_path


def test_a_locked_job_directory_is_kept_until_its_holder_lets_go(jobs_dir):
    fd = orphans.create_locked(jobs_dir / "job-1", os.getgid())
    assert (jobs_dir / "job-1" / orphans.LOCK_NAME).is_file()
    assert not list(jobs_dir.glob(".new-*"))
    assert _reap(jobs_dir) == []
    os.close(fd)
    assert _reap(jobs_dir) == ["job-1"]
    assert not (jobs_dir / "job-1").exists()


def test_a_directory_without_a_lock_is_an_orphan_at_once(jobs_dir):
    (jobs_dir / "job-2").mkdir()
    assert _reap(jobs_dir) == ["job-2"]


def test_a_half_created_directory_is_removed_only_once_its_creator_is_gone(jobs_dir):
    held = orphans.create_locked(jobs_dir / "job-3", os.getgid())
    os.rename(jobs_dir / "job-3", jobs_dir / ".new-job-3")  # as if it died before the rename
    assert _reap(jobs_dir) == []
    assert (jobs_dir / ".new-job-3").is_dir()
    os.close(held)
    _reap(jobs_dir)
    assert not (jobs_dir / ".new-job-3").exists()


def test_creating_an_existing_job_directory_fails(jobs_dir):
    (jobs_dir / "job-4").mkdir()
    with pytest.raises(FileExistsError):
        orphans.create_locked(jobs_dir / "job-4", os.getgid())
