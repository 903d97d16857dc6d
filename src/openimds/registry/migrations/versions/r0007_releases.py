"""When an address or a router scope last lost its port, for the IP reuse hold
(registry/reuse.py): table releases. Transient (rows older than a few seconds are pruned),
so it starts empty.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("key", sa.String(160), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_releases_at", "releases", ["at"])


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
