"""The administrator's routes: runners (list, drain, resume, quarantine), enrolment tokens,
the audit trail and the secret store. Every one needs the ``admin`` role; a refusal is audited.

A secret's value goes in (``PUT``, base64) and never comes out of any endpoint: the listing
shows names, scopes, versions and key ids only.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

import base64
import binascii
import json
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from stockade.api.common import ApiContext, needs, token_of
from stockade.api.jobs import JOB_PATTERN
from stockade.errors import UsageError
from stockade.secrets.broker import Broker, Scope, SecretInfo, check_refs
from stockade.store.interface import RunnerRow

RUNNER_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
SECRET_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"
MAX_AUDIT_RECORDS = 100_000


class EnrolTokenRequest(BaseModel):
    """An enrolment token to issue: for which pool, living how long."""

    model_config = {"extra": "forbid"}
    pool: str = Field(default="default", min_length=1, max_length=100)
    ttl_s: float = Field(default=600.0, gt=0, le=7 * 86400)
    labels: list[str] = Field(default=[], max_length=32)
    max_trust: Literal["untrusted", "trusted", "protected"] = "trusted"


class SecretRequest(BaseModel):
    """A secret's value (base64) and scope. Scope fields left out keep the secret's current
    ones (a new secret: the defaults). ``rotate``: the secret must exist, and only its value
    (and ``refs``, if given) changes."""

    model_config = {"extra": "forbid"}
    value: str = Field(max_length=90_000)
    jobs: str | None = Field(default=None, min_length=1, max_length=200)
    labels: list[str] | None = Field(default=None, max_length=32)
    trust: Literal["trusted", "protected"] | None = None
    refs: str | None = Field(default=None, min_length=1, max_length=200)
    rotate: bool = False


def runner_view(r: RunnerRow) -> dict[str, Any]:
    """A runner as ``GET /api/v1/runners`` lists it."""
    try:
        measured = json.loads(r.measurements_json)
    except ValueError:
        measured = {}
    return {"runner_id": r.id, "name": r.name, "pool": r.pool,
            "labels": json.loads(r.labels_json), "concurrency": r.concurrency,
            "status": r.status, "max_trust": r.max_trust,
            "attested_at": r.attested_at, "created_at": r.created_at,
            "last_seen_at": r.last_seen_at,
            "stockade_sha256": measured.get("stockade_sha256")
            if isinstance(measured, dict) else None}


def add_routes(app: FastAPI, ctx: ApiContext) -> None:
    """Add the administrator's routes to ``app``."""
    control, fleet = ctx.control, ctx.fleet
    admin = needs("admin")
    RunnerId = Path(pattern=RUNNER_PATTERN)
    SecretName = Path(pattern=SECRET_PATTERN)

    @app.get("/api/v1/runners", dependencies=[admin])
    def runners() -> list[dict[str, Any]]:
        return [runner_view(r) for r in fleet.store.runners()]

    @app.post("/api/v1/runners/{runner_id}/{action}", dependencies=[admin])
    def runner_action(request: Request, runner_id: str = RunnerId,
                      action: Literal["drain", "resume", "quarantine"] = Path()
                      ) -> dict[str, Any]:
        caller = token_of(request)
        if fleet.store.get_runner(runner_id) is None:
            raise HTTPException(404, "no such runner")
        actor = f"api:{caller.id}"
        failed: list[str] = []
        if action == "drain":
            done = fleet.drain(runner_id, actor)
        elif action == "resume":
            done = fleet.resume(runner_id, actor)
        else:
            lost = fleet.quarantine(runner_id, actor)
            done, failed = lost is not None, lost or []
        runner = fleet.store.get_runner(runner_id)
        status = runner.status if runner is not None else "unknown"
        if not done:
            raise HTTPException(409, f"the runner is {status}: it cannot {action}")
        return {"runner_id": runner_id, "status": status, "failed_jobs": failed}

    @app.post("/api/v1/enrol-tokens", status_code=201, dependencies=[admin])
    def enrol_token(body: EnrolTokenRequest, request: Request) -> dict[str, Any]:
        caller = token_of(request)
        try:
            row, token = fleet.create_enrol_token(body.pool, body.ttl_s, f"api:{caller.id}",
                                                  tuple(body.labels), body.max_trust)
        except UsageError as e:
            raise HTTPException(422, e.message) from e
        return {"token": token, "id": row.id, "pool": row.pool, "expires_at": row.expires_at,
                "labels": json.loads(row.labels_json), "max_trust": row.max_trust}

    @app.get("/api/v1/audit", dependencies=[admin])
    def audit(job: str | None = Query(None, pattern=JOB_PATTERN),
              limit: int = Query(MAX_AUDIT_RECORDS, ge=1, le=MAX_AUDIT_RECORDS)
              ) -> list[dict[str, Any]]:
        records = control.store.audit_records(job)[-limit:]
        return [{"at": e.at, "actor": e.actor, "action": e.action, "job_id": e.job_id,
                 "detail": e.detail, "hash": digest} for e, _, digest in records]

    def broker(actor: str) -> Broker:
        shared = control.broker
        if shared is None:
            raise HTTPException(409, "this server has no secret store")
        return Broker(control.store, lambda: shared.vault, actor=actor, clock=control.clock)

    def secret_view(info: SecretInfo) -> dict[str, Any]:
        return {"name": info.name, "version": info.version, "key_id": info.key_id,
                "updated_at": info.updated_at, "scope": _scope(info.scope)}

    @app.get("/api/v1/secrets", dependencies=[admin])
    def secrets(request: Request) -> list[dict[str, Any]]:
        caller = token_of(request)
        return [secret_view(s) for s in broker(f"api:{caller.id}").secrets()]

    @app.get("/api/v1/secrets/{name}", dependencies=[admin])
    def secret(request: Request, name: str = SecretName) -> dict[str, Any]:
        caller = token_of(request)
        found = [s for s in broker(f"api:{caller.id}").secrets() if s.name == name]
        if not found:
            raise HTTPException(404, "no such secret")
        return secret_view(found[0])

    @app.put("/api/v1/secrets/{name}", dependencies=[admin])
    def put_secret(body: SecretRequest, request: Request, name: str = SecretName
                   ) -> dict[str, Any]:
        caller = token_of(request)
        b = broker(f"api:{caller.id}")
        try:
            value = base64.b64decode(body.value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise HTTPException(422, "value: not base64") from e
        before = {s.name: s.scope for s in b.secrets()}.get(name)
        try:
            if body.rotate:
                version = b.rotate(name, value, refs=body.refs)
            else:
                base = before or Scope()
                scope = Scope(body.jobs or base.jobs,
                              base.labels if body.labels is None else tuple(body.labels),
                              body.trust or base.trust, body.refs or base.refs)
                _check_scope(scope)
                version = b.set(name, value, scope)
        except UsageError as e:
            raise HTTPException(404 if "no secret named" in e.message else 422,
                                _secret_problem(e.message)) from e
        after = {s.name: s.scope for s in b.secrets()}.get(name)
        return {"name": name, "version": version, "scope": _scope(after) if after else None,
                "previous_scope": _scope(before) if before else None}

    @app.delete("/api/v1/secrets/{name}", dependencies=[admin])
    def delete_secret(request: Request, name: str = SecretName) -> dict[str, Any]:
        caller = token_of(request)
        try:
            broker(f"api:{caller.id}").remove(name)
        except UsageError as e:
            raise HTTPException(404, "no such secret") from e
        return {"name": name, "removed": True}


def _scope(scope: Scope) -> dict[str, Any]:
    return {"jobs": scope.jobs, "labels": list(scope.labels), "trust": scope.trust,
            "refs": scope.refs}


def _check_scope(scope: Scope) -> None:
    """Globs and labels are printable text without spaces (as the CLI's arguments are)."""
    check_refs(scope.refs)
    for text in (scope.jobs, *scope.labels):
        if not text or len(text) > 200 or not text.isprintable() or " " in text:
            raise UsageError("a job glob or label is printable text without spaces")


def _secret_problem(message: str) -> str:
    """The broker's refusal, without the value or glob it may quote."""
    if "shorter than" in message:
        return "the value is shorter than 4 bytes: it could not be masked in logs"
    if "larger than" in message:
        return "the value is larger than 64 KiB"
    if "ref glob" in message:
        return "refs: not a ref glob (e.g. refs/heads/main, refs/tags/* or *)"
    return message.split(":")[0][:200] if "'" in message else message[:200]
