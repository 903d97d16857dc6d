"""Wake every registry process the moment a write commits, on PostgreSQL: LISTEN/NOTIFY.

Each write transaction on PostgreSQL ends with `pg_notify('openimds_changes', revision)`
(`Store.write`), which PostgreSQL delivers at commit to every session listening on that
channel, in whichever registry process it lives. `listen()` holds one such session per
registry process (autocommit, application_name `openimds-registry-listen`) and calls
`wake()` per notification, so `/v1/changes` long-polls answer at once however many registry
processes share the database. Notifications sent while the session is down are lost, so on
every (re)connect it wakes everyone (they re-read the feed), and the long-polls keep a slow
re-check (`app.RECHECK_SLOW_S`) as a backstop; `live` says whether the session is up, and
while it is not, long-polls re-check at the fast rate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

CHANNEL = "openimds_changes"
APPLICATION_NAME = "openimds-registry-listen"
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0


def conninfo(url: URL) -> str:
    """A libpq URI for the store's SQLAlchemy URL (driver name dropped)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    def __init__(self, url: URL, wake: Callable[[int | None], None]) -> None:
        self.dsn = conninfo(url)
        self.wake = wake
        self.live = False
        self.listened = asyncio.Event()  # set at the first LISTEN (start-up waits for it)
        self.notifications = 0
        self.connects = 0

    async def run(self) -> None:
        delay = BACKOFF_MIN_S
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True, application_name=APPLICATION_NAME) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.live = True
                    self.listened.set()
                    self.connects += 1
                    delay = BACKOFF_MIN_S
                    log.info("registry.listen channel=%s connects=%d", CHANNEL, self.connects)
                    self.wake(None)  # whatever was committed while we were not listening
                    async for note in conn.notifies():
                        self.notifications += 1
                        self.wake(_revision(note.payload))
            except (psycopg.Error, OSError) as exc:
                if self.live:
                    log.warning("registry.listen_lost reason=%s", str(exc).splitlines()[0]
                                if str(exc) else type(exc).__name__)
            finally:
                self.live = False
            self.wake(None)  # long-polls fall back to the fast re-check now
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)


def _revision(payload: str) -> int | None:
    """The committed revision a notification carries (None: not one of ours, wake anyway)."""
    try:
        return int(payload)
    except ValueError:
        return None
