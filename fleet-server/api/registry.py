"""The model registry: upload (streamed, validated, content-addressed), list, show, delete, download."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.requests import ClientDisconnect

from edgefleet.server.api.deps import Actor, SessionDep, StateDep, bearer, device_caller, require
from edgefleet.server.api.schemas import MODEL_NAME, SHA256, VERSION, VersionOut
from edgefleet.server.desired import version_in_use
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Device, ModelVersion, utcnow
from edgefleet.server.state import ServerState, audit

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["registry"])

NamePath = Annotated[str, Path(pattern=MODEL_NAME)]
VersionPath = Annotated[str, Path(pattern=VERSION)]
_RANGE = re.compile(r"\Abytes=\d*-\d*(\s*,\s*\d*-\d*)*\Z")
_IMMUTABLE = "public, max-age=31536000, immutable"
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _out(v: ModelVersion, manifest: bool = False) -> VersionOut:
    return VersionOut(
        name=v.name, version=v.version, runtime=v.runtime, sha256=v.sha256, size=v.size,
        created_at=v.created_at, created_by=v.created_by, url=f"/api/v1/blobs/{v.sha256}",
        manifest=v.manifest if manifest else None,
    )


@router.post("/models", status_code=201, response_model=VersionOut, openapi_extra=_UPLOAD_BODY)
async def upload(
    request: Request,
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
    x_content_sha256: Annotated[str | None, Header(pattern=SHA256, description="sha256 of the body")] = None,
    content_length: Annotated[int | None, Header(ge=0)] = None,
) -> VersionOut:
    """Upload a ``.efb`` bundle as the raw body. Refused: 413 over the limit, 422 an invalid bundle,
    409 when NAME-VERSION exists."""
    limit = state.settings.max_upload_bytes
    if content_length is not None and content_length > limit:
        raise ApiError(413, f"content-length: {content_length} bytes, over the {limit}-byte limit", "content-length")
    try:
        blob = await state.blobs.receive(request.stream(), limit, x_content_sha256)
    except ClientDisconnect as e:
        state.metrics.uploads.labels("interrupted").inc()
        raise ApiError(400, "body: the client went away before the upload finished", "body") from e
    except Exception:
        state.metrics.uploads.labels("refused").inc()
        raise
    m = blob.manifest
    row = ModelVersion(
        name=m.name, version=m.version, runtime=m.runtime, sha256=blob.sha256, size=blob.size,
        manifest=m.model_dump(mode="json"), created_at=utcnow(), created_by=actor.label,
    )
    try:
        with state.sessions.begin() as s:
            if s.scalar(select(ModelVersion.id).where(ModelVersion.name == m.name, ModelVersion.version == m.version)):
                raise ApiError(409, f"version: {m.name} {m.version} already exists", "version")
            s.add(row)
            audit(s, actor.label, "model.upload", f"model:{m.name}@{m.version}", None,
                  {"sha256": blob.sha256, "size": blob.size})
    except IntegrityError as e:
        raise ApiError(409, f"version: {m.name} {m.version} already exists", "version") from e
    state.metrics.uploads.labels("stored").inc()
    return _out(row)


@router.get("/models", response_model=list[VersionOut])
def list_versions(
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    name: Annotated[str | None, Query(pattern=MODEL_NAME)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[VersionOut]:
    q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.created_at, ModelVersion.id)
    if name is not None:
        q = q.where(ModelVersion.name == name)
    return [_out(v) for v in s.scalars(q.limit(limit).offset(offset))]


def _find(s: SessionDep, name: str, version: str) -> ModelVersion:
    v = s.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))
    if v is None:
        raise ApiError(404, f"version: no model {name} version {version}", "version")
    return v


@router.get("/models/{name}/{version}", response_model=VersionOut)
def show_version(
    name: NamePath, version: VersionPath, s: SessionDep, _: Annotated[Actor, Depends(require("viewer"))]
) -> VersionOut:
    return _out(_find(s, name, version), manifest=True)


@router.delete("/models/{name}/{version}", status_code=204)
def delete_version(
    name: NamePath, version: VersionPath, state: StateDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> Response:
    """Delete a version; 409 while something (an assignment, a rollout) uses it. The blob goes when no
    other version shares its content."""
    with state.sessions.begin() as s:
        v = _find(s, name, version)
        why = version_in_use(s, v.id)
        if why:
            raise ApiError(409, f"version: {name} {version} is in use: {why}", "version")
        sha = v.sha256
        s.delete(v)
        audit(s, actor.label, "model.delete", f"model:{name}@{version}", {"sha256": sha, "size": v.size}, None)
        s.flush()
        shared = s.scalar(select(ModelVersion.id).where(ModelVersion.sha256 == sha).limit(1))
    if shared is None:
        state.blobs.delete(sha)
    return Response(status_code=204)


def _reader(request: Request, state: ServerState) -> None:
    """Operators (viewer and up) and enrolled, non-revoked devices may download."""
    raw = bearer(request) or ""
    if raw.startswith("efo_"):
        with state.sessions() as s:
            require("viewer")(request, s)
        return
    who = device_caller(request, state)
    with state.sessions() as s:
        d = s.get(Device, who.device_id)
        if d is None or d.revoked_at is not None or d.cert_serial != who.cert_serial:
            raise ApiError(403, "device: not enrolled, revoked, or its certificate was replaced", "authorization")


def _send_blob(request: Request, state: ServerState, sha: str) -> Response:
    etag = f'"{sha}"'
    headers = {"etag": etag, "cache-control": _IMMUTABLE}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    path = state.blobs.path(sha)
    if not path.is_file():
        raise ApiError(404, f"sha256: no blob {sha}", "sha256")
    rng = request.headers.get("range")
    if rng is not None and not _RANGE.match(rng.strip()):
        # RFC 9110: an unparseable Range is ignored; serve the whole file.
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"range"]
    return FileResponse(path, media_type="application/octet-stream", headers=headers)


@router.get("/blobs/{sha256}", responses={206: {"description": "partial content"}, 304: {}, 416: {}})
def download_blob(sha256: Annotated[str, Path(pattern=SHA256)], request: Request, state: StateDep) -> Response:
    """A bundle by content hash, with ``Range`` (206/416), ``ETag`` = sha256 and immutable caching."""
    _reader(request, state)
    return _send_blob(request, state, sha256)


@router.get("/models/{name}/{version}/bundle", responses={206: {"description": "partial content"}, 304: {}, 416: {}})
def download_version(name: NamePath, version: VersionPath, request: Request, state: StateDep) -> Response:
    _reader(request, state)
    with state.sessions() as s:
        sha = _find(s, name, version).sha256
    return _send_blob(request, state, sha)
