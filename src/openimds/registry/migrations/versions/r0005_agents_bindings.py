"""Agent heartbeats and router/network scheduling (commit 1373fdb): tables agents and
bindings (empty: agents fill them with their next heartbeat).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("alive", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("host", "type"),
    )
    op.create_table(
        "bindings",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("resource_id", sa.String(36), nullable=False),
        sa.Column("host", sa.String(255), nullable=False, index=True),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("kind", "resource_id", "host"),
    )


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
