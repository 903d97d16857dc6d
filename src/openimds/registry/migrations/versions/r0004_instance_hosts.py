"""The compute node an instance runs on (commit d6ea7be): table instance_hosts.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instance_hosts",
        sa.Column("instance_id", sa.String(36), sa.ForeignKey("instances.id"),
                  primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
