"""Neutron's IPv6 modes on subnets (commit a5b8e5b): subnets.ipv6_address_mode and
ipv6_ra_mode, NULL (no mode) on every existing subnet.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subnets") as batch:
        batch.add_column(sa.Column("ipv6_address_mode", sa.String(32), nullable=True))
        batch.add_column(sa.Column("ipv6_ra_mode", sa.String(32), nullable=True))


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
