"""The schema of the first release (commit 2515642, 2026-11-23): the baseline.

Tables as that release's store.py defined them and its `metadata.create_all` made them.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None

ID = sa.String(36)


def upgrade() -> None:
    op.create_table(
        "state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("floor", sa.BigInteger, nullable=False),
        sa.Column("ec2_seq", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "projects",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "changes",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("revision", sa.BigInteger, nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("obj_id", sa.String(64), nullable=False),
        sa.Column("attrs", sa.JSON, nullable=False),
    )
    op.create_table(
        "networks",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, index=True),
        sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("mtu", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "routers",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, index=True),
        sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "keypairs",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("project_id", "name", name="uq_keypairs_project_name"),
    )
    op.create_table(
        "instances",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, index=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("availability_zone", sa.String(255), nullable=False),
        sa.Column("flavor", sa.String(255), nullable=False),
        sa.Column("launch_index", sa.Integer, nullable=False),
        sa.Column("key_name", sa.String(255), nullable=True),
        sa.Column("keypair_id", ID, nullable=True),
        sa.Column("keypair", sa.JSON, nullable=True),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("user_data", sa.LargeBinary, nullable=True),
        sa.Column("image_id", sa.String(255), nullable=True),
        sa.Column("ec2_id", sa.BigInteger, nullable=False, unique=True),
        sa.Column("password", sa.Text, nullable=True),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "subnets",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, index=True),
        sa.Column("network_id", ID, sa.ForeignKey("networks.id"), nullable=False, index=True),
        sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("ip_version", sa.Integer, nullable=False),
        sa.Column("cidr", sa.String(64), nullable=False),
        sa.Column("gateway_ip", sa.String(64), nullable=True),
        sa.Column("enable_dhcp", sa.Boolean, nullable=False),
        sa.Column("allocation_pools", sa.JSON, nullable=False),
        sa.Column("dns_nameservers", sa.JSON, nullable=False),
        sa.Column("host_routes", sa.JSON, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ports",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("network_id", ID, sa.ForeignKey("networks.id"), nullable=False, index=True),
        sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("mac_address", sa.String(17), nullable=False, unique=True),
        sa.Column("device_id", sa.String(255), nullable=False, index=True),
        sa.Column("device_owner", sa.String(255), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "port_ips",
        sa.Column("port_id", ID, sa.ForeignKey("ports.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("subnet_id", ID, sa.ForeignKey("subnets.id"), nullable=False, index=True),
        sa.Column("network_id", ID, sa.ForeignKey("networks.id"), nullable=False),
        sa.Column("ip_address", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("port_id", "ip_address"),
        sa.UniqueConstraint("network_id", "ip_address", name="uq_port_ips_network_ip"),
    )


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
