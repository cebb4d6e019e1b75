"""What an operator set on a table that the code drops and creates again (the tallies: tallies.py),
read from PostgreSQL's catalog before the drop and set again after it, in the same transaction: its
owner, the privileges others hold (table and columns), row-level security and its policies, and the
comments on it and its columns. Otherwise a DBA's settings would vanish, silently, at an upgrade.

What the new table cannot take is left out and logged (a warning): a column's grant or comment when
the column is gone, the owner when this role may not give it the table. A policy whose expression
names what the new table lacks is created denying (`false`): a permissive one then lets nobody in, a
restrictive one keeps everyone out, never more access than the DBA gave; its name tells what to fix.

The owner is set first, then the rest as its member (or a superuser) would. A table given to another
role than the one re-creating it: the code writing it (the tallies' trigger, which runs as that role)
needs rights on it, through the owner's role or grants, after as before; they are kept too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc, text
from sqlalchemy.engine import Connection

# Owner's entries included (acldefault when nobody granted anything): if the owner cannot be set again,
# the old owner keeps what it had as a grantee instead.
_GRANTS = text("""
    select distinct a.privilege_type, quote_ident(g.attname), a.is_grantable,
        case a.grantee when 0 then 'public' else quote_ident(pg_get_userbyid(a.grantee)) end as grantee
    from (select coalesce(relacl, acldefault('r', relowner)) as acl, null::name as attname
              from pg_class where oid = to_regclass(:table)
          union all
          select attacl, attname from pg_attribute where attrelid = to_regclass(:table) and attnum > 0
              and not attisdropped and attacl is not null) g, aclexplode(g.acl) a""")
_TABLE = text("""
    select quote_ident(pg_get_userbyid(relowner)), relrowsecurity, relforcerowsecurity,
        quote_literal(obj_description(oid, 'pg_class'))
    from pg_class where oid = to_regclass(:table)""")
_COLUMN_COMMENTS = text("""
    select quote_ident(attname), quote_literal(col_description(attrelid, attnum)) from pg_attribute
    where attrelid = to_regclass(:table) and attnum > 0 and not attisdropped
        and col_description(attrelid, attnum) is not null""")
_POLICIES = text("""
    select quote_ident(polname), polpermissive, polcmd,
        array(select case r when 0 then 'public' else quote_ident(pg_get_userbyid(r)) end
              from unnest(polroles) r order by 1),
        pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
    from pg_policy where polrelid = to_regclass(:table) order by polname""")
_COLUMNS = text("""
    select quote_ident(attname) from pg_attribute where attrelid = to_regclass(:table) and attnum > 0 and not attisdropped""")
_CURRENT_OWNER = text("select quote_ident(pg_get_userbyid(relowner)) from pg_class where oid = to_regclass(:table)")
_COMMANDS = {"*": "all", "r": "select", "a": "insert", "w": "update", "d": "delete"}


@dataclass(frozen=True)
class Policy:
    name: str  # quoted, as every name below
    permissive: bool
    command: str  # pg_policy.polcmd
    roles: list[str]
    using: str | None  # the expressions, as pg_get_expr prints them
    check: str | None

    def ddl(self, table: str, *, deny: bool = False) -> str:
        """Its CREATE POLICY; `deny`: with `false` for its expressions (see the module's doc)."""
        using = "false" if deny and self.using is not None else self.using
        check = "false" if deny and self.check is not None else self.check
        return (f"create policy {self.name} on {table} as {'permissive' if self.permissive else 'restrictive'}"
                f" for {_COMMANDS[self.command]} to {', '.join(self.roles)}"
                f"{f' using ({using})' if using is not None else ''}"
                f"{f' with check ({check})' if check is not None else ''}")


@dataclass(frozen=True)
class TableSettings:
    owner: str
    grants: list[tuple[str, str | None, bool, str]]  # privilege, column (None: the table), grantable, grantee
    row_security: bool
    force_row_security: bool
    policies: list[Policy]
    comment: str | None  # as SQL literals
    column_comments: dict[str, str]


def read_settings(connection: Connection, table: str) -> TableSettings | None:
    """What `table` (quoted, schema-qualified) has set now; None when there is no such table."""
    row = connection.execute(_TABLE, {"table": table}).first()
    if row is None:
        return None
    owner, row_security, force_row_security, comment = row
    return TableSettings(
        owner=owner, row_security=row_security, force_row_security=force_row_security, comment=comment,
        grants=[tuple(grant) for grant in connection.execute(_GRANTS, {"table": table})],
        policies=[Policy(*policy) for policy in connection.execute(_POLICIES, {"table": table})],
        column_comments=dict(connection.execute(_COLUMN_COMMENTS, {"table": table}).all()),
    )


def restore_settings(connection: Connection, table: str, settings: TableSettings) -> None:
    """Set `settings` (read_settings' of the table dropped) on the new `table`, as far as it can take them."""
    columns = set(connection.execute(_COLUMNS, {"table": table}).scalars())
    if not _try(connection, f"alter table {table} owner to {settings.owner}"):
        _log().warning("the table's owner is not kept: this role may not give the table to it",
                       table=table, owner=settings.owner)
    owner = connection.execute(_CURRENT_OWNER, {"table": table}).scalar_one()
    for privilege, column, grantable, grantee in settings.grants:
        if grantee == owner:  # has them all already
            continue
        if column is not None and column not in columns:
            _log().warning("a grant on a column is not kept: the new table has no such column", table=table,
                           column=column, privilege=privilege, grantee=grantee)
            continue
        _run(connection, f"grant {privilege}{f' ({column})' if column else ''} on {table} to {grantee}"
                         f"{' with grant option' if grantable else ''}")
    if settings.row_security:
        _run(connection, f"alter table {table} enable row level security")
    if settings.force_row_security:
        _run(connection, f"alter table {table} force row level security")
    for policy in settings.policies:
        if not _try(connection, policy.ddl(table)):
            _log().warning("a policy is kept denying (false): its expressions name what the new table lacks;"
                           " write it again", table=table, policy=policy.name, using=policy.using,
                           check=policy.check)
            _run(connection, policy.ddl(table, deny=True))
    if settings.comment is not None:
        _run(connection, f"comment on table {table} is {settings.comment}")
    for column, comment in settings.column_comments.items():
        if column not in columns:
            _log().warning("a column's comment is not kept: the new table has no such column", table=table,
                           column=column, comment=comment)
            continue
        _run(connection, f"comment on column {table}.{column} is {comment}")


def _run(connection: Connection, statement: str) -> None:
    # No parameters, not an empty set of them: psycopg would read a `%` (a comment's, a policy's LIKE)
    # as a placeholder.
    connection.exec_driver_sql(statement, execution_options={"no_parameters": True})


def _try(connection: Connection, statement: str) -> bool:
    """Run `statement` in a savepoint: False, with nothing done, when PostgreSQL refuses it (a name it
    lacks, a privilege this role lacks); the transaction goes on."""
    try:
        with connection.begin_nested():
            _run(connection, statement)
    except exc.ProgrammingError:
        return False
    return True


def _log() -> Any:
    import structlog  # here: the CLI's commands import tallies.py, and start faster without it

    return structlog.get_logger("decision_router.table_settings")
