"""What a DBA set on a table survives its re-creation (decision_router/table_settings.py) even when
this role may not set all of it again: the reinstall goes on, and the log says what was not kept.
The tallies' own reinstall is tested in test_tallies.py."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from decision_router.table_settings import read_settings, restore_settings
from tests.integration.test_tallies import a_role

pytestmark = pytest.mark.postgres


def test_an_owner_this_role_may_not_give_the_table_to_keeps_its_privileges_instead(pg_engine: Engine) -> None:
    # The role that re-creates the table is not a member of its owner's: ALTER ... OWNER TO is refused,
    # the table stays this role's, the old owner keeps what it could do with it, and the log says so.
    with a_role(pg_engine, every_table=False) as (owner, schema), \
            a_role(pg_engine, every_table=False) as (installer, _):
        old, new = f'"{schema}".dba_table', f'"{schema}".new_table'
        with pg_engine.begin() as connection:
            connection.execute(text(f'grant create on schema "{schema}" to "{installer}"'))
            connection.execute(text(f"create table {old} (k text)"))
            connection.execute(text(f'alter table {old} owner to "{owner}"'))
            connection.execute(text(f'revoke delete on {old} from "{owner}"'))  # the owner's own, as kept
            connection.execute(text(f"comment on table {old} is 'the DBA''s'"))
        with pg_engine.begin() as connection, capture_logs() as logs:
            connection.execute(text(f'set local role "{installer}"'))
            settings = read_settings(connection, old)
            assert settings is not None and settings.owner == owner  # quote_ident's: a plain name as is
            connection.execute(text(f"create table {new} (k text)"))
            restore_settings(connection, new, settings)
        assert [(log["event"], log["owner"]) for log in logs if log["log_level"] == "warning"] == [
            ("the table's owner is not kept: this role may not give the table to it", owner)]
        with pg_engine.connect() as connection:
            def of(table: str, statement: str) -> object:
                return connection.execute(text(statement), {"table": table, "role": owner}).scalar()

            assert of(new, "select pg_get_userbyid(relowner) from pg_class where oid = to_regclass(:table)") \
                == installer
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                expected = of(old, f"select has_table_privilege(:role, :table, '{privilege}')")
                assert of(new, f"select has_table_privilege(:role, :table, '{privilege}')") == expected, privilege
            assert of(new, "select obj_description(to_regclass(:table), 'pg_class')") == "the DBA's"
            assert read_settings(connection, f'"{schema}".missing') is None
