"""What each agent's last heartbeat answer told it about its peers (commit ab9a483):
agents.peers, NULL (unknown) on existing rows.

It replaced agents.alive_since (commit c539004, never in a release but possible in a
registry run from main between the two): dropped where present.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    have: set[str] = set()
    if not context.is_offline_mode():
        have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("agents")}
    with op.batch_alter_table("agents") as batch:
        if "peers" not in have:
            batch.add_column(sa.Column("peers", sa.Integer, nullable=True))
        if "alive_since" in have:
            batch.drop_column("alive_since")


def downgrade() -> None:
    raise NotImplementedError("registry migrations go forward only: restore a backup instead")
