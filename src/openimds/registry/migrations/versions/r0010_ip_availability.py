"""Each subnet's free pool addresses as availability ranges (registry/ipalloc.py): tables
ip_alloc, ip_ranges, ip_released, so a free-IP pick reads two index entries instead of every
used address of the subnet. They start empty: a subnet without its ip_alloc row has its
state built from port_ips by its first pick after the upgrade.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ip_alloc",
        sa.Column("subnet_id", sa.String(36), sa.ForeignKey("subnets.id"), primary_key=True),
        sa.Column("built_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "ip_ranges",
        sa.Column("subnet_id", sa.String(36), sa.ForeignKey("subnets.id"), nullable=False),
        sa.Column("first_key", sa.LargeBinary(16), nullable=False),
        sa.Column("last_key", sa.LargeBinary(16), nullable=False),
        sa.PrimaryKeyConstraint("subnet_id", "first_key"),
    )
    op.create_table(
        "ip_released",
        sa.Column("subnet_id", sa.String(36), sa.ForeignKey("subnets.id"), nullable=False),
        sa.Column("key", sa.LargeBinary(16), nullable=False),
        sa.Column("ip_address", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("subnet_id", "key"),
    )


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
