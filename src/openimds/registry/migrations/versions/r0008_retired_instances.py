"""The IDs of deleted instances, never given to a new one (as Nova never reuses a UUID):
table retired_instances. Instances deleted before it are not known; it starts empty.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retired_instances",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("deleted_at", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
