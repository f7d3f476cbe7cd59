"""HTTP routes of the image repository, under ``/tuf/image/``.

Reads (operators with a viewer token and up; enrolled devices too, as for bundles): consistent-snapshot
metadata ``{N}.root.json``, ``timestamp.json``, ``{N}.snapshot.json``, ``{N}.targets.json``, and target
files ``targets/{sha256}.{NAME}-{VERSION}.efb`` (the registry's blob, with Range). Writes (operators):
``PUT root`` and ``PUT targets`` with offline-signed metadata, ``GET keys`` for the server's online
public keys. Every refusal is a JSON ``{"error", "field"}``: 400/422 for bad or wrongly signed metadata,
409 for a version that is not the next, 404 for what does not exist yet.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from edgefleet.errors import ConfigError
from edgefleet.server.api.deps import Actor, StateDep, require
from edgefleet.server.api.registry import require_reader, send_blob
from edgefleet.server.errors import ApiError
from edgefleet.server.models import ModelVersion
from edgefleet.server.state import ServerState
from edgefleet.server.tuf.keys import load_online_keys
from edgefleet.server.tuf.repository import ImageRepository, NotFound, RegistryMismatch
from edgefleet.tufmeta import TrustError, target_path

__all__ = ["REPO_KEY", "image_repository", "router"]

router = APIRouter(prefix="/tuf", tags=["tuf"])
REPO_KEY = "tuf_image"  # app.state attribute holding the ImageRepository (tests put their own there)
_JSON = "application/json"
_NO_STORE = {"cache-control": "no-store"}  # timestamp: always fresh
_IMMUTABLE = {"cache-control": "public, max-age=31536000, immutable"}  # versioned files never change
_METADATA_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "description": "TUF metadata: "
                                                    "{\"signed\": {...}, \"signatures\": [...]}"}}},
    }
}
_TARGET = re.compile(r"^([0-9a-f]{64})\.(.+\.efb)$")


def image_repository(request: Request) -> ImageRepository:
    """The app's image repository, made on first use from the server's online keys. Raises ApiError 503
    when the server has none (initialised before TUF)."""
    repo: ImageRepository | None = getattr(request.app.state, REPO_KEY, None)
    if repo is None:
        state: ServerState = request.app.state.server
        try:
            keys = load_online_keys(state.settings.data_dir)
        except ConfigError as e:
            raise ApiError(503, f"tuf: {e}", "tuf") from e
        repo = ImageRepository(state.sessions, keys)
        setattr(request.app.state, REPO_KEY, repo)
    return repo


RepoDep = Annotated[ImageRepository, Depends(image_repository)]
Version = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _refusal(e: TrustError) -> ApiError:
    status = 409 if e.conflict else 422
    return ApiError(status, str(e), e.field)


async def _read(request: Request, state: ServerState) -> None:
    await run_in_threadpool(require_reader, request, state)


async def _metadata(request: Request, state: ServerState, fetch: Any, *args: Any) -> bytes:
    await _read(request, state)
    try:
        data: bytes = await run_in_threadpool(fetch, *args)
    except NotFound as e:
        raise ApiError(404, str(e), "path") from e
    return data


@router.get("/image/keys", tags=["tuf"])
def online_keys(repo: RepoDep, _: Annotated[Actor, Depends(require("operator"))]) -> dict[str, Any]:
    """The server's online public keys (``snapshot``, ``timestamp``, ``director-targets``), for the
    operator's ``edgefleet keys init --server``, and the current root and targets versions (0: none)."""
    return {"keys": repo.keys.public(), "root_version": repo.current_version("root"),
            "targets_version": repo.current_version("targets")}


@router.get("/image/timestamp.json")
async def timestamp(request: Request, state: StateDep, repo: RepoDep) -> Response:
    data = await _metadata(request, state, repo.timestamp)
    return Response(data, media_type=_JSON, headers=_NO_STORE)


@router.get("/image/{version}.{role}.json")
async def versioned(
    request: Request, state: StateDep, repo: RepoDep, version: Version,
    role: Annotated[str, Path(pattern="^(root|snapshot|targets)$")],
) -> Response:
    data = await _metadata(request, state, repo.read, role, version)
    return Response(data, media_type=_JSON, headers=_IMMUTABLE)


@router.get("/image/targets/{filename}", responses={206: {"description": "partial content"}, 304: {}, 416: {}})
def target_file(filename: Annotated[str, Path(max_length=300)], request: Request, state: StateDep) -> Response:
    """A target file by its consistent-snapshot name ``{sha256}.{NAME}-{VERSION}.efb``: the registry's
    blob of that bundle (Range and ETag as for ``/api/v1/blobs``)."""
    require_reader(request, state)
    m = _TARGET.match(filename)
    if m is None:
        raise ApiError(404, "filename: expected {sha256}.{NAME}-{VERSION}.efb", "filename")
    sha, path = m.groups()
    with state.sessions() as s:
        rows = s.scalars(select(ModelVersion).where(ModelVersion.sha256 == sha)).all()
    if not any(target_path(r.name, r.version) == path for r in rows):
        raise ApiError(404, f"filename: no bundle {path} with sha256 {sha}", "filename")
    return send_blob(request, state, sha)


async def _upload(request: Request, put: Any, actor: Actor) -> dict[str, Any]:
    body = await request.body()  # bounded by the BodyLimit middleware (max_json_bytes)
    try:
        version: int = await run_in_threadpool(put, body, actor.label)
    except RegistryMismatch as e:
        raise ApiError(422, str(e), e.field) from e
    except TrustError as e:
        raise _refusal(e) from e
    except NotFound as e:
        raise ApiError(409, str(e), "root") from e
    return {"version": version}


@router.put("/image/root", openapi_extra=_METADATA_BODY)
async def put_root(request: Request, repo: RepoDep, actor: Annotated[Actor, Depends(require("operator"))]) -> Any:
    """A new root, signed by a threshold of the current root's keys and of its own, version current + 1."""
    return await _upload(request, repo.put_root, actor)


@router.put("/image/targets", openapi_extra=_METADATA_BODY)
async def put_targets(
    request: Request, repo: RepoDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> Any:
    """New targets signed by the release key, version current + 1, every target already in the registry
    with that length and sha256; the server then signs a new snapshot and timestamp."""
    return await _upload(request, repo.put_targets, actor)
