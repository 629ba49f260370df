"""The database schema, in SQLAlchemy Core: the single source the migrations are checked against."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()
# 64 bits on PostgreSQL (BIGINT); on SQLite INTEGER is 64 bits, and as a key the rowid
BIG = Integer().with_variant(BigInteger(), "postgresql")

jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("spec_json", Text, nullable=False),
    Column("labels_json", Text, nullable=False, server_default="[]"),
    Column("status", String(16), nullable=False),  # indexed by ix_jobs_queue (0010)
    Column("failure_reason", String(32)),
    Column("exit_code", Integer),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("runner_id", String(64)),
    Column("lease_expires_at", Float),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("result_json", Text),
    Column("trust", String(16), nullable=False, server_default="trusted"),
    Column("ref", String(200), nullable=False, server_default="local"),
    # migration 0007 (the fleet)
    Column("max_attempts", Integer, nullable=False, server_default="1"),
    Column("cancel_requested_at", Float),
    Column("workspace_sha256", String(64)),
    Index("ix_jobs_queue", "status", "created_at", "id"),  # migration 0008
)

steps = Table(
    "steps", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("status", String(16), nullable=False),
    Column("exit_code", Integer),
    Column("duration_s", Float, nullable=False),
)

artifacts = Table(
    "artifacts", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("path", Text, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BIG, nullable=False),
)

audit_events = Table(
    "audit_events", metadata,
    Column("seq", BIG, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(100), nullable=False),
    Column("action", String(64), nullable=False),
    Column("job_id", String(32), index=True),
    Column("detail_json", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

audit_head = Table(  # one row: the count and last hash of audit_events (migration 0004)
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("count", BIG, nullable=False),
    Column("hash", String(64), nullable=False),
)

secrets = Table(
    "secrets", metadata,
    Column("name", String(100), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("scope_jobs", String(200), nullable=False),
    Column("scope_labels", Text, nullable=False),
    Column("scope_trust", String(16), nullable=False),
    Column("scope_refs", String(200), nullable=False, server_default="*"),
    Column("key_id", String(16), nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

leases = Table(
    "leases", metadata,
    Column("id", String(40), primary_key=True),
    Column("job_id", String(32), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("runner_id", String(64), nullable=False),
    Column("secret_name", String(100), nullable=False),
    Column("secret_version", Integer, nullable=False),
    Column("delivery", String(8), nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("revoked_at", Float),
)

api_tokens = Table(  # stockade server's API tokens (migration 0005): a hash, never the secret
    "api_tokens", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("role", String(16), nullable=False),
    Column("max_trust", String(16), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("refs", String(200), nullable=False, server_default="*"),  # migration 0006
)


# The fleet (migration 0007): runner agents, their enrolment, sessions and attempts; log chunks
# and blobs uploaded by runners (and workspaces by clients), so that any replica serves them.

enrol_tokens = Table(  # single-use, short-lived: only a hash of the secret part is kept
    "enrol_tokens", metadata,
    Column("id", String(32), primary_key=True),
    Column("pool", String(100), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
    Column("runner_id", String(64)),
    # migration 0008: what a runner enrolled with it may be (the admin's call, not the runner's)
    Column("labels_json", Text, nullable=False, server_default="[]"),
    Column("max_trust", String(16), nullable=False, server_default="trusted"),
)

runners = Table(
    "runners", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("pool", String(100), nullable=False),
    Column("labels_json", Text, nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("public_key", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # active, draining, quarantined, unattested
    Column("measurements_json", Text, nullable=False),
    Column("attested_at", Float),
    Column("created_at", Float, nullable=False),
    Column("last_seen_at", Float),
    Column("max_trust", String(16), nullable=False, server_default="trusted"),  # 0008
)

runner_sessions = Table(  # short-lived bearer tokens, each issued for a fresh attestation
    "runner_sessions", metadata,
    Column("id", String(32), primary_key=True),
    Column("runner_id", String(64), nullable=False, index=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

used_nonces = Table(  # attestation nonces already spent (until they expire anyway)
    "used_nonces", metadata,
    Column("nonce", String(128), primary_key=True),
    Column("expires_at", Float, nullable=False),
)

server_secrets = Table(  # shared by the replicas: e.g. the key that makes nonces
    "server_secrets", metadata,
    Column("name", String(32), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

attempts = Table(
    "attempts", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("runner_id", String(64), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("outcome", String(16), nullable=False),  # running, lost, or the job's status
    Column("log_bytes", Integer, nullable=False, server_default="0"),
    # migration 0009: the job (and attempt) a completion of this attempt also claimed
    Column("next_job_id", String(32)),
    Column("next_attempt", Integer),
)

log_chunks = Table(  # a retried chunk finds its (job, attempt, seq) taken: never duplicated
    "log_chunks", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("at", Float, nullable=False),
)

blobs = Table(  # content-addressed: uploaded workspaces and artifacts
    "blobs", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

attempt_uploads = Table(  # which attempt uploaded which blob (migration 0008): a completion may
    "attempt_uploads", metadata,  # name only artifacts its own attempt uploaded
    Column("job_id", String(32), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("sha256", String(64), primary_key=True),
)
