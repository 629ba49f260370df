"""The people's side of ``stockade server`` over real HTTP (issue 9): workspace uploads (hostile
archives refused, nothing stored), logs stored and followed live (from any replica), artifacts,
cancel, attempts, and the administrator's routes; a runner is played by the test
(``tests/support/fake_runner.py``)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.sandbox.archive import pack
from stockade.sandbox.interface import WorkspaceSource
from tests.conftest import run_cli
from tests.support.fake_runner import ANY_CODE, FakeRunner
from tests.support.fleet import Server, admin_token, enrol_token

SPEC = "name: served\nsteps:\n  - {name: a, run: 'true'}\n"
SLOW_LEASES = {"STOCKADE_RUNNER_LEASE": "60", "STOCKADE_RUNNER_HEARTBEAT": "2"}


class Api:
    """The server and an admin's, a submitter's and a viewer's token."""

    def __init__(self, server: Server) -> None:
        self.server, self.url, self.home = server, server.url, server.home
        self.admin = admin_token(server.home)
        self.submitter = admin_token(server.home, "submitter")
        self.viewer = admin_token(server.home, "viewer")
        self.http = httpx.Client(base_url=server.url, timeout=60)

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, path, headers=headers, **kwargs)

    def submit(self, token: str | None = None, spec: str = SPEC, **fields: Any) -> str:
        answer = self.call("POST", "/api/v1/jobs", token or self.submitter,
                           json={"spec": spec, **fields})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["job_id"])

    def runner(self, name: str = "fake") -> FakeRunner:
        return FakeRunner(self.url, enrol_token(self.home), name)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("fleet-api") / "home"
    assert run_cli(home, "jobs").returncode == 0
    server = Server(home, **ANY_CODE, **SLOW_LEASES)
    try:
        yield Api(server)
    finally:
        server.stop()


def _packed(tmp_path: Path) -> bytes:
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "main.py").write_text("print('hi')\n")
    (tree / "README").write_text("hello\n")
    (tree / "link").symlink_to("src/main.py")
    out = io.BytesIO()
    pack(WorkspaceSource(tree, ()), out, 1 << 20)
    return out.getvalue()


def _upload(api: Api, data: bytes, sha256: str | None = None,
            token: str | None = None) -> httpx.Response:
    return api.call("POST", "/api/v1/workspaces", token or api.submitter, content=data,
                    headers={"X-Stockade-Sha256": sha256 or hashlib.sha256(data).hexdigest()})


def test_a_workspace_travels_from_upload_to_the_runner(api: Api, tmp_path: Path) -> None:
    data = _packed(tmp_path)
    answer = _upload(api, data)
    assert answer.status_code == 201, answer.text
    sha = answer.json()["sha256"]
    assert answer.json()["size"] == len(data) and sha == hashlib.sha256(data).hexdigest()
    job_id = api.submit(workspace_sha256=sha)
    runner = api.runner("ws")
    a = runner.claim()
    assert (a["job_id"], a["workspace_sha256"]) == (job_id, sha)
    assert runner.workspace(a) == data
    assert runner.complete(a) == 200
    runner.close()


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], compress: bool = True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return gzip.compress(raw.getvalue()) if compress else raw.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "",
           mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


HOSTILE = {
    "absolute path": _tar(_entry("/etc/cron.d/x", data=b"x")),
    "dot-dot path": _tar(_entry("../escape", data=b"x")),
    "link out of the tree": _tar(_entry("out", tarfile.SYMTYPE, link="../../etc/passwd")),
    "absolute link": _tar(_entry("out", tarfile.SYMTYPE, link="/etc/shadow")),
    "character device": _tar(_entry("null", tarfile.CHRTYPE)),
    "fifo": _tar(_entry("pipe", tarfile.FIFOTYPE)),
    "hard link": _tar(_entry("a", data=b"x"), _entry("b", tarfile.LNKTYPE, link="a")),
    "setuid file": _tar(_entry("su", data=b"x", mode=0o4755)),
    "not gzip": _tar(_entry("a", data=b"x"), compress=False),
    "garbage": b"\x1f\x8b" + b"\x00" * 100,
    "empty": b"",
    "a bomb": gzip.compress(b"\x00" * (64 << 20)),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_and_nothing_is_stored(api: Api, kind: str) -> None:
    data = HOSTILE[kind]
    answer = _upload(api, data)
    assert 400 <= answer.status_code < 500, (kind, answer.status_code, answer.text)
    sha = hashlib.sha256(data).hexdigest()
    refused = api.call("POST", "/api/v1/jobs", api.submitter,
                       json={"spec": SPEC, "workspace_sha256": sha})
    assert refused.status_code == 422 and "no uploaded workspace" in refused.text


def test_an_upload_must_match_its_digest_and_size(api: Api, tmp_path: Path) -> None:
    data = _packed(tmp_path)
    wrong = hashlib.sha256(b"other").hexdigest()
    answer = _upload(api, data, sha256=wrong)
    assert answer.status_code == 422 and "sha256" in answer.text
    assert api.call("POST", "/api/v1/jobs", api.submitter, json={
        "spec": SPEC, "workspace_sha256": wrong}).status_code == 422
    for header in ("", "NOT-A-DIGEST", "A" * 64):
        bad = api.call("POST", "/api/v1/workspaces", api.submitter, content=data,
                       headers={"X-Stockade-Sha256": header} if header else {})
        assert bad.status_code == 422, bad.text
        assert header not in bad.text or not header  # never echoed
    host, port = api.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/v1/workspaces")
    for name, value in (("Authorization", f"Bearer {api.submitter}"),
                        ("X-Stockade-Sha256", wrong), ("Content-Length", str(1 << 40))):
        conn.putheader(name, value)
    conn.endheaders()
    assert conn.getresponse().status == 413  # refused on its declared size, unread
    conn.close()
    assert _upload(api, data, token=api.viewer).status_code == 403


def _run_job(api: Api, runner: FakeRunner, chunks: list[bytes], finish: bool = True
             ) -> tuple[str, dict[str, Any]]:
    job_id = api.submit()
    a = runner.claim()
    assert a["job_id"] == job_id
    for seq, chunk in enumerate(chunks):
        assert runner.log(a, seq, chunk) == 201
    if finish:
        assert runner.complete(a) == 200
    return job_id, a


def test_the_stored_log_is_the_runners_chunks_in_order(api: Api) -> None:
    runner = api.runner("logger")
    chunks = [b"10:00:00 ==> step a\n", b"10:00:01 | caf\xc3\xa9 \\x1b[31m\n",
              b"10:00:02 ==> done\n"]
    job_id, _ = _run_job(api, runner, chunks)
    answer = api.call("GET", f"/api/v1/jobs/{job_id}/log", api.viewer)
    assert answer.status_code == 200 and answer.content == b"".join(chunks)
    assert answer.headers["content-type"].startswith("text/plain")
    assert api.call("GET", "/api/v1/jobs/jnosuchjob/log", api.viewer).status_code == 404
    assert api.call("GET", "/api/v1/jobs/bad!id/log", api.viewer).status_code in (404, 422)
    runner.close()


def _events(response: httpx.Response) -> Iterator[tuple[str, str, str]]:
    kind, event_id, data = "message", "", []
    for line in response.iter_lines():
        if not line:
            yield kind, event_id, "\n".join(data)
            kind, event_id, data = "message", "", []
        elif line.startswith("data:"):
            data.append(line[6:])
        elif line.startswith("id:"):
            event_id = line[4:]
        elif line.startswith("event:"):
            kind = line[7:]


def test_a_follower_on_another_replica_sees_the_log_live(api: Api) -> None:
    """The runner writes through one replica, the reader follows through another."""
    replica = Server(api.home, **ANY_CODE, **SLOW_LEASES)
    runner = api.runner("live")
    try:
        job_id, a = _run_job(api, runner, [b"first line\n"], finish=False)
        seen: list[tuple[str, str, str]] = []
        with httpx.Client(base_url=replica.url, timeout=30) as reader, reader.stream(
                "GET", f"/api/v1/jobs/{job_id}/log/stream",
                headers={"Authorization": f"Bearer {api.viewer}"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _events(stream)
            seen.append(next(events))
            assert seen[0] == ("message", "1.0", "first line\n")
            assert runner.log(a, 1, b"second\nthird\n") == 201
            seen.append(next(events))
            assert seen[1] == ("message", "1.1", "second\nthird\n")
            threading.Timer(0.5, runner.complete, (a,)).start()
            kind, _, data = next(events)
        assert kind == "end" and json.loads(data)["status"] == "succeeded"
        resumed = api.call("GET", f"/api/v1/jobs/{job_id}/log/stream", api.viewer,
                           headers={"Last-Event-ID": "1.0"})
        got = list(_events(resumed))
        assert [e[1] for e in got] == ["1.1", ""] and got[-1][0] == "end"
        # (a superscript digit passes isdigit; 20 digits overflowed the database's integers)
        for bad in ("x", "1", "1.x", "-1.2", "9" * 30, "1." + "9" * 20, "1.\xb2"):
            answer = api.call("GET", f"/api/v1/jobs/{job_id}/log/stream", api.viewer,
                              headers={"Last-Event-ID": bad.encode("latin-1")})
            assert answer.status_code in (400, 422) and bad not in answer.text
    finally:
        runner.close()
        replica.stop()


def test_a_follower_that_stops_reading_does_not_stop_the_server(api: Api) -> None:
    runner = api.runner("flood")
    job_id, a = _run_job(api, runner, [], finish=False)
    for seq in range(8):
        assert runner.log(a, seq, b"y" * (1 << 20)) == 201
    with httpx.Client(base_url=api.url, timeout=30) as reader, reader.stream(
            "GET", f"/api/v1/jobs/{job_id}/log/stream",
            headers={"Authorization": f"Bearer {api.viewer}"}) as stalled:
        assert stalled.status_code == 200  # and then never read
        started = time.monotonic()
        assert api.call("GET", "/api/v1/jobs", api.viewer).status_code == 200
        assert time.monotonic() - started < 5
    assert runner.complete(a) == 200
    runner.close()


def test_one_token_holds_a_quarter_of_a_server_s_log_streams(api: Api) -> None:
    """16 followers of one token: the 17th gets 503 (one viewer held all 64 a server sends);
    another token still follows."""
    import contextlib

    runner = api.runner("followed")
    job_id, a = _run_job(api, runner, [], finish=False)
    path = f"/api/v1/jobs/{job_id}/log/stream"
    with contextlib.ExitStack() as stack:
        for _ in range(16):
            client = stack.enter_context(httpx.Client(base_url=api.url, timeout=30))
            held = stack.enter_context(client.stream(
                "GET", path, headers={"Authorization": f"Bearer {api.viewer}"}))
            assert held.status_code == 200
        refused = api.call("GET", path, api.viewer)
        assert refused.status_code == 503 and "this token has 16 logs" in refused.text
        assert refused.headers["retry-after"]
        other = admin_token(api.home, "viewer")
        with httpx.Client(base_url=api.url, timeout=30) as client, client.stream(
                "GET", path, headers={"Authorization": f"Bearer {other}"}) as followed:
            assert followed.status_code == 200
    assert runner.complete(a) == 200
    runner.close()


def test_artifacts_are_listed_and_downloaded_as_attachments(api: Api) -> None:
    runner = api.runner("artist")
    job_id, a = _run_job(api, runner, [b"x\n"], finish=False)
    page = b"<html><script>alert(1)</script></html>"
    digest = runner.artifact(a, page)
    assert runner.complete(a, artifacts=[{"path": "dist/x y.html", "sha256": digest,
                                          "size": len(page)}]) == 200
    listed = api.call("GET", f"/api/v1/jobs/{job_id}/artifacts", api.viewer).json()
    assert listed == [{"path": "dist/x y.html", "sha256": digest, "size": len(page)}]
    got = api.call("GET", f"/api/v1/jobs/{job_id}/artifacts/dist/x y.html", api.viewer)
    assert got.status_code == 200 and got.content == page
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''x%20y.html"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-length"] == str(len(page))
    assert got.headers["x-stockade-sha256"] == digest
    runner.close()
    runner = api.runner("big-artist")  # several slices of a download
    job_id, a = _run_job(api, runner, [b"x\n"], finish=False)
    big = os.urandom(2 * 1024 * 1024 + 3)
    digest = runner.artifact(a, big)
    assert runner.complete(a, artifacts=[{"path": "big.bin", "sha256": digest,
                                          "size": len(big)}]) == 200
    got = api.call("GET", f"/api/v1/jobs/{job_id}/artifacts/big.bin", api.viewer)
    assert got.status_code == 200 and got.content == big
    for missing in ("dist/other", "dist/%2e%2e/dist/x y.html", "x" * 5000):
        assert api.call("GET", f"/api/v1/jobs/{job_id}/artifacts/{missing}",
                        api.viewer).status_code == 404
    runner.close()


def test_cancel_attempts_and_who_may_cancel(api: Api) -> None:
    other = admin_token(api.home, "submitter")
    queued = api.submit()
    refused = api.call("POST", f"/api/v1/jobs/{queued}/cancel", other)
    assert refused.status_code == 403 and "submitted" in refused.text
    answer = api.call("POST", f"/api/v1/jobs/{queued}/cancel", api.submitter)
    assert answer.json() == {"job_id": queued, "state": "canceled"}
    assert api.call("POST", f"/api/v1/jobs/{queued}/cancel", api.admin).status_code == 409
    runner = api.runner("cancelled")
    running, a = _run_job(api, runner, [], finish=False)
    answer = api.call("POST", f"/api/v1/jobs/{running}/cancel", api.admin)
    assert answer.json()["state"] == "requested"
    assert runner.heartbeat(a) == {"status": 200, "held": True, "cancel": True}
    assert runner.complete(a, "failed", failure_reason="canceled") == 200
    attempts = api.call("GET", f"/api/v1/jobs/{running}/attempts", api.viewer).json()
    assert [(x["attempt"], x["runner_id"], x["runner_name"]) for x in attempts] == \
        [(1, runner.runner_id, "cancelled")]
    assert attempts[0]["ended_at"] is not None
    assert api.call("POST", "/api/v1/jobs/jnosuchjob00000000/cancel",
                    api.admin).status_code == 404
    runner.close()


def test_a_completion_can_bring_the_runners_next_job(api: Api) -> None:
    runner = api.runner("busy")
    first, a = _run_job(api, runner, [], finish=False)
    second = api.submit()
    body = {"status": "succeeded", "duration_s": 0.1}
    answer = runner.http.post(f"{runner._job(a)}/complete", params={"next": "true"},
                              json=body)
    assert answer.status_code == 200, answer.text
    b = answer.json()["next"]
    assert (answer.json()["recorded"], b["job_id"], b["attempt"]) == (True, second, 1)
    assert api.call("GET", f"/api/v1/jobs/{first}", api.viewer).json()["status"] == \
        "succeeded"
    assert api.call("GET", f"/api/v1/jobs/{second}", api.viewer).json()["status"] == "running"
    assert runner.heartbeat(b)["held"] is True
    # its answer lost, the runner sends the completion again: it gets the same next job
    again = runner.http.post(f"{runner._job(a)}/complete", params={"next": "true"}, json=body)
    assert again.status_code == 200
    same = {k: v for k, v in again.json()["next"].items() if k != "lease_expires_at"}
    assert same == {k: v for k, v in b.items() if k != "lease_expires_at"}  # (a heartbeat came)
    # a draining runner's completion is recorded, but it is handed nothing new
    assert api.call("POST", f"/api/v1/runners/{runner.runner_id}/drain",
                    api.admin).status_code == 200
    third = api.submit()
    answer = runner.http.post(f"{runner._job(b)}/complete", params={"next": "true"},
                              json=body)
    assert answer.json() == {"recorded": True, "next": None}
    # sent again it is answered the same, and a fenced one claims nothing either
    again = runner.http.post(f"{runner._job(b)}/complete", params={"next": "true"}, json=body)
    assert again.json() == {"recorded": True, "next": None}
    other = runner.http.post(f"{runner._job(b)}/complete", params={"next": "true"},
                             json={**body, "status": "error"})
    assert other.status_code == 409
    assert api.call("GET", f"/api/v1/jobs/{third}", api.viewer).json()["status"] == "queued"
    assert api.call("POST", f"/api/v1/jobs/{third}/cancel", api.admin).status_code == 200
    runner.close()


def test_runners_are_administered(api: Api) -> None:
    runner = api.runner("managed")
    listed = api.call("GET", "/api/v1/runners", api.admin).json()
    mine = next(r for r in listed if r["runner_id"] == runner.runner_id)
    assert (mine["name"], mine["status"], mine["pool"]) == ("managed", "active", "default")
    path = f"/api/v1/runners/{runner.runner_id}"
    assert api.call("POST", f"{path}/drain", api.admin).json()["status"] == "draining"
    assert api.call("POST", f"{path}/drain", api.admin).status_code == 409
    assert api.call("POST", f"{path}/resume", api.admin).json()["status"] == "active"
    assert api.call("POST", f"{path}/quarantine", api.admin).json()["status"] == "quarantined"
    assert runner.http.post("/api/v1/runner/claim").status_code == 401  # its session is gone
    assert api.call("POST", f"{path}/resume", api.admin).status_code == 409
    assert api.call("POST", "/api/v1/runners/r-nobody/drain", api.admin).status_code == 404
    assert api.call("POST", f"{path}/explode", api.admin).status_code == 422
    runner.close()


def test_enrolment_tokens_are_issued_to_admins(api: Api) -> None:
    answer = api.call("POST", "/api/v1/enrol-tokens", api.admin,
                      json={"pool": "gpu", "ttl_s": 60})
    assert answer.status_code == 201
    made = answer.json()
    assert made["token"].startswith(f"stke_{made['id']}_") and made["pool"] == "gpu"
    assert made["expires_at"] > time.time() + 50
    runner = FakeRunner(api.url, made["token"], "gpu-1")
    pools = {r["runner_id"]: r["pool"] for r in
             api.call("GET", "/api/v1/runners", api.admin).json()}
    assert pools[runner.runner_id] == "gpu"
    for body in ({"pool": "", "ttl_s": 60}, {"pool": "p", "ttl_s": 0},
                 {"pool": "p", "ttl_s": 1e9}, {"pool": "p\n", "ttl_s": 60}):
        assert api.call("POST", "/api/v1/enrol-tokens", api.admin,
                        json=body).status_code == 422, body
    trail = api.call("GET", "/api/v1/audit", api.admin).json()
    assert made["token"] not in json.dumps(trail)
    runner.close()


def test_the_audit_trail_of_one_job(api: Api) -> None:
    job_id = api.submit()
    records = api.call("GET", "/api/v1/audit", api.admin, params={"job": job_id}).json()
    assert [r["action"] for r in records] == ["job.admitted"]
    assert set(records[0]) == {"at", "actor", "action", "job_id", "detail", "hash"}
    assert api.call("GET", "/api/v1/audit", api.admin,
                    params={"job": "../x"}).status_code == 422


def test_secrets_go_in_and_never_come_out(api: Api) -> None:
    value = "s3cr3t-value-that-must-not-leak"
    import base64

    body = {"value": base64.b64encode(value.encode()).decode(), "refs": "refs/heads/main"}
    put = api.call("PUT", "/api/v1/secrets/DEPLOY_KEY", api.admin, json=body)
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 1 and put.json()["scope"]["refs"] == "refs/heads/main"
    again = api.call("PUT", "/api/v1/secrets/DEPLOY_KEY", api.admin,
                     json={**body, "refs": None, "trust": "protected"})
    assert again.json()["scope"] == {"jobs": "*", "labels": [], "trust": "protected",
                                     "refs": "refs/heads/main"}  # refs kept, not widened
    rotated = api.call("PUT", "/api/v1/secrets/DEPLOY_KEY", api.admin,
                       json={"value": body["value"], "rotate": True})
    assert rotated.json()["version"] == 3
    answers = [put, again, rotated, api.call("GET", "/api/v1/secrets", api.admin),
               api.call("GET", "/api/v1/secrets/DEPLOY_KEY", api.admin),
               api.call("GET", "/api/v1/audit", api.admin)]
    for answer in answers:
        assert value not in answer.text and body["value"] not in answer.text
    for bad in ({"value": "!!notbase64"}, {"value": base64.b64encode(b"ab").decode()},
                {"value": body["value"], "refs": "a b"}, {"value": body["value"], "x": 1}):
        refused = api.call("PUT", "/api/v1/secrets/DEPLOY_KEY", api.admin, json=bad)
        assert refused.status_code == 422 and "a b" not in refused.text, bad
    assert api.call("PUT", "/api/v1/secrets/NEW", api.admin,
                    json={"value": body["value"], "rotate": True}).status_code == 404
    assert api.call("PUT", "/api/v1/secrets/bad-name", api.admin, json=body).status_code == 422
    assert api.call("DELETE", "/api/v1/secrets/DEPLOY_KEY", api.admin).status_code == 200
    assert api.call("DELETE", "/api/v1/secrets/DEPLOY_KEY", api.admin).status_code == 404
    assert api.call("GET", "/api/v1/secrets/DEPLOY_KEY", api.admin).status_code == 404


def test_submissions_admitted_on_the_loop_or_in_a_thread_are_answered_alike(api: Api) -> None:
    # a small spec that needs no store or registry is admitted on the event loop; a big one,
    # one with secrets and one naming an image by tag in a worker thread
    from stockade.api.jobs import INLINE_SPEC_CHARS

    padding = "\n".join(f"# {'x' * 70}" for _ in range(INLINE_SPEC_CHARS // 70))
    big = f"{SPEC}{padding}\n"
    assert len(big) > INLINE_SPEC_CHARS
    for spec in (SPEC, big):
        answer = api.call("POST", "/api/v1/jobs", api.submitter, json={"spec": spec})
        assert answer.status_code == 201 and answer.json()["status"] == "queued", answer.text
        bad = api.call("POST", "/api/v1/jobs", api.submitter,
                       json={"spec": spec.replace("steps:", "stepz:")})
        assert bad.status_code == 422 and "stepz" in bad.text, bad.text
    secret = SPEC + "secrets: [{name: NO_SUCH_SECRET, as: env}]\n"
    denied = api.call("POST", "/api/v1/jobs", api.submitter, json={"spec": secret}).json()
    assert (denied["status"], denied["failure_reason"]) == ("denied", "secret_unavailable")
    records = api.call("GET", "/api/v1/audit", api.admin,
                       params={"job": denied["job_id"]}).json()
    assert [r["action"] for r in records] == ["job.denied", "secret.refused"]
    tagged = api.call("POST", "/api/v1/jobs", api.submitter,
                      json={"spec": SPEC + "image: 127.0.0.1:1/none:latest\n"}).json()
    assert (tagged["status"], tagged["failure_reason"]) == ("denied", "policy_denied")


def test_a_submission_on_the_fast_path_is_answered_as_by_its_route(api: Api) -> None:
    # no query and a JSON body: api/fastpath.py; a query: the FastAPI route
    json_type = {"content-type": "application/json"}
    answers = {}
    for path in ("/api/v1/jobs", "/api/v1/jobs?via=route"):
        ok = api.call("POST", path, api.submitter, json={"spec": SPEC, "trust": "untrusted"})
        assert ok.status_code == 201, ok.text
        answers[path] = {k: v for k, v in ok.json().items() if k != "job_id"}
        for bad in ('{"spec": 1}', '{"spec": "x", "extra": 1}', '{"spec": "x", "trust": "root"}',
                    "[]", "{", '{"spec": "name: t\\u0000"}'):
            got = api.call("POST", path, api.submitter, content=bad, headers=json_type)
            assert got.status_code == 422 and "Traceback" not in got.text, (path, bad, got.text)
        got = api.call("POST", path, api.submitter, content=json.dumps({"spec": SPEC}),
                       headers={"content-type": "text/plain"})
        assert got.status_code == 422, got.text
        for token, status in ((api.viewer, 403), ("stk_bad_token", 401), (None, 401)):
            got = api.call("POST", path, token, json={"spec": SPEC})
            assert got.status_code == status, (path, token, got.text)
    assert answers["/api/v1/jobs"] == answers["/api/v1/jobs?via=route"] == {
        "status": "queued", "trust": "untrusted", "failure_reason": None}


def test_a_ref_the_token_may_not_speak_for_is_refused_audited_and_not_echoed(api: Api) -> None:
    made = run_cli(api.home, "token", "create", "t-fork", "--role", "submitter", "--refs",
                   "refs/pull/*")
    assert made.returncode == 0, made.stderr
    fork = made.stdout.strip()
    token_id = fork.split("_")[1]
    for path in ("/api/v1/jobs", "/api/v1/jobs?via=route"):  # fast path, route
        got = api.call("POST", path, fork, json={"spec": SPEC, "ref": "refs/heads/main"})
        assert got.status_code == 403 and "refs/pull/*" in got.text, got.text
        assert "refs/heads/main" not in got.text
        odd = api.call("POST", path, fork, json={"spec": SPEC, "ref": "refs/pull/1\u0000x"})
        assert odd.status_code == 400 and "x00" not in odd.text and "pull/1" not in odd.text
    records = api.call("GET", "/api/v1/audit", api.admin).json()
    refused = [r for r in records if r["action"] == "api.refused"
               and r["detail"].get("claimed_token") == token_id]
    assert [r["detail"]["path"] for r in refused] == ["/api/v1/jobs"] * 2, refused


def test_a_submission_names_an_existing_workspace(api: Api) -> None:
    answer = api.call("POST", "/api/v1/jobs", api.submitter,
                      json={"spec": SPEC, "workspace_sha256": "f" * 64})
    assert answer.status_code == 422
    assert api.call("POST", "/api/v1/jobs", api.submitter,
                    json={"spec": SPEC, "workspace_sha256": "../x"}).status_code == 422


@pytest.mark.parametrize("path", [
    "/api/v1/jobs/%00", "/api/v1/jobs/%ff%fe/log", "/api/v1/jobs/" + "a" * 100 + "/attempts",
    "/api/v1/jobs/j1/artifacts/%2e%2e/%2e%2e/etc/passwd", "/api/v1/runners/%0a/drain",
    "/api/v1/secrets/%C0%80", "/api/v1/jobs?limit=-1", "/api/v1/jobs?prefix=%27",
    "/api/v1/audit?job=" + "x" * 1000, "/api/v1/jobs/j1/log/stream",
])
def test_odd_paths_are_4xx_never_5xx(api: Api, path: str) -> None:
    for method in ("GET", "POST", "PUT", "DELETE"):
        answer = api.call(method, path, api.admin)
        assert 400 <= answer.status_code < 500, (method, path, answer.status_code)


def test_the_fast_path_refuses_what_the_routes_refuse(api: Api) -> None:
    """The well-formed hot requests are served without FastAPI (api/fastpath.py); what it
    does not take as it is goes to the route, which refuses it the same way, before anything
    is recorded; a completion that would break a table is refused, not a 500."""
    runner = api.runner("picky")
    job_id = api.submit()
    while (a := runner.claim())["job_id"] != job_id:  # what earlier tests left queued
        assert runner.complete(a) == 200
    page = b"page"
    digest = runner.artifact(a, page)
    art = {"path": "dist/p", "sha256": digest, "size": len(page)}
    body = json.dumps({"status": "succeeded", "duration_s": 0.1, "artifacts": [art, art]})
    path = f"/api/v1/runner/jobs/{a['job_id']}/{a['attempt']}/complete"
    auth = {"Authorization": runner.http.headers["Authorization"]}
    for query in ("", "?next=true", "?next=1"):  # fast path, fast path, route
        got = api.call("POST", path + query, None, content=body,
                       headers={**auth, "content-type": "application/json"})
        assert got.status_code == 422 and "same path" in got.text, got.text
    nul = json.dumps({"status": "succeeded", "duration_s": 0.1,
                      "steps": [{"name": "a\x00b", "status": "succeeded", "duration_s": 0.1}]})
    got = api.call("POST", path, None, content=nul,
                   headers={**auth, "content-type": "application/json"})
    assert got.status_code == 422 and "NUL" in got.text, got.text
    ok = json.dumps({"status": "succeeded", "duration_s": 0.1})
    for headers in ({"content-type": "text/plain"}, {}):  # FastAPI reads JSON bodies only
        got = api.call("POST", path, None, content=ok, headers={**auth, **headers})
        assert got.status_code == 422, got.text
    json_auth = {**auth, "content-type": "application/json"}
    got = api.call("POST", path + "?next=maybe", None, content=ok, headers=json_auth)
    assert got.status_code == 422, got.text
    got = api.call("POST", path + "?other=1", None, content=ok, headers=json_auth)
    assert got.status_code == 200, got.text  # the route ignores a query it does not know
    assert api.call("GET", f"/api/v1/jobs/{job_id}", api.viewer).json()["status"] == \
        "succeeded"
    claim = "/api/v1/runner/claim"
    for query in ("?wait=31", "?wait=-1", "?wait=x"):
        assert api.call("POST", claim + query, None, headers=auth).status_code == 422
    assert api.call("GET", claim, None, headers=auth).status_code == 405
    assert api.call("PUT", f"{path.removesuffix('/complete')}/log/1000000001", None,
                    content=b"x", headers=auth).status_code == 422
    runner.close()


def test_refusals_are_counted_once(api: Api) -> None:
    def refused() -> float:
        text = api.call("GET", "/metrics", api.viewer).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("stockade_api_refusals_total"))

    before = refused()
    for _ in range(5):
        assert api.call("POST", "/api/v1/runner/claim", "stks_nope_nope").status_code == 401
    assert refused() - before == 5
