"""`decision-router api`, `decision-router tokens create|list|revoke`, `decision-router asyncapi`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from decision_router.cli_common import (
    App,
    _connect,
    app,
    err,
    existing_store_or_exit,
    fail,
    fail_rules,
    fail_store,
    out,
    settings_or_exit,
    smtp_or_exit,
)

tokens_app = App(help="API tokens: create (printed once), list, revoke.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@app.command()
def api(
    host: Annotated[
        str | None, typer.Option(help="Listen address (default DECISION_ROUTER_API_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port, 0-65535; 0: any free one (default DECISION_ROUTER_API_PORT or 8080).")
    ] = None,
) -> None:
    """Serve only the HTTP API and dashboard (the consumers run in `serve --no-api` or elsewhere)."""
    import signal

    # SIGHUP ("re-read the rules") ends a process that has no handler for it yet: held back until
    # run_api has one, then delivered to it (as `serve` does).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    import asyncio

    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.api.server import ApiStartError, run_api
    from decision_router.rules import RulesInvalid, load_rules
    from decision_router.store import create_schema, make_engine

    settings = settings_or_exit(options={"--host": ("api_host", host), "--port": ("api_port", port)})
    smtp_or_exit(settings)
    try:
        ruleset = load_rules(settings.rules_dir)
    except RulesInvalid as exc:
        fail_rules(settings, exc, starting=True)
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
    except SQLAlchemyError as exc:  # a file that is no SQLite store, a database that does not exist
        engine.dispose()
        fail_store(settings.database_url, exc)

    async def main() -> None:
        redis = await _connect(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run_api(settings, ruleset, engine, redis, stop)
        finally:
            await redis.aclose()

    try:
        asyncio.run(main())
    except ApiStartError as exc:
        fail(f"{exc}{'; set --port or DECISION_ROUTER_API_PORT to a free port' if exc.cannot_bind else ''}")
    finally:
        engine.dispose()


def _engine(*, existing: bool = False):  # type: ignore[no-untyped-def]
    """The settings and an engine on the store, its schema created if missing. `existing`: refuse an
    SQLite file that does not exist rather than create it (commands that read or change its tokens)."""
    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.store import create_schema, make_engine

    settings = settings_or_exit()
    if existing:
        existing_store_or_exit(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
    except SQLAlchemyError as exc:
        fail_store(settings.database_url, exc)
    return settings, engine


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help="publisher | owner | ops | admin")],
    owner: Annotated[str | None, typer.Option(help="For role owner: the owner id (from owners.yaml).")] = None,
    name: Annotated[str | None, typer.Option(help="A label, e.g. the system or person it is for.")] = None,
) -> None:
    """Create a token and print it once; the store keeps only its hash."""
    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.rules import RulesInvalid, load_rules
    from decision_router.tokens import TokenError, create_token

    settings, engine = _engine()
    owners = None
    if role == "owner":
        try:
            owners = load_rules(settings.rules_dir).owners
        except RulesInvalid:
            engine.dispose()
            fail(
                f"the rules in {settings.rules_dir} do not load, so owner {owner!r} cannot be checked; "
                "fix them (decision-router rules check) first",
                code=2,
            )
    try:
        secret, info = create_token(engine, role=role, owner=owner, name=name, owners=owners)
    except TokenError as exc:
        fail(str(exc), code=2)
    except SQLAlchemyError as exc:  # a read-only store file opens and reads, and refuses only the write
        fail_store(settings.database_url, exc, doing="write to")
    finally:
        engine.dispose()
    err.print(
        f"created token {info.token_id} (role {info.role}{', owner ' + info.owner if info.owner else ''}); "
        "it is shown only now:",
        highlight=False,
    )
    # The secret alone on stdout, so `TOKEN=$(decision-router tokens create ...)` works.
    print(secret)


@tokens_app.command("list")
def tokens_list(fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table") -> None:
    """Every token: id, name, role, owner, created, revoked (never the secret); an owner token whose owner
    is no longer in owners.yaml is marked "owner gone" (the API refuses it)."""
    from rich.table import Table

    from decision_router.audit import iso
    from decision_router.rules import RulesInvalid, load_rules
    from decision_router.tokens import list_tokens, owner_gone

    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, not {fmt!r}", code=2)
    settings, engine = _engine(existing=True)
    try:
        tokens = list_tokens(engine)
    finally:
        engine.dispose()
    owners = None
    if any(t.role == "owner" for t in tokens):
        try:
            owners = load_rules(settings.rules_dir).owners
        except RulesInvalid:
            # Still list the tokens: which owners left is what cannot be told.
            err.print(f"warning: the rules in {settings.rules_dir} do not load, so owner tokens whose owner left "
                      "cannot be marked (decision-router rules check)", highlight=False)
    rows = [
        {
            "id": t.token_id,
            "name": t.name,
            "role": t.role,
            "owner": t.owner,
            "created_at": iso(t.created_at),
            "revoked_at": iso(t.revoked_at),
            # null: not an owner token, or the owner directory could not be read
            "owner_gone": None if owners is None or t.role != "owner" else owner_gone(t.owner, owners),
        }
        for t in tokens
    ]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="API tokens", title_justify="left")
    for column in ("id", "name", "role", "owner", "created_at", "revoked_at"):
        table.add_column(column.replace("_", " "))
    for row in rows:
        cells = [str(row[c] or "-") for c in ("id", "name", "role", "owner", "created_at", "revoked_at")]
        if row["owner_gone"]:
            cells[3] += " (owner gone)"
        table.add_row(*cells)
    out.print(table)
    gone = sorted({str(r["owner"]) for r in rows if r["owner_gone"] and r["revoked_at"] is None})
    if gone:
        err.print(f"owner gone: {', '.join(gone)} no longer in {settings.rules_dir}/owners.yaml; the API refuses "
                  "their tokens (403): revoke them, or add the owner back if the removal was a mistake",
                  highlight=False)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token id from `tokens list`.")],
) -> None:
    """Revoke a token: every request with it is refused (401) from now on."""
    from sqlalchemy.exc import SQLAlchemyError

    from decision_router.tokens import TokenError, revoke_token

    settings, engine = _engine(existing=True)
    try:
        info = revoke_token(engine, token_id)
    except TokenError as exc:
        fail(str(exc), code=2)
    except SQLAlchemyError as exc:  # a read-only store file opens and reads, and refuses only the write
        fail_store(settings.database_url, exc, doing="write to")
    finally:
        engine.dispose()
    out.print(f"revoked token {info.token_id} ({info.role}{', ' + info.owner if info.owner else ''})", highlight=False)


@app.command()
def asyncapi(
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write here (.json or .yaml); default: stdout as YAML.")
    ] = None,
) -> None:
    """The stream contracts as an AsyncAPI document (generated by FastStream from the pydantic contracts)."""
    from decision_router.asyncapi import asyncapi_text

    if out_path is None:
        print(asyncapi_text("yaml"), end="")
        return
    suffix = out_path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        fail(f"--out must end in .json, .yaml or .yml, not {out_path.name!r}", code=2)
    text = asyncapi_text("json" if suffix == ".json" else "yaml")
    try:
        out_path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out_path}: {exc.strerror or exc}")
    out.print(f"wrote {out_path}", highlight=False)
