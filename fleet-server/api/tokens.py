"""Operator API tokens (admin), enrollment tokens (operator) and the audit log (viewer)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from sqlalchemy import select

from edgefleet.server.api.deps import Actor, SessionDep, StateDep, require
from edgefleet.server.api.schemas import AuditOut, EnrollTokenIn, EnrollTokenOut, TokenIn, TokenOut
from edgefleet.server.errors import ApiError
from edgefleet.server.models import ApiToken, AuditEntry, EnrollmentToken, utcnow
from edgefleet.server.state import add_api_token, audit
from edgefleet.server.tokens import new_token

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["tokens"])
TokenId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$")]


def _token_out(t: ApiToken, secret: str | None = None) -> TokenOut:
    return TokenOut(
        id=t.id, name=t.name, role=t.role, created_at=t.created_at, created_by=t.created_by,
        expires_at=t.expires_at, revoked_at=t.revoked_at, token=secret,
    )


@router.post("/tokens", status_code=201, response_model=TokenOut)
def create_token(body: TokenIn, state: StateDep, actor: Annotated[Actor, Depends(require("admin"))]) -> TokenOut:
    """Create an operator API token; the secret is in this response only."""
    expires = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    with state.sessions.begin() as s:
        secret, row = add_api_token(s, body.name, body.role, actor.label, expires)
    return _token_out(row, secret)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(s: SessionDep, _: Annotated[Actor, Depends(require("admin"))]) -> list[TokenOut]:
    return [_token_out(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.created_at))]


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(token_id: TokenId, state: StateDep, actor: Annotated[Actor, Depends(require("admin"))]) -> Response:
    with state.sessions.begin() as s:
        t = s.get(ApiToken, token_id)
        if t is None:
            raise ApiError(404, f"token_id: no token {token_id}", "token_id")
        if t.revoked_at is None:
            t.revoked_at = utcnow()
            audit(s, actor.label, "token.revoke", f"token:{token_id}", {"revoked": False}, {"revoked": True})
    return Response(status_code=204)


def _enroll_out(t: EnrollmentToken, secret: str | None = None) -> EnrollTokenOut:
    return EnrollTokenOut(
        id=t.id, tags=list(t.tags), max_uses=t.max_uses, uses=t.uses, expires_at=t.expires_at,
        created_at=t.created_at, created_by=t.created_by, revoked_at=t.revoked_at, token=secret,
    )


@router.post("/enrollment-tokens", status_code=201, response_model=EnrollTokenOut)
def create_enrollment_token(
    body: EnrollTokenIn, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> EnrollTokenOut:
    """A token devices enroll with: they get its tags; it works ``max_uses`` times until it expires."""
    secret, token_id, digest = new_token("efe")
    now = utcnow()
    row = EnrollmentToken(
        id=token_id, secret_sha256=digest, tags=sorted(set(body.tags)), max_uses=body.max_uses, uses=0,
        expires_at=now + timedelta(hours=body.expires_in_hours), created_at=now, created_by=actor.label,
        revoked_at=None,
    )
    with state.sessions.begin() as s:
        s.add(row)
        audit(s, actor.label, "enrollment_token.create", f"enrollment_token:{token_id}", None,
              {"tags": row.tags, "max_uses": row.max_uses, "expires_at": row.expires_at.isoformat()})
    return _enroll_out(row, secret)


@router.get("/enrollment-tokens", response_model=list[EnrollTokenOut])
def list_enrollment_tokens(s: SessionDep, _: Annotated[Actor, Depends(require("operator"))]) -> list[EnrollTokenOut]:
    return [_enroll_out(t) for t in s.scalars(select(EnrollmentToken).order_by(EnrollmentToken.created_at))]


@router.delete("/enrollment-tokens/{token_id}", status_code=204)
def revoke_enrollment_token(
    token_id: TokenId, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> Response:
    with state.sessions.begin() as s:
        t = s.get(EnrollmentToken, token_id)
        if t is None:
            raise ApiError(404, f"token_id: no enrollment token {token_id}", "token_id")
        if t.revoked_at is None:
            t.revoked_at = utcnow()
            audit(s, actor.label, "enrollment_token.revoke", f"enrollment_token:{token_id}", {"revoked": False},
                  {"revoked": True})
    return Response(status_code=204)


@router.get("/audit", response_model=list[AuditOut], tags=["audit"])
def list_audit(
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> list[AuditOut]:
    """Newest first; page with ``before_id``."""
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before_id is not None:
        q = q.where(AuditEntry.id < before_id)
    return [
        AuditOut(id=e.id, at=e.at, actor=e.actor, action=e.action, target=e.target, before=e.before, after=e.after)
        for e in s.scalars(q)
    ]
