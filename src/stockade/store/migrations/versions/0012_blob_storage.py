"""On PostgreSQL a blob's bytes are stored out of line uncompressed (``STORAGE EXTERNAL``), so
that a download reads them a slice at a time (``substring`` fetches only the slice's chunks;
of a compressed value it decompresses everything before the slice, each time). Blobs stored
before keep their form. SQLite reads slices of any blob (incremental blob I/O).

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Blobs' data out of line, uncompressed (PostgreSQL only)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    """PostgreSQL's default storage again."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTENDED")
