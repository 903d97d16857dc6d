"""One VXLAN segment (VNI) per network (commit 45d2ce3): table segments.

Networks made before it get VNIs 1, 2, ... in the order they were created, as the
release that added the table numbered them at start.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "segments",
        sa.Column("network_id", sa.String(36), sa.ForeignKey("networks.id"), primary_key=True),
        sa.Column("segmentation_id", sa.Integer, nullable=False, unique=True),
    )
    # one statement, so --sql prints it too (window functions: SQLite >= 3.25, PostgreSQL)
    op.execute("INSERT INTO segments (network_id, segmentation_id) "
               "SELECT id, ROW_NUMBER() OVER (ORDER BY created_at, id) FROM networks")


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
