"""`decision-router redrive deliveries`: re-send what is on deliveries:dlq, once each."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from decision_router.cli_common import (
    App,
    _connect,
    app,
    existing_store_or_exit,
    fail_rules,
    fail_store,
    out,
    run_on_redis,
    settings_or_exit,
    smtp_or_exit,
)
from decision_router.echo import counted
from decision_router.keys import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

MAX_LISTED = 20  # entries left on the DLQ listed by id; the rest counted

redrive_app = App(help="Re-send dead-lettered deliveries.", no_args_is_help=True)
app.add_typer(redrive_app, name="redrive")


@redrive_app.command("deliveries")
def redrive_deliveries() -> None:
    """Re-send every entry on deliveries:dlq once (a new failure is dead-lettered again)."""
    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.notify import ChannelDelivery, Redriven, redrive
    from decision_router.pipeline import utcnow
    from decision_router.rules import RulesInvalid, load_rules
    from decision_router.store import create_schema, make_engine

    settings = settings_or_exit()
    smtp_or_exit(settings)  # re-sends email too
    try:
        ruleset = load_rules(settings.rules_dir)
    except RulesInvalid as exc:
        fail_rules(settings, exc)
    # The dead-lettered deliveries are of alerts in serve's store: never record their re-sending in a new one.
    existing_store_or_exit(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
    except SQLAlchemyError as exc:  # a file that is no SQLite store, a database that does not exist
        engine.dispose()
        fail_store(settings.database_url, exc)

    async def run() -> Redriven:
        redis: Redis = await _connect(settings)
        channels = ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=utcnow)
        try:
            return await redrive(channels)
        finally:
            await channels.close()
            await redis.aclose()

    try:
        done = run_on_redis(settings, run())
    finally:
        engine.dispose()
    sent, delivered, pending = done.sent, done.delivered, done.pending
    still = f", {pending} still being sent by a running router" if pending else ""
    out.print(f"re-sent {counted(sent, 'dead-lettered delivery', 'dead-lettered deliveries')}: {delivered} delivered, "
              f"{sent - delivered - pending} dead-lettered again{still}")
    if done.left:
        dlq = Keys(settings.stream_prefix).deliveries_dlq
        out.print(f"left {counted(len(done.left), 'entry', 'entries')} on {dlq} with nothing to re-send:")
        for entry_id, why in done.left[:MAX_LISTED]:
            out.print(f"  {entry_id}: {why}")
        if len(done.left) > MAX_LISTED:
            out.print(f"  and {len(done.left) - MAX_LISTED} more")
    if done.left or delivered < sent:
        raise typer.Exit(1)
