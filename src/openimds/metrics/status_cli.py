"""`openimds status [--watch]`: this node's services at a glance, from their /metrics."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from openimds.cli import add_command


def _status(args: argparse.Namespace, settings: Any) -> int:
    from openimds.metrics.status import COLUMNS, scrape_all, summarize, table_rows
    from openimds.output import emit_list, emit_one

    def show(rows: list[dict[str, Any]]) -> None:
        if args.format == "json":
            emit_one({"interval_s": args.interval, "services": rows}, "json")
        else:
            emit_list(table_rows(rows), COLUMNS, args.format)

    before = scrape_all(settings)
    if args.interval > 0:
        time.sleep(args.interval)
    while True:
        now = scrape_all(settings)
        rows = summarize(now, before)
        if args.watch and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")  # clear the screen, cursor home
        if args.watch:
            sys.stdout.write(time.strftime("openimds status  %H:%M:%S  (Ctrl-C stops)\n"))
        show(rows)
        sys.stdout.flush()
        if not args.watch:
            return 0 if all(r["state"] == "up" for r in rows) else 1
        before = now
        try:
            time.sleep(max(args.interval, 0.2))
        except KeyboardInterrupt:
            return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        sub, "status",
        _status, "every service's state, request rate, error ratio, p99 and connections ended "
        "by a timeout per hop, cache hit ratio and change-feed lag, read from their /metrics "
        "([metrics] ports)",
    )
    parser.add_argument("--watch", action="store_true", help="refresh every --interval")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between the two scrapes rates come from (default 1)")
