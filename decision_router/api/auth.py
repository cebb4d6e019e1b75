"""Bearer-token access control: a token maps to one role (and, for owners, one owner id)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException, Request

from decision_router.tokens import ROLES, Principal, gone_message, owner_gone, verify_token

__all__ = ["ROLES", "Principal", "require"]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def require(*roles: str) -> Callable[[Request], Principal]:
    """A FastAPI dependency admitting only tokens whose role is in `roles` (admin implies ops)."""
    allowed = set(roles)
    if "ops" in allowed:
        allowed.add("admin")

    def dependency(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("missing bearer token")
        principal = verify_token(request.app.state.engine, token.strip())
        if principal is None:
            raise _unauthorized("unknown or revoked token")
        # A leaver's token stops acting for them as soon as the API's rules (hot reloads included) lose them.
        if principal.role == "owner" and owner_gone(principal.owner, request.app.state.ruleset().owners):
            raise HTTPException(status_code=403, detail=gone_message(principal.owner or ""))
        if principal.role not in allowed:
            raise HTTPException(status_code=403, detail=f"role {principal.role!r} may not do this")
        return principal

    return dependency
