"""The database schema, in SQLAlchemy Core: the single source the migrations are checked against."""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("spec_json", Text, nullable=False),
    Column("labels_json", Text, nullable=False, server_default="[]"),
    Column("status", String(16), nullable=False, index=True),
    Column("failure_reason", String(32)),
    Column("exit_code", Integer),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("runner_id", String(64)),
    Column("lease_expires_at", Float),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("result_json", Text),
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
    Column("size", Integer, nullable=False),
)

audit_events = Table(
    "audit_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(100), nullable=False),
    Column("action", String(64), nullable=False),
    Column("job_id", String(32), index=True),
    Column("detail_json", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
