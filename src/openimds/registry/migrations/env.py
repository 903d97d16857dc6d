"""Alembic's environment for the registry: run by `openimds.registry.migrations` only.

Online, it migrates over the connection the caller passes (already inside the transaction
that holds the schema lock), so alembic never opens or commits one of its own. Offline
(`registry migrate --sql`), it prints the statements for the configured URL's dialect.
"""

from __future__ import annotations

from alembic import context

from openimds.registry.store import metadata


def _run() -> None:
    config = context.config
    if context.is_offline_mode():
        context.configure(url=config.attributes["url"], target_metadata=metadata,
                          literal_binds=True, render_as_batch=True)
    else:
        context.configure(connection=config.attributes["connection"],
                          target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


_run()
