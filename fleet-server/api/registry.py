"""The model registry: upload (streamed, validated, content-addressed), list, show, delete, download.

A blob's lifetime is transactional with its rows (see :mod:`edgefleet.server.blobs`): an upload moves
its validated temp file into the store inside the transaction that inserts its row, a delete takes
the blob out inside the transaction that removes its last row, both holding a lock on the content
hash (PostgreSQL: an advisory transaction lock; SQLite: the database's single write lock), and a blob
is served only for a committed row. So no row is ever without its blob, and no refused or rolled-back
upload leaves anything downloadable.
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from edgefleet.bundle.manifest import NAME_PATTERN, VERSION_PATTERN, shown
from edgefleet.server.api.deps import Actor, SessionDep, StateDep, bearer, device_caller, require
from edgefleet.server.api.schemas import SHA256, VersionOut
from edgefleet.server.blobs import StagedBlob
from edgefleet.server.desired import version_in_use
from edgefleet.server.errors import ApiError
from edgefleet.server.models import Device, ModelVersion, utcnow
from edgefleet.server.state import ServerState, audit

__all__ = ["collect_orphans", "require_assigned", "require_reader", "router", "send_blob"]

router = APIRouter(prefix="/api/v1", tags=["registry"])

NamePath = Annotated[str, Path(pattern=NAME_PATTERN)]
VersionPath = Annotated[str, Path(pattern=VERSION_PATTERN)]
_IMMUTABLE = "public, max-age=31536000, immutable"
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": VersionOut, "description": "the same bytes were already stored as this version: a no-op"},
    204: {"description": "dry run: an upload with these headers would be taken"},
}


def _out(v: ModelVersion, manifest: bool = False) -> VersionOut:
    return VersionOut(
        name=v.name, version=v.version, runtime=v.runtime, sha256=v.sha256, size=v.size,
        created_at=v.created_at, created_by=v.created_by, url=f"/api/v1/blobs/{v.sha256}",
        manifest=v.manifest if manifest else None,
    )


def _conflict(v: ModelVersion) -> ApiError:
    return ApiError(
        409,
        f"version: {v.name} {v.version} already exists with different content (sha256 {v.sha256}); "
        "give the new bundle a new version",
        "version",
    )


def _lock_content(s: Session, sha: str) -> None:
    """Serialize every change to the blob ``sha`` and its rows until the transaction ends. Must be the
    transaction's first statement (SQLite takes its write lock here, before any read)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(sha[:15], 16)})
    else:  # SQLite has one writer at a time: a write statement holds the write lock until commit
        s.execute(text("UPDATE model_versions SET id = id WHERE 0 = 1"))


def _unreferenced(s: Session, sha: str) -> bool:
    return s.scalar(select(ModelVersion.id).where(ModelVersion.sha256 == sha).limit(1)) is None


class _Trash:
    """A blob taken out of the store by a transaction: purged when it commits, put back otherwise."""

    def __init__(self, state: ServerState, sha: str) -> None:
        self.state, self.sha = state, sha
        self.path: FsPath | None = None

    def take_if_unreferenced(self, s: Session) -> None:
        if _unreferenced(s, self.sha):
            self.path = self.state.blobs.trash(self.sha)

    def settle(self, committed: bool) -> None:
        if self.path is not None:
            if committed:
                self.state.blobs.purge(self.path)
            else:
                self.state.blobs.restore(self.path, self.sha)


def _collect(state: ServerState, sha: str) -> None:
    """Remove the blob ``sha`` if no committed row references it (after a failed upload)."""
    trash = _Trash(state, sha)
    try:
        with state.sessions.begin() as s:
            _lock_content(s, sha)
            trash.take_if_unreferenced(s)
    except BaseException:
        trash.settle(False)
        raise
    trash.settle(True)


def collect_orphans(state: ServerState) -> int:
    """Remove every stored blob no committed row references (what a crash between placing a blob and
    committing its row, or between a delete's commit and its purge, leaves); returns how many. Safe
    while other replicas upload: each blob is checked under its content lock. Run after
    :meth:`BlobStore.sweep` at start."""
    with state.sessions() as s:
        referenced = set(s.scalars(select(ModelVersion.sha256).distinct()))
    removed = 0
    for sha in sorted(state.blobs.stored() - referenced):
        _collect(state, sha)
        removed += not state.blobs.exists(sha)
    return removed


def _existing(state: ServerState, name: str, version: str) -> ModelVersion | None:
    with state.sessions() as s:
        return s.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))


def _store(state: ServerState, staged: StagedBlob, actor: str) -> tuple[ModelVersion, bool]:
    """Insert the row and place the blob in one transaction: (row, created). Raises ApiError 409 when
    the version exists with other content."""
    m = staged.manifest
    placed = False
    try:
        with state.sessions.begin() as s:
            _lock_content(s, staged.sha256)
            existing = s.scalar(
                select(ModelVersion).where(ModelVersion.name == m.name, ModelVersion.version == m.version)
            )
            if existing is not None:
                if existing.sha256 == staged.sha256:
                    return existing, False
                raise _conflict(existing)
            row = ModelVersion(
                name=m.name, version=m.version, runtime=m.runtime, sha256=staged.sha256, size=staged.size,
                manifest=m.model_dump(mode="json"), created_at=utcnow(), created_by=actor,
            )
            s.add(row)
            audit(s, actor, "model.upload", f"model:{m.name}@{m.version}", None,
                  {"sha256": staged.sha256, "size": staged.size})
            s.flush()
            placed = state.blobs.place(staged)
    except BaseException as e:
        if placed:
            _collect(state, staged.sha256)
        if isinstance(e, IntegrityError):
            raise ApiError(409, f"version: {m.name} {m.version} already exists", "version") from e
        raise
    finally:
        state.blobs.discard(staged)
    return row, True


@router.post(
    "/models", status_code=201, response_model=VersionOut, responses=_UPLOAD_RESPONSES, openapi_extra=_UPLOAD_BODY
)
async def upload(
    request: Request,
    response: Response,
    state: StateDep,
    actor: Annotated[Actor, Depends(require("operator"))],
    x_content_sha256: Annotated[str | None, Header(pattern=SHA256, description="sha256 of the body")] = None,
    content_length: Annotated[int | None, Header(ge=0)] = None,
    x_model_name: Annotated[
        str | None, Header(pattern=NAME_PATTERN, description="the bundle's model name, to be refused before the body")
    ] = None,
    x_model_version: Annotated[
        str | None, Header(pattern=VERSION_PATTERN, description="the bundle's version (with X-Model-Name)")
    ] = None,
    dry_run: Annotated[
        bool, Query(description="check the token, the headers and the version only; read no body (204 if taken)")
    ] = False,
) -> Any:
    """Upload a ``.efb`` bundle as the raw body: 201 stored, 200 when the same bytes are already this
    version (a no-op). Refused: 413 over the limit, 422 an invalid bundle, 409 when NAME-VERSION exists
    with other content. With ``X-Model-Name``/``X-Model-Version`` (and ``X-Content-SHA256``) a conflict
    or a no-op is answered before the body is read, so a client sending ``Expect: 100-continue``
    sends none of it; ``?dry_run=true`` asks just that, with no body (what ``edgefleet model push`` does
    before it sends one)."""
    limit = state.settings.max_upload_bytes
    if content_length is not None and content_length > limit:
        raise ApiError(413, f"content-length: {content_length} bytes, over the {limit}-byte limit", "content-length")
    declared = (x_model_name, x_model_version) if x_model_name and x_model_version else None
    if declared is not None:
        early = await run_in_threadpool(_existing, state, *declared)
        if early is not None:
            if x_content_sha256 is not None and early.sha256 == x_content_sha256.lower():
                response.status_code = 200
                return _out(early)
            raise _conflict(early)
    if dry_run:
        if declared is None:
            raise ApiError(422, "x-model-name: a dry run needs X-Model-Name and X-Model-Version", "x-model-name")
        return Response(status_code=204)
    try:
        staged = await state.blobs.receive(request.stream(), limit, x_content_sha256)
    except ClientDisconnect as e:
        state.metrics.uploads.labels("interrupted").inc()
        raise ApiError(400, "body: the client went away before the upload finished", "body") from e
    except Exception:
        state.metrics.uploads.labels("refused").inc()
        raise
    m = staged.manifest
    if declared is not None and declared != (m.name, m.version):
        state.blobs.discard(staged)
        state.metrics.uploads.labels("refused").inc()
        raise ApiError(
            422, f"x-model-version: the headers say {declared[0]} {declared[1]}, the bundle is {m.name} {m.version}",
            "x-model-version",
        )
    row, created = await run_in_threadpool(_store, state, staged, actor.label)
    state.metrics.uploads.labels("stored" if created else "unchanged").inc()
    if not created:
        response.status_code = 200
    return _out(row)


@router.get("/models", response_model=list[VersionOut])
def list_versions(
    s: SessionDep,
    _: Annotated[Actor, Depends(require("viewer"))],
    name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
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
    """Delete a version; 409 while something (an assignment, a rollout) uses it. The blob goes, in the
    same transaction, when no other version shares its content."""
    with state.sessions() as s:
        sha = _find(s, name, version).sha256
    trash = _Trash(state, sha)
    try:
        with state.sessions.begin() as s:
            _lock_content(s, sha)
            v = _find(s, name, version)  # again, under the lock: a concurrent delete may have won
            if v.sha256 != sha:
                raise ApiError(409, f"version: {name} {version} changed while it was being deleted; retry", "version")
            why = version_in_use(s, v.id)
            if why:
                raise ApiError(409, f"version: {name} {version} is in use: {why}", "version")
            from edgefleet.server.tuf.repository import IMAGE, listing_version, lock_repo
            from edgefleet.tufmeta import target_path

            lock_repo(s, IMAGE)  # a targets upload naming this bundle waits for us, or we see it
            listed = listing_version(s, target_path(name, version))
            if listed is not None:
                raise ApiError(409, f"version: {name} {version} is listed in image targets {listed}; withdraw it "
                               f"first: edgefleet model withdraw {name} {version} --keys DIR", "version")
            s.delete(v)
            audit(s, actor.label, "model.delete", f"model:{name}@{version}", {"sha256": sha, "size": v.size}, None)
            s.flush()
            trash.take_if_unreferenced(s)
    except BaseException:
        trash.settle(False)
        raise
    trash.settle(True)
    return Response(status_code=204)


def require_reader(request: Request, state: ServerState) -> str | None:
    """Operators (viewer and up) and enrolled, non-revoked devices may download: returns the calling
    device's id, or None for an operator. A device may then fetch only bundles assigned to it
    (:func:`require_assigned`)."""
    raw = bearer(request) or ""
    if raw.startswith("efo_"):
        with state.sessions() as s:
            require("viewer")(request, s)
        return None
    who = device_caller(request, state)
    with state.sessions() as s:
        d = s.get(Device, who.device_id)
        if d is None or d.revoked_at is not None or d.cert_serial != who.cert_serial:
            raise ApiError(403, "device: not enrolled, revoked, or its certificate was replaced", "authorization")
    return who.device_id


def require_assigned(s: Session, device_id: str | None, sha256: str) -> None:
    """Confidentiality: a device downloads only the bundles its committed assignments (its director
    targets) name, so one extracted device key leaks no other model's bytes. Operators (None) pass."""
    from edgefleet.server.tuf.director import is_assigned  # the TUF package imports this module

    if device_id is not None and not is_assigned(s, device_id, sha256):
        raise ApiError(403, f"sha256: not assigned to device {device_id}", "sha256")


def send_blob(request: Request, state: ServerState, sha: str) -> Response:
    etag = f'"{sha}"'
    headers = {"etag": etag, "cache-control": _IMMUTABLE}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    path = state.blobs.path(sha)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ApiError(404, f"sha256: no blob {sha}", "sha256") from None
    rng = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if rng is not None and (if_range is None or if_range.strip() == etag):
        _check_range(rng, size)
    return FileResponse(path, media_type="application/octet-stream", headers=headers)


def _check_range(rng: str, size: int) -> None:
    """Raise a JSON 416 naming ``range`` (with ``Content-Range: bytes */SIZE``) for a Range header the
    file response would refuse: malformed, or starting past the end. Parsed by Starlette's own rules."""
    why = None
    try:
        FileResponse._parse_range_header(rng, size)
    except RangeNotSatisfiable:
        why = f"starts past the end of the {size}-byte blob"
    except MalformedRangeHeader:
        why = "is not a byte range like bytes=0-1023, bytes=1024- or bytes=-512"
    if why is not None:
        raise ApiError(416, f"range: {shown(rng)} {why}", "range", headers={"content-range": f"bytes */{size}"})


@router.get("/blobs/{sha256}", responses={206: {"description": "partial content"}, 304: {}, 416: {}})
def download_blob(sha256: Annotated[str, Path(pattern=SHA256)], request: Request, state: StateDep) -> Response:
    """A bundle by content hash, with ``Range`` (206/416), ``ETag`` = sha256 and immutable caching.
    Only blobs of committed versions are served (404 otherwise)."""
    device = require_reader(request, state)
    with state.sessions() as s:
        if _unreferenced(s, sha256):
            raise ApiError(404, f"sha256: no blob {sha256}", "sha256")
        require_assigned(s, device, sha256)
    return send_blob(request, state, sha256)


@router.get("/models/{name}/{version}/bundle", responses={206: {"description": "partial content"}, 304: {}, 416: {}})
def download_version(name: NamePath, version: VersionPath, request: Request, state: StateDep) -> Response:
    device = require_reader(request, state)
    with state.sessions() as s:
        sha = _find(s, name, version).sha256
        require_assigned(s, device, sha)
    return send_blob(request, state, sha)
