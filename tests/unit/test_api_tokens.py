"""Tokens: shown once, stored as a hash, verified in constant time, revocable; owner tokens
name an owner in the directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import Session

from decision_router.store import create_schema, make_engine
from decision_router.tokens import ApiToken, TokenError, create_token, list_tokens, revoke_token, verify_token

OWNERS = {"alice": object(), "bob": object()}


@pytest.fixture
def engine(tmp_path: Path):
    store = make_engine(f"sqlite:///{tmp_path / 'tokens.db'}")
    create_schema(store)
    yield store
    store.dispose()


def test_the_store_keeps_only_the_hash_and_verify_maps_the_token_to_its_principal(engine) -> None:
    secret, info = create_token(engine, role="owner", owner="alice", name="alice laptop", owners=OWNERS)
    other, _ = create_token(engine, role="owner", owner="alice", owners=OWNERS)
    assert secret != other and len(secret) > 40
    with Session(engine) as session:
        rows = list(session.scalars(select(ApiToken)))
    assert all(secret not in (r.token_hash, r.token_id, r.name) for r in rows)
    assert rows[0].token_hash == hashlib.sha256(secret.encode()).hexdigest()
    principal = verify_token(engine, secret)
    assert principal is not None
    assert (principal.role, principal.owner, principal.token_id) == ("owner", "alice", info.token_id)
    assert verify_token(engine, secret[:-1]) is None
    assert verify_token(engine, "") is None


def test_revoked_tokens_stop_working_and_list_shows_no_secrets(engine) -> None:
    secret, info = create_token(engine, role="ops", name="grafana")
    first = revoke_token(engine, info.token_id)
    assert verify_token(engine, secret) is None
    again = revoke_token(engine, info.token_id)
    assert again.revoked_at == first.revoked_at is not None
    [listed] = list_tokens(engine)
    assert (listed.token_id, listed.name, listed.role, listed.revoked_at) == (
        info.token_id,
        "grafana",
        "ops",
        first.revoked_at,
    )
    assert secret not in repr(listed)
    with pytest.raises(TokenError, match="no token with id 'nope'"):
        revoke_token(engine, "nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "root"}, "unknown role 'root'"),
        ({"role": "owner"}, "needs --owner"),
        ({"role": "owner", "owner": "carol"}, "'carol' is not in the owner directory.*known: alice, bob"),
        ({"role": "ops", "owner": "alice"}, "only applies to role owner"),
    ],
)
def test_bad_token_requests_are_refused_with_a_clear_reason(engine, kwargs, message) -> None:
    with pytest.raises(TokenError, match=message):
        create_token(engine, owners=OWNERS, **kwargs)
    assert list_tokens(engine) == []


def test_a_mistyped_owner_gets_its_close_match_and_an_unknown_one_a_short_list(engine) -> None:
    with pytest.raises(TokenError) as mistyped:
        create_token(engine, role="owner", owner="alcie", owners=OWNERS)
    assert str(mistyped.value) == "owner 'alcie' is not in the owner directory (owners.yaml); did you mean 'alice'?"
    many = {f"owner-{n:02d}": object() for n in range(35)}
    with pytest.raises(TokenError) as unknown:
        create_token(engine, role="owner", owner="zed", owners=many)
    assert str(unknown.value) == (
        "owner 'zed' is not in the owner directory (owners.yaml); "
        "known: owner-00, owner-01, owner-02, owner-03, owner-04, +30 more"
    )
    assert list_tokens(engine) == []


@pytest.mark.parametrize(("role", "owner"), [("owner", None), ("owner", ""), ("ops", "alice"), ("root", None)])
def test_a_token_row_no_create_token_would_write_is_refused_not_read_as_wider(engine, role, owner) -> None:
    # An owner token without an owner read every owner's stats (its "own" filter was no filter).
    secret, info = create_token(engine, role="ops", name="hand-edited")
    with Session(engine) as session:
        row = session.scalars(select(ApiToken).where(ApiToken.token_id == info.token_id)).one()
        row.role, row.owner = role, owner
        session.add(row)
        session.commit()
    assert verify_token(engine, secret) is None
