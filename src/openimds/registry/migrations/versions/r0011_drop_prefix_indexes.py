"""Drop two indexes that another index of the same table already serves: ix_port_ips_port_id
(port_id leads the primary key (port_id, ip_address)) and ix_ports_network_id (network_id
leads ix_ports_network_owner (network_id, device_owner), 0009). Every port write kept both
in step for nothing: at 10,000 instances a create wrote ~20 pages, these two of them, and
each costs its share of the commit's WAL write and fsync (docs/benchmarks.md, "Create and
feed CPU at 10,000").

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # IF EXISTS: a database stamped 0009 or 0010 by hand after a create_all of this
    # release's tables (as tests make an older registry) never had them
    op.execute("DROP INDEX IF EXISTS ix_port_ips_port_id")
    op.execute("DROP INDEX IF EXISTS ix_ports_network_id")


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
