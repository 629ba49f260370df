"""Persistence of jobs, steps, artifacts and audit events.

The schema is defined once with SQLAlchemy Core (:mod:`stockade.store.schema`) and evolved with
Alembic migrations (``migrations/``). The embedded SQLite store (:mod:`stockade.store.sqlite`)
runs the migrations when the database is behind, then talks to SQLite through the standard
library driver so that ``stockade run`` does not pay SQLAlchemy's import time on every job.
"""

from stockade.store.interface import ArtifactRow, JobRow, StepRow, Store

__all__ = ["ArtifactRow", "JobRow", "StepRow", "Store"]
