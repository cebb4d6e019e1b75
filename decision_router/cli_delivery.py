"""`decision-router redrive deliveries`: re-send what is on deliveries:dlq, once each."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from decision_router.cli import App, _connect, app, fail, out, settings_or_exit

if TYPE_CHECKING:
    from redis.asyncio import Redis

redrive_app = App(help="Re-send dead-lettered deliveries.", no_args_is_help=True)
app.add_typer(redrive_app, name="redrive")


@redrive_app.command("deliveries")
def redrive_deliveries() -> None:
    """Re-send every entry on deliveries:dlq once (a new failure is dead-lettered again)."""
    import asyncio

    from decision_router.notify import ChannelDelivery, redrive
    from decision_router.pipeline import utcnow
    from decision_router.rules import RulesInvalid, load_rules
    from decision_router.store import create_schema, make_engine

    settings = settings_or_exit()
    try:
        ruleset = load_rules(settings.rules_dir)
    except RulesInvalid as exc:
        fail(f"the rules in {settings.rules_dir} are invalid:\n{exc}")
    engine = make_engine(settings.database_url)
    create_schema(engine)

    async def run() -> tuple[int, int]:
        redis: Redis = await _connect(settings)
        channels = ChannelDelivery(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=utcnow)
        try:
            return await redrive(channels)
        finally:
            await channels.close()
            await redis.aclose()

    try:
        sent, delivered = asyncio.run(run())
    finally:
        engine.dispose()
    out.print(f"re-sent {sent} dead-lettered deliveries: {delivered} delivered, {sent - delivered} dead-lettered again")
    if sent and delivered < sent:
        raise typer.Exit(1)
