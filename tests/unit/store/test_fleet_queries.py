"""The fleet's transactions (store/fleet.py) on both backends: the same SQL must mean the same
on SQLite and PostgreSQL (placeholders, upserts, bytes, fencing, row counts)."""

from __future__ import annotations

import hashlib
import os

from stockade.audit import AuditEvent, verify_chain
from stockade.store.interface import (
    ArtifactRow,
    EnrolTokenRow,
    JobRow,
    RunnerRow,
    SessionRow,
    Store,
)
from stockade.store.open import open_store


def ev(action: str, job_id: str | None = None) -> AuditEvent:
    return AuditEvent("test", action, 1.0, job_id)


def job(job_id: str, created: float, runner_id: str | None = None) -> JobRow:
    return JobRow(job_id, "n", "{}", "[]", "queued", None, None, 0, runner_id, None, created,
                  None, None, None, max_attempts=2)


def enrolled(store: Store, runner_id: str = "r1") -> None:
    token = EnrolTokenRow("t1", "default", "ab" * 32, 1.0, 1e12, None, None)
    store.insert_enrol_token(token, ev("enrol_token.created"))
    runner = RunnerRow(runner_id, "box", "default", '["linux"]', 2, "k" * 44, "active", "{}",
                       None, 2.0, None)
    why = store.enrol("t1", lambda row: None if row == token else "no such token", runner,
                      SessionRow("s1", runner_id, "cd" * 32, 2.0, 1e12), [ev("runner.enrolled")])
    assert why is None


def test_enrolment_sessions_and_runner_status(store_url: str) -> None:
    store = open_store(store_url)
    enrolled(store)
    assert store.enrol("t1", lambda row: None, store.get_runner("r1"),  # type: ignore[arg-type]
                       SessionRow("s2", "r1", "ef" * 32, 3.0, 1e12), []) == \
        "this enrolment token was used already"
    session = store.session("s1")
    assert session is not None and session[1].id == "r1" and session[1].concurrency == 2
    assert store.attest("r1", "active", '{"ok": true}', 5.0,
                        SessionRow("s3", "r1", "00" * 32, 5.0, 1e12), ev("runner.attested"))
    both = store.sessions(["s3", "nosuch", "s1"])  # one read for a batch's requests
    assert sorted(both) == ["s1", "s3"] and both["s3"][0].secret_sha256 == "00" * 32
    assert store.sessions([]) == {}
    assert store.set_runner_status("r1", "draining", ("active",), ev("runner.draining"))
    assert store.attest("r1", "active", "{}", 6.0, None, ev("runner.attested"))
    assert store.get_runner("r1").status == "draining"  # type: ignore[union-attr]
    assert not store.set_runner_status("r1", "active", ("quarantined",), ev("x"))
    assert store.set_runner_status("r1", "quarantined", ("draining",), ev("runner.quarantined"))
    assert store.session("s3") is None and not store.attest("r1", "active", "{}", 7.0, None,
                                                            ev("x"))
    assert [r.id for r in store.runners()] == ["r1"]
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_attempts_are_fenced_logged_and_lost(store_url: str) -> None:
    store = open_store(store_url)
    enrolled(store)
    store.insert_job(job("j1", 1.0), ev("job.admitted", "j1"))
    claimed = store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                                  lambda j: True)
    assert claimed is not None and claimed.attempt == 1 and store.holds("j1", 1, "r1")
    assert store.extend_lease("j1", 1, "r1", 150.0) == (True, False)
    assert store.extend_lease("j1", 1, "r2", 150.0) == (False, False)
    chunk = b"\x00line one\n\xff"
    assert store.put_log_chunk("j1", 1, "r1", 0, chunk, cap=20) == "stored"
    assert store.put_log_chunk("j1", 1, "r1", 0, chunk, cap=20) == "duplicate"
    assert store.put_log_chunk("j1", 1, "r1", 0, b"other", cap=20) == "conflict"
    assert store.put_log_chunk("j1", 1, "r1", 1, b"x" * 10, cap=20) == "full"
    assert store.put_log_chunk("j1", 1, "r2", 1, b"x", cap=20) == "fenced"
    assert store.log_chunks("j1") == [(1, 0, chunk)]
    assert store.request_cancel("j1", 160.0, ev("job.cancel", "j1")) == "requested"
    assert store.extend_lease("j1", 1, "r1", 170.0) == (True, True)
    lost = store.expire_leases(1000.0, lambda j, again: ev("job.lost", j.id))
    assert [(j.id, again) for j, again in lost] == [("j1", False)]  # canceled: not again
    assert [a.outcome for a in store.attempts("j1")] == ["lost"]
    assert not store.finish_attempt("j1", 1, "r1", {"status": "succeeded"}, [], [], [])
    store.close()


def test_a_quarantined_runners_writes_are_fenced_before_its_jobs_are_failed(
        store_url: str) -> None:
    """Quarantine is two transactions (the runner's status, then its jobs failed): in
    between, its attempt still runs, but nothing of that runner lands on it."""
    from stockade.store.interface import FinishRequest

    store = open_store(store_url)
    enrolled(store)
    store.insert_job(job("j1", 1.0), ev("job.admitted", "j1"))
    assert store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                               lambda j: True, agent=True) is not None
    assert store.set_runner_status("r1", "quarantined", ("active",), ev("runner.quarantined"))
    assert not store.holds("j1", 1, "r1")
    assert store.extend_lease("j1", 1, "r1", 150.0) == (False, False)
    assert store.put_log_chunk("j1", 1, "r1", 0, b"late\n", cap=20) == "fenced"
    assert not store.put_upload("j1", 1, "r1", "ab" * 32, b"x", 2.0)
    done = {"status": "succeeded", "finished_at": 3.0}
    assert store.finish_attempts([FinishRequest("j1", 1, "r1", done, [], [], [], None)]) \
        == [False]
    assert not store.finish_attempt("j1", 1, "r1", done, [], [], [])
    assert store.get_job("j1").status == "running"  # type: ignore[union-attr]
    assert [j.id for j in store.fail_runner_jobs("r1", 4.0, lambda j: ev("lost", j.id))] \
        == ["j1"]
    assert store.get_job("j1").failure_reason == "runner_lost"  # type: ignore[union-attr]
    store.close()


def test_a_completion_remembers_the_job_it_claimed_next(store_url: str) -> None:
    store = open_store(store_url)
    enrolled(store)
    for n in (1, 2):
        store.insert_job(job(f"j{n}", float(n)), ev("job.admitted", f"j{n}"))

    def claim(after: tuple[str, int] | None = None) -> JobRow | None:
        return store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                                   lambda j: True, agent=True, after=after)

    first = claim()
    assert first is not None and first.id == "j1"
    assert store.ended_attempt("j1", 1, "r1") is None  # still running
    assert store.finish_attempt("j1", 1, "r1", {"status": "succeeded"}, [], [], [])
    second = claim(after=("j1", 1))
    assert second is not None and second.id == "j2"
    assert store.ended_attempt("j1", 1, "r1") == ("succeeded", "j2", 1)
    assert store.ended_attempt("j1", 1, "r2") is None  # only the runner that ran it
    assert store.live_leases("j2", 1) == []
    store.close()


def test_a_lost_attempt_runs_again_and_the_second_finishes(store_url: str) -> None:
    store = open_store(store_url)
    enrolled(store)
    store.insert_job(job("j1", 1.0), ev("job.admitted", "j1"))
    def claim() -> JobRow | None:
        return store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                                   lambda j: True)
    claim()
    assert [(j.id, again) for j, again in store.expire_leases(
        1000.0, lambda j, again: ev("job.lost", j.id))] == [("j1", True)]
    second = claim()
    assert second is not None and second.attempt == 2
    assert store.finish_attempt("j1", 2, "r1", {"status": "succeeded", "finished_at": 5.0},
                                [], [], [ev("job.succeeded", "j1")])
    assert [(a.attempt, a.outcome) for a in store.attempts("j1")] == [(1, "lost"),
                                                                     (2, "succeeded")]
    assert store.request_cancel("j1", 6.0, ev("job.cancel", "j1")) is None
    store.insert_job(job("j2", 2.0), ev("job.admitted", "j2"))
    assert store.request_cancel("j2", 6.0, ev("job.cancel", "j2")) == "canceled"
    store.insert_job(job("j3", 3.0), ev("job.admitted", "j3"))
    claim()
    assert [j.id for j in store.fail_runner_jobs("r1", 7.0, lambda j: ev("job.lost", j.id))
            ] == ["j3"]
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_nonces_secrets_and_blobs(store_url: str) -> None:
    store = open_store(store_url)
    assert store.spend_nonce("n1", 10.0, 1.0) and not store.spend_nonce("n1", 10.0, 2.0)
    assert store.spend_nonce("n1", 30.0, 20.0)  # expired, so spent again
    key = store.server_secret("nonce-key", lambda: b"\x01\x02")
    assert key == b"\x01\x02" and store.server_secret("nonce-key", lambda: b"new") == key
    data = bytes(range(256))
    digest = hashlib.sha256(data).hexdigest()
    store.put_blob(digest, data, 1.0)
    store.put_blob(digest, data, 2.0)
    assert store.get_blob(digest) == data and store.has_blob(digest) == 256
    assert store.get_blob("0" * 64) is None and store.has_blob("0" * 64) is None
    assert store.prune_blobs(0.5) == 0 and store.prune_blobs(5.0) == 1
    assert store.get_blob(digest) is None
    store.close()


def test_a_blob_is_read_a_slice_at_a_time(store_url: str) -> None:
    """Downloads read a blob in slices (a whole artifact in memory per download let slow
    readers hold gigabytes): any slice, the last one short, past the end empty."""
    store = open_store(store_url)
    data = os.urandom(3 * 1024 * 1024 + 7)
    digest = hashlib.sha256(data).hexdigest()
    store.put_blob(digest, data, 1.0)
    step = 1024 * 1024
    assert b"".join(store.read_blob(digest, at, step) or b"" for at in range(0, len(data), step)
                    ) == data
    assert store.read_blob(digest, 5, 10) == data[5:15]
    assert store.read_blob(digest, len(data) - 3, step) == data[-3:]
    assert store.read_blob(digest, len(data), step) == b""
    assert store.read_blob("0" * 64, 0, step) is None
    store.close()


def test_uploads_no_job_refers_to_are_pruned_after_their_grace(store_url: str) -> None:
    store = open_store(store_url)
    enrolled(store)
    kept, orphan, artifact = b"workspace", b"nobody's", b"built"
    digest = {d: hashlib.sha256(d).hexdigest() for d in (kept, orphan, artifact)}
    for data in (kept, orphan):
        store.put_blob(digest[data], data, 1.0)
    store.insert_job(job("j1", 1.0)._replace(workspace_sha256=digest[kept]),
                     ev("job.admitted", "j1"))
    store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                        lambda j: True, agent=True)
    assert store.put_upload("j1", 1, "r1", digest[artifact], artifact, 1.0)
    assert not store.put_upload("j1", 1, "r2", digest[artifact], artifact, 1.0)  # fenced
    assert store.uploaded("j1", 1) == {digest[artifact]: len(artifact)}
    assert store.finish_attempt("j1", 1, "r1", {"status": "succeeded"}, [],
                                [ArtifactRow("out", digest[artifact], len(artifact))], [])
    assert store.prune_blobs(before=0.5) == 0  # all within their grace
    assert store.prune_blobs(before=10.0) == 2  # the orphan, and the finished job's workspace
    assert store.get_blob(digest[artifact]) == artifact and store.get_blob(digest[kept]) is None
    store.close()


def test_a_claim_marks_the_runner_seen_and_only_an_active_agent_claims(store_url: str) -> None:
    """The runner's row is updated in the claim's transaction (on PostgreSQL in the same
    statement as the first candidates): an agent not active takes nothing; a runner of this
    host (no runner row) takes its job all the same."""
    store = open_store(store_url)
    enrolled(store)
    store.insert_job(job("j1", 1.0), ev("job.admitted", "j1"))
    store.insert_job(job("j2", 2.0, runner_id="local-1"), ev("job.admitted", "j2"))

    def claim(runner_id: str, agent: bool) -> JobRow | None:
        return store.claim_attempt(runner_id, lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                                   lambda j: True, agent=agent)

    assert store.set_runner_status("r1", "draining", ("active",), ev("runner.draining"))
    assert claim("r1", agent=True) is None
    assert store.get_runner("r1").last_seen_at is None  # type: ignore[union-attr]
    assert store.set_runner_status("r1", "active", ("draining",), ev("runner.active"))
    claimed = claim("r1", agent=True)
    assert claimed is not None and claimed.id == "j1"
    seen = store.get_runner("r1").last_seen_at  # type: ignore[union-attr]
    assert seen is not None and seen > 2.0
    mine = claim("local-1", agent=False)
    assert mine is not None and mine.id == "j2" and mine.runner_id == "local-1"
    assert claim("r1", agent=True) is None  # the queue is empty
    store.close()


def test_an_attempt_ends_with_its_secret_leases_revoked_in_its_transaction(
        store_url: str) -> None:
    """finish_attempt with a Revocation revokes the attempt's live leases (an event each, after
    the completion's), leaves other attempts' and revoked ones alone, and revokes nothing when
    the attempt no longer holds the job (on PostgreSQL all of it is one statement)."""
    from stockade.store.interface import LeaseRow, Revocation

    store = open_store(store_url)
    enrolled(store)
    store.insert_job(job("j1", 1.0), ev("job.admitted", "j1"))
    store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                        lambda j: True, agent=True)

    def lease(lease_id: str, attempt: int = 1, revoked: float | None = None) -> LeaseRow:
        return LeaseRow(lease_id, "j1", attempt, "r1", "token", 1, "env", 3.0, 1e12, revoked)

    store.insert_leases([lease("l2"), lease("l1"), lease("l3", revoked=4.0),
                         lease("l4", attempt=2)], [ev("secret.issued", "j1")])
    revoke = Revocation(9.0, lambda row: ev(f"secret.revoked:{row.id}", "j1"))
    assert not store.finish_attempt("j1", 1, "r2", {"status": "succeeded"}, [], [], [],
                                    revoke)  # another runner's: fenced, nothing revoked
    assert {row.id for row in store.live_leases("j1", 1)} == {"l1", "l2"}
    assert store.finish_attempt("j1", 1, "r1", {"status": "succeeded"}, [], [],
                                [ev("job.succeeded", "j1")], revoke)
    assert store.live_leases("j1", 1) == []
    assert store.get_lease("l1").revoked_at == 9.0  # type: ignore[union-attr]
    assert store.get_lease("l3").revoked_at == 4.0  # type: ignore[union-attr]
    assert [row.id for row in store.live_leases("j1", 2)] == ["l4"]
    actions = [e.action for e, _, _ in store.audit_records()]
    assert actions[-3:] == ["job.succeeded", "secret.revoked:l1", "secret.revoked:l2"]
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_claims_in_one_go_take_the_oldest_eligible_jobs_in_request_order(
        store_url: str) -> None:
    """claim_attempts (on PostgreSQL one statement for all the claims): each request gets the
    oldest queued job it may take that an earlier request did not, paging past a queue head
    none of them may take; an agent that is not active gets nothing; the completion a claim
    follows remembers it; the claims' events are in the requests' order."""
    from stockade.store.interface import ClaimRequest

    store = open_store(store_url)
    enrolled(store, "r1")
    runner = RunnerRow("r2", "box2", "default", "[]", 1, "k" * 44, "draining", "{}", None, 2.0,
                       None)
    store.insert_enrol_token(EnrolTokenRow("t2", "default", "ab" * 32, 1.0, 1e12, None, None),
                             ev("enrol_token.created"))
    assert store.enrol("t2", lambda row: None, runner,
                       SessionRow("s2", "r2", "cd" * 32, 2.0, 1e12), []) is None
    for n in range(40):  # a queue head only a GPU runner may take
        store.insert_job(job(f"gpu{n:02}", float(n))._replace(labels_json='["gpu"]'),
                         ev("job.admitted"))
    store.insert_job(job("mine", 50.0, runner_id="local-1"), ev("job.admitted"))
    for n in range(4):
        store.insert_job(job(f"j{n}", 60.0 + n), ev("job.admitted"))
    store.insert_job(job("prev", 0.5), ev("job.admitted"))
    prev = store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                               lambda j: j.id == "prev", agent=True)
    assert prev is not None
    assert store.finish_attempt("prev", 1, "r1", {"status": "succeeded"}, [], [], [])

    def request(runner_id: str, agent: bool = True, after: tuple[str, int] | None = None
                ) -> ClaimRequest:
        return ClaimRequest(runner_id, lambda j: 200.0,
                            lambda j: ev(f"job.claimed:{runner_id}", j.id),
                            lambda j: j.runner_id in (None, runner_id) and "gpu" not in
                            j.labels_json, agent, after)

    got = store.claim_attempts([request("r1", after=("prev", 1)), request("r2"),
                                request("local-1", agent=False), request("r1"),
                                request("r1")])
    assert [None if j is None else j.id for j in got] == ["j0", None, "mine", "j1", "j2"]
    first = got[0]
    assert first is not None and (first.status, first.runner_id, first.attempt,
                                  first.lease_expires_at) == ("running", "r1", 1, 200.0)
    assert store.ended_attempt("prev", 1, "r1") == ("succeeded", "j0", 1)
    assert [a.runner_id for a in store.attempts("j1")] == ["r1"]
    assert store.get_job("j3").status == "queued"  # type: ignore[union-attr]
    assert store.get_job("gpu00").status == "queued"  # type: ignore[union-attr]
    assert store.get_runner("r2").last_seen_at is None  # type: ignore[union-attr]
    actions = [(e.action, e.job_id) for e, _, _ in store.audit_records()][-4:]
    assert actions == [("job.claimed:r1", "j0"), ("job.claimed:local-1", "mine"),
                       ("job.claimed:r1", "j1"), ("job.claimed:r1", "j2")]
    assert store.claim_attempts([]) == []
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_completions_in_one_go_are_fenced_each_and_keep_their_order(store_url: str) -> None:
    """finish_attempts (on PostgreSQL one statement for the jobs, attempts and leases of all
    the completions of a kind, one for their steps, one for their artifacts): a fenced one
    changes nothing, the same job named twice is recorded once, a second attempt's steps
    replace the lost attempt's, and the events come in the requests' order, each request's
    lease revocations after its own events."""
    from stockade.store.interface import FinishRequest, LeaseRow, Revocation, StepRow

    store = open_store(store_url)
    enrolled(store)
    for n in range(4):
        store.insert_job(job(f"j{n}", float(n)), ev("job.admitted", f"j{n}"))
    def claim() -> JobRow | None:
        return store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                                   lambda j: True, agent=True)
    assert claim() is not None  # j0: lost, then claimed again
    assert [j.id for j, again in store.expire_leases(
        1000.0, lambda j, again: ev("job.lost", j.id)) if again] == ["j0"]
    for _ in range(4):
        assert claim() is not None  # j0 (its second attempt), j1, j2, j3
    store.insert_leases([LeaseRow("l1", "j2", 1, "r1", "token", 1, "env", 3.0, 1e12, None)],
                        [ev("secret.issued", "j2")])

    def done(job_id: str, runner_id: str = "r1", status: str = "succeeded",
             steps: list[StepRow] | None = None, revoke: bool = False, attempt: int = 1,
             **changes: object) -> FinishRequest:
        return FinishRequest(job_id, attempt, runner_id, {"status": status, **changes},
                             steps or [], [], [ev(f"job.{status}", job_id)],
                             Revocation(9.0, lambda row: ev(f"secret.revoked:{row.id}",
                                                            row.job_id)) if revoke else None)

    results = store.finish_attempts([
        done("j1", steps=[StepRow(0, "build", "succeeded", 0, 0.5),
                          StepRow(1, "test", "succeeded", 0, 0.25)]),
        done("j3", runner_id="r2"),  # another runner's: fenced
        done("j2", revoke=True, status="failed", failure_reason="step_failed", exit_code=3),
        done("j1", status="failed"),  # the same job again: already ended
        done("j0"),  # its lost first attempt: fenced
        done("j0", attempt=2, steps=[StepRow(0, "again", "succeeded", 0, 0.1)]),
    ])
    assert results == [True, False, True, False, False, True]
    assert [s.name for s in store.job_steps("j0")] == ["again"]
    assert [(a.attempt, a.outcome) for a in store.attempts("j0")] == [(1, "lost"),
                                                                     (2, "succeeded")]
    assert [(s.name, s.duration_s) for s in store.job_steps("j1")] == [("build", 0.5),
                                                                       ("test", 0.25)]
    j2 = store.get_job("j2")
    assert j2 is not None and (j2.status, j2.failure_reason, j2.exit_code) == (
        "failed", "step_failed", 3)
    assert store.get_job("j3").status == "running"  # type: ignore[union-attr]
    assert store.get_job("j1").status == "succeeded"  # type: ignore[union-attr]
    assert store.get_lease("l1").revoked_at == 9.0  # type: ignore[union-attr]
    assert [(a.outcome, a.ended_at is not None) for a in store.attempts("j2")] == [
        ("failed", True)]
    actions = [(e.action, e.job_id) for e, _, _ in store.audit_records()][-4:]
    assert actions == [("job.succeeded", "j1"), ("job.failed", "j2"),
                       ("secret.revoked:l1", "j2"), ("job.succeeded", "j0")]
    assert store.finish_attempts([]) == []
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_completions_and_the_claims_they_bring_in_one_go(store_url: str) -> None:
    """finish_and_claim (on PostgreSQL the completions and the claims' first page travel
    together): a recorded completion's claim takes the oldest job and is remembered by its
    attempt; a fenced completion's claim takes nothing and leaves the queue as it was; a
    plain claim takes the next job; the events come completions first, then claims."""
    from stockade.store.interface import ClaimRequest, FinishRequest

    store = open_store(store_url)
    enrolled(store)
    for n in range(2):
        store.insert_job(job(f"run{n}", float(n)), ev("job.admitted", f"run{n}"))
    for _ in range(2):
        assert store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                                   lambda j: True, agent=True) is not None
    for n in range(3):
        store.insert_job(job(f"q{n}", 10.0 + n), ev("job.admitted", f"q{n}"))

    def claim(after: tuple[str, int] | None) -> ClaimRequest:
        return ClaimRequest("r1", lambda j: 200.0, lambda j: ev("job.claimed", j.id),
                            lambda j: True, True, after)

    def done(job_id: str, runner_id: str) -> FinishRequest:
        return FinishRequest(job_id, 1, runner_id, {"status": "succeeded"}, [], [],
                             [ev("job.succeeded", job_id)])

    held, jobs = store.finish_and_claim(
        [done("run0", "r1"), done("run1", "r9")],  # the second: another runner's, fenced
        [claim(("run1", 1)), claim(("run0", 1)), claim(None)], [1, 0, None])
    assert held == [True, False]
    assert [None if j is None else j.id for j in jobs] == [None, "q0", "q1"]
    assert store.ended_attempt("run0", 1, "r1") == ("succeeded", "q0", 1)
    assert store.get_job("run1").status == "running"  # type: ignore[union-attr]
    assert store.get_job("q2").status == "queued"  # type: ignore[union-attr]
    actions = [(e.action, e.job_id) for e, _, _ in store.audit_records()][-3:]
    assert actions == [("job.succeeded", "run0"), ("job.claimed", "q0"),
                       ("job.claimed", "q1")]
    assert store.finish_and_claim([], [claim(None)], [None])[1][0].id == "q2"  # type: ignore[union-attr]
    assert store.finish_and_claim([done("q0", "r1")], [], []) == ([True], [])
    assert verify_chain(store.audit_records()) is None
    store.close()
