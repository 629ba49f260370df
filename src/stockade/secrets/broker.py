"""The broker: secrets in, scoped leases out, every access audited.

A job receives a secret only if the secret's scope admits it: the job's ref matches the scope's
ref glob, the job's trust is at least the scope's (``trusted`` by default), the job name matches
the scope's job glob and the job carries every label of the scope. Jobs of trust ``untrusted``
(fork pull requests, say) never receive any secret. The ref and the trust are decided by whoever
submits the job (the operator's credential); the job name and the labels are written in the
spec, so they only narrow a scope: a secret that must stay with protected branches binds on the
ref (``refs/heads/main``) and the trust, not on a name.

An issued secret is a lease bound to one attempt of one job, valid for the job's timeout and
revoked when the job ends; redeeming a lease that is revoked, expired or not the caller's is
refused and audited.
"""

import fnmatch
import json
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from stockade.api.protocol import TRUST_LEVELS, LeaseGrant
from stockade.audit import AuditEvent
from stockade.errors import PolicyDenied, UsageError
from stockade.store.interface import LeaseRow, Revocation, SecretRow, Store

if TYPE_CHECKING:
    from stockade.secrets.vault import Vault

MIN_LENGTH = 4
MAX_LENGTH = 64 * 1024
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")


class Scope(NamedTuple):
    """Which jobs may receive a secret."""

    jobs: str = "*"
    labels: tuple[str, ...] = ()
    trust: str = "trusted"
    refs: str = "*"  # a glob over the job's ref, e.g. refs/heads/main or refs/tags/*


class SecretInfo(NamedTuple):
    """What ``secret list`` shows: everything but the value."""

    name: str
    version: int
    scope: Scope
    key_id: str
    updated_at: float


def check_value(name: str, value: bytes) -> None:
    """Refuse names and values that cannot be handled safely, saying why."""
    if not _NAME.match(name):
        raise UsageError(f"{name!r} is not a valid secret name",
                         hint="use letters, digits and _ (it becomes an environment variable)")
    if not value:
        raise UsageError(f"the value of {name} is empty (nothing came on standard input?)",
                         hint=f"pass the value on standard input: printf %s VALUE | stockade "
                              f"secret set {name}")
    if len(value) < MIN_LENGTH:
        raise UsageError(
            f"the value of {name} is shorter than {MIN_LENGTH} characters",
            hint="values this short cannot be masked in logs without masking ordinary text; "
                 "use a longer secret")
    if len(value) > MAX_LENGTH:
        raise UsageError(f"the value of {name} is larger than {MAX_LENGTH} bytes")


class Broker:
    """Secrets over a :class:`~stockade.store.interface.Store` and a :class:`Vault`."""

    def __init__(self, store: Store, vault: Callable[[], "Vault"], actor: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._vault_factory = vault
        self._vault: Vault | None = None
        self.actor = actor
        self.clock = clock

    @property
    def vault(self) -> "Vault":
        """The master-key vault (opened on first use)."""
        if self._vault is None:
            self._vault = self._vault_factory()
        return self._vault

    def _event(self, action: str, job_id: str | None = None, **detail: object) -> AuditEvent:
        return AuditEvent(self.actor, action, self.clock(), job_id, dict(detail))

    def set(self, name: str, value: bytes, scope: Scope) -> int:
        """Store a new secret or a new version of one (scope replaced); return the version."""
        check_value(name, value)
        check_refs(scope.refs)
        if scope.trust not in TRUST_LEVELS[1:]:
            raise UsageError(f"{scope.trust!r} is not a trust level a secret can require",
                             hint="use trusted (default) or protected")
        old = self.store.get_secret(name)
        version = old.version + 1 if old else 1
        self._put(name, version, value, scope, old, "secret.rotated" if old else "secret.set")
        return version

    def rotate(self, name: str, value: bytes, refs: str | None = None) -> int:
        """A new value for an existing secret, same scope (or a new ref glob); return the new
        version."""
        old = self._require(name)
        check_value(name, value)
        scope = _scope(old)
        if refs is not None:
            scope = scope._replace(refs=check_refs(refs))
        self._put(name, old.version + 1, value, scope, old, "secret.rotated")
        return old.version + 1

    def _put(self, name: str, version: int, value: bytes, scope: Scope,
             old: SecretRow | None, action: str) -> None:
        sealed = self.vault.seal(name, version, value)
        now = self.clock()
        row = SecretRow(name, version, scope.jobs, json.dumps(list(scope.labels)), scope.trust,
                        scope.refs, sealed.key_id, sealed.nonce, sealed.ciphertext,
                        old.created_at if old else now, now)
        self.store.put_secret(row, self._event(action, secret=name, version=version,
                                               key_id=sealed.key_id, refs=scope.refs,
                                               trust=scope.trust))

    def _require(self, name: str) -> SecretRow:
        row = self.store.get_secret(name)
        if row is None:
            raise UsageError(f"there is no secret named {name}",
                             hint="list them with: stockade secret list")
        return row

    def remove(self, name: str) -> None:
        """Delete a secret (its leases can no longer be redeemed)."""
        if not self.store.delete_secret(name, self._event("secret.removed", secret=name)):
            raise UsageError(f"there is no secret named {name}",
                             hint="list them with: stockade secret list")

    def secrets(self) -> list[SecretInfo]:
        """Every secret, without values."""
        return [SecretInfo(r.name, r.version, _scope(r), r.key_id, r.updated_at)
                for r in self.store.list_secrets()]

    def refusal(self, name: str, job_name: str, labels: tuple[str, ...], trust: str,
                ref: str) -> str | None:
        """Why the job may not receive ``name`` (None if it may).

        ``trust`` and ``ref`` come from the submitter; ``job_name`` and ``labels`` from the
        spec."""
        if trust == "untrusted":
            return f"jobs of trust 'untrusted' never receive secrets ({name} requested)"
        row = self.store.get_secret(name)
        if row is None:
            return f"there is no secret named {name}"
        scope = _scope(row)
        if not fnmatch.fnmatchcase(ref, scope.refs):
            return f"{name} is scoped to refs matching {scope.refs!r}, not {ref!r}"
        if TRUST_LEVELS.index(trust) < TRUST_LEVELS.index(scope.trust):
            return f"{name} needs trust {scope.trust!r}, the job has {trust!r}"
        if not fnmatch.fnmatchcase(job_name, scope.jobs):
            return f"{name} is scoped to jobs matching {scope.jobs!r}, not {job_name!r}"
        missing = [label for label in scope.labels if label not in labels]
        if missing:
            return f"{name} needs the job labels {', '.join(missing)}"
        return None

    def refuse(self, job_id: str, name: str, reason: str) -> None:
        """Audit a refusal at admission."""
        self.store.record([self._event("secret.refused", job_id, secret=name, reason=reason)])

    def issue(self, job_id: str, attempt: int, runner_id: str,
              requests: list[tuple[str, str]], ttl: float) -> tuple[LeaseGrant, ...]:
        """Leases for ``(name, delivery)`` requests, bound to this attempt."""
        now = self.clock()
        leases, events, grants = [], [], []
        for name, delivery in requests:
            row = self.store.get_secret(name)
            if row is None:  # removed since admission: a grant that can never be redeemed
                events.append(self._event("secret.refused", job_id, secret=name,
                                          reason="removed before the job started"))
                grants.append(LeaseGrant(name, f"none-{os.urandom(6).hex()}", delivery))
                continue
            lease = LeaseRow(f"lease-{os.urandom(12).hex()}", job_id, attempt, runner_id, name,
                             row.version, delivery, now, now + ttl, None)
            leases.append(lease)
            events.append(self._event("secret.issued", job_id, secret=name,
                                      version=row.version, lease=lease.id, attempt=attempt,
                                      delivery=delivery, expires_at=lease.expires_at))
            grants.append(LeaseGrant(name, lease.id, delivery))
        self.store.insert_leases(leases, events)
        return tuple(grants)

    def redeem(self, lease_id: str, job_id: str, attempt: int, runner_id: str) -> bytes:
        """The value behind a live lease held by this attempt; refused (and audited) otherwise."""
        lease = self.store.get_lease(lease_id)
        problem = _lease_problem(lease, job_id, attempt, runner_id, self.clock())
        if problem is None and lease is not None:
            row = self.store.get_secret(lease.secret_name)
            if row is None or row.version != lease.secret_version:
                problem = "the secret was removed or rotated since the lease was issued"
            else:
                from stockade.secrets.vault import Sealed

                return self.vault.unseal(row.name, row.version,
                                         Sealed(row.key_id, row.nonce, row.ciphertext))
        secret = lease.secret_name if lease else None
        owner = lease.job_id if lease else job_id  # the refusal belongs to the lease's job
        self.store.record([self._event("secret.lease_refused", owner, lease=lease_id,
                                       secret=secret, reason=problem, requested_for=job_id,
                                       attempt=attempt, runner_id=runner_id)])
        raise PolicyDenied(f"lease {lease_id} refused: {problem}")

    def revoke(self, job_id: str, attempt: int) -> int:
        """Revoke the attempt's leases (when the job ends); return how many."""
        at, event_for = self.revocation(job_id, attempt)
        return len(self.store.revoke_leases(job_id, attempt, at, event_for))

    def revocation(self, job_id: str, attempt: int) -> Revocation:
        """What revoking the attempt's leases now records: the time, an event per lease (for
        a store call that revokes them with other writes, such as the attempt's end)."""
        def event(lease: LeaseRow) -> AuditEvent:
            return self._event("secret.revoked", job_id, secret=lease.secret_name,
                               lease=lease.id, attempt=attempt)

        return Revocation(self.clock(), event)


def check_refs(refs: str) -> str:
    """``refs`` if it is a usable ref glob (UsageError otherwise)."""
    if not refs or len(refs) > 200 or not refs.isprintable() or any(c.isspace() for c in refs):
        raise UsageError(f"{refs[:200]!r} is not a ref glob",
                         hint="use e.g. refs/heads/main, refs/tags/* or * (any ref), at most "
                              "200 characters without spaces")
    return refs


def _scope(row: SecretRow) -> Scope:
    return Scope(row.scope_jobs, tuple(json.loads(row.scope_labels)), row.scope_trust,
                 row.scope_refs)


def _lease_problem(lease: LeaseRow | None, job_id: str, attempt: int, runner_id: str,
                   now: float) -> str | None:
    if lease is None:
        return "no such lease"
    if (lease.job_id, lease.attempt, lease.runner_id) != (job_id, attempt, runner_id):
        return "the lease belongs to another job, attempt or runner"
    if lease.revoked_at is not None:
        return "the lease was revoked when its job ended"
    if now > lease.expires_at:
        return "the lease expired"
    return None
