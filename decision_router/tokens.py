"""API tokens: create (shown once), list, revoke, verify.

The store keeps only sha256(token). The tokens are 256-bit random strings
(secrets.token_urlsafe(32)), so a plain fast hash is enough: there is no dictionary to
try against a leaked hash, which is what a slow password hash (bcrypt, scrypt) guards
against. Lookup is by hash, then the hash is compared with hmac.compare_digest so the
check itself is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select

from decision_router.echo import did_you_mean
from decision_router.tables import _when, as_utc

TOKEN_PREFIX = "drt_"
ROLES = ("publisher", "owner", "ops", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the role of their token and, for owner tokens, the owner id."""

    role: str
    owner: str | None
    token_id: str


class TokenError(ValueError):
    """A token request that cannot be honoured (bad role, unknown owner, unknown id)."""


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    token_id: str = Field(primary_key=True)
    token_hash: str = Field(index=True, unique=True)
    name: str | None = None
    role: str
    owner: str | None = None
    created_at: datetime = _when()
    revoked_at: datetime | None = _when(nullable=True)


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    name: str | None
    role: str
    owner: str | None
    created_at: datetime
    revoked_at: datetime | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


MAX_KNOWN_LISTED = 5  # owners listed when a mistyped one is like none of them


def _known(owner: str, owners: Mapping[str, object]) -> str:
    """The owner `owner` most likely mistypes; else the first few owners (a directory can hold hundreds)."""
    hint = did_you_mean(owner, owners)
    if hint:
        return hint
    known = sorted(owners)
    more = f", +{len(known) - MAX_KNOWN_LISTED} more" if len(known) > MAX_KNOWN_LISTED else ""
    return f"; known: {', '.join(known[:MAX_KNOWN_LISTED]) or 'none'}{more}"


def create_token(
    engine: Engine,
    *,
    role: str,
    owner: str | None = None,
    name: str | None = None,
    owners: Mapping[str, object] | None = None,
) -> tuple[str, TokenInfo]:
    """Make a token; returns (the secret, shown once, and its stored description).

    `owners` is the owner directory: an owner token must name an owner in it."""
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; one of: {', '.join(ROLES)}")
    if role == "owner":
        if not owner:
            raise TokenError("an owner token needs --owner")
        if owners is not None and owner not in owners:
            raise TokenError(f"owner {owner!r} is not in the owner directory (owners.yaml){_known(owner, owners)}")
    elif owner:
        raise TokenError(f"--owner only applies to role owner, not {role}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        token_id=secrets.token_hex(6),
        token_hash=hash_token(secret),
        name=name,
        role=role,
        owner=owner,
        created_at=_now(),
    )
    with Session(engine) as session:
        session.add(row)
        session.commit()
        session.refresh(row)
        return secret, _info(row)


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(
        token_id=row.token_id,
        name=row.name,
        role=row.role,
        owner=row.owner,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(row.revoked_at),  # type: ignore[arg-type]
    )


def list_tokens(engine: Engine) -> list[TokenInfo]:
    with Session(engine) as session:
        rows = session.exec(select(ApiToken).order_by(ApiToken.created_at, ApiToken.token_id)).all()
        return [_info(row) for row in rows]


def revoke_token(engine: Engine, token_id: str) -> TokenInfo:
    """Revoke by id (idempotent: revoking twice keeps the first revocation time)."""
    with Session(engine) as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            raise TokenError(f"no token with id {token_id!r}")
        if row.revoked_at is None:
            row.revoked_at = _now()
            session.add(row)
            session.commit()
            session.refresh(row)
        return _info(row)


def owner_gone(owner: str | None, owners: Mapping[str, object]) -> bool:
    """An owner token's owner is no longer in the owner directory `owners` (someone who left).

    Checked against the rules in force at each request rather than revoking the token: a reload that
    drops an owner by mistake is undone by the next one, with nothing stored to repair."""
    return owner is not None and owner not in owners


def gone_message(owner: str) -> str:
    return (f"owner {owner!r} is no longer in the owner directory (owners.yaml); "
            "ask an admin for a token of the alert's new owner")


def verify_token(engine: Engine, token: str) -> Principal | None:
    """The principal for a live token, or None for an unknown or revoked one."""
    digest = hash_token(token)
    with Session(engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at is not None:
        return None
    # create_token never writes such a row; one written into the table by hand is refused, not read as
    # something wider: an owner token without an owner would pass every "its own" filter as no filter.
    if row.role not in ROLES or (row.role == "owner") != bool(row.owner):
        return None
    return Principal(role=row.role, owner=row.owner, token_id=row.token_id)
