"""Running the Alembic migrations programmatically (imported only when the schema is behind)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "stockade.store:migrations")
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema."""
    command.upgrade(_config(url), "head")


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(_config("sqlite://")).get_current_head()
    assert head is not None
    return head
