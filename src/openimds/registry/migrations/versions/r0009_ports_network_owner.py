"""Index ix_ports_network_owner on ports (network_id, device_owner): the routers of a network
(asked by every port write's IP reuse check, registry/reuse.py) without reading all of the
network's ports, which on one large network was every instance's port.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ports_network_owner", "ports", ["network_id", "device_owner"])


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
