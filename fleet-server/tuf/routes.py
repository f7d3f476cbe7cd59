"""HTTP routes of the image repository, under ``/tuf/image/``, and of the director, ``/tuf/director/``.

Reads (operators with a viewer token and up; enrolled devices too, as for bundles): consistent-snapshot
metadata ``{N}.root.json``, ``timestamp.json``, ``{N}.snapshot.json``, ``{N}.targets.json``, and target
files ``targets/{sha256}.{NAME}-{VERSION}.efb`` (the registry's blob, with Range). Writes (operators):
``PUT root`` and ``PUT targets`` with offline-signed metadata, ``GET keys`` for the server's online
public keys. Every refusal is a JSON ``{"error", "field"}``: 400/422 for bad or wrongly signed metadata,
409 for a version that is not the next, 404 for what does not exist yet. A device may download only a
target file its own director targets name (403 otherwise); operators may download any.

Director (see :mod:`.director`): ``PUT /tuf/director/root`` (operators, offline-signed), and per device
``/tuf/director/{device_id}/{N}.root.json``, ``timestamp.json``, ``{N}.snapshot.json``,
``{N}.targets.json``: a device reads only its own (403 for another's), operators any.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from edgefleet.errors import ConfigError
from edgefleet.server.api.deps import Actor, StateDep, bearer, device_caller, require
from edgefleet.server.api.registry import require_reader, send_blob
from edgefleet.server.api.schemas import DEVICE_ID
from edgefleet.server.errors import ApiError
from edgefleet.server.models import ModelVersion
from edgefleet.server.state import ServerState
from edgefleet.server.tuf.director import DirectorRepository
from edgefleet.server.tuf.keys import load_online_keys
from edgefleet.server.tuf.repository import ImageRepository, NotFound, RegistryMismatch
from edgefleet.tufmeta import TrustError, target_path

__all__ = ["DIRECTOR_KEY", "REPO_KEY", "director_repository", "image_repository", "router"]

router = APIRouter(prefix="/tuf", tags=["tuf"])
REPO_KEY = "tuf_image"  # app.state attribute holding the ImageRepository (tests put their own there)
DIRECTOR_KEY = "tuf_director"  # ... and the DirectorRepository
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


def director_repository(request: Request) -> DirectorRepository:
    """The app's director repositories, made on first use from the server's online keys. Raises ApiError
    503 when the server has none."""
    repo: DirectorRepository | None = getattr(request.app.state, DIRECTOR_KEY, None)
    if repo is None:
        image = image_repository(request)
        repo = DirectorRepository(image.sessions, image.keys)
        setattr(request.app.state, DIRECTOR_KEY, repo)
    return repo


RepoDep = Annotated[ImageRepository, Depends(image_repository)]
DirectorDep = Annotated[DirectorRepository, Depends(director_repository)]
Version = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _refusal(e: TrustError) -> ApiError:
    status = 409 if e.conflict else 422
    return ApiError(status, str(e), e.field)


async def _read(request: Request, state: ServerState) -> None:
    await run_in_threadpool(require_reader, request, state)


def _reading_device(request: Request, state: ServerState) -> str | None:
    """Check the caller may read (operator viewer and up, or an enrolled, current device); returns the
    device's id, or None for an operator. Raises ApiError 401/403."""
    require_reader(request, state)
    if (bearer(request) or "").startswith("efo_"):
        return None
    return device_caller(request, state).device_id


async def _metadata(request: Request, state: ServerState, fetch: Any, *args: Any) -> bytes:
    await _read(request, state)
    return await _fetch(fetch, *args)


async def _fetch(fetch: Any, *args: Any) -> bytes:
    try:
        data: bytes = await run_in_threadpool(fetch, *args)
    except NotFound as e:
        raise ApiError(404, str(e), "path") from e
    return data


@router.get("/image/keys", tags=["tuf"])
def online_keys(
    request: Request, repo: RepoDep, _: Annotated[Actor, Depends(require("operator"))]
) -> dict[str, Any]:
    """The server's online public keys (``snapshot``, ``timestamp``, ``director-targets``), for the
    operator's ``edgefleet keys init --server``, and the current root and targets versions and the
    director root's version (0: none)."""
    return {"keys": repo.keys.public(), "root_version": repo.current_version("root"),
            "targets_version": repo.current_version("targets"),
            "director_root_version": director_repository(request).root_repo.current_version("root")}


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
    blob of that bundle (Range and ETag as for ``/api/v1/blobs``). A device gets only a target its own
    director targets name (403 otherwise, before anything says whether the bundle exists)."""
    device = _reading_device(request, state)
    m = _TARGET.match(filename)
    if m is None:
        raise ApiError(404, "filename: expected {sha256}.{NAME}-{VERSION}.efb", "filename")
    sha, path = m.groups()
    if device is not None and not director_repository(request).names(device, path, sha):
        raise ApiError(403, f"filename: {path} is not assigned to device {device}", "filename")
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


# director --------------------------------------------------------------------------------------------


@router.put("/director/root", openapi_extra=_METADATA_BODY)
async def put_director_root(
    request: Request, repo: DirectorDep, actor: Annotated[Actor, Depends(require("operator"))]
) -> Any:
    """The director root shared by every device: signed by the operator's offline root keys (a threshold
    of the current director root's and of its own), naming the server's online director-targets,
    snapshot and timestamp keys, version current + 1."""
    return await _upload(request, repo.put_root, actor)


DevicePath = Annotated[str, Path(pattern=DEVICE_ID)]


async def _own(request: Request, state: ServerState, device_id: str) -> None:
    device = await run_in_threadpool(_reading_device, request, state)
    if device is not None and device != device_id:
        raise ApiError(403, f"device_id: a device may read only its own director metadata, not {device_id}'s",
                       "device_id")


@router.get("/director/{device_id}/timestamp.json")
async def director_timestamp(request: Request, state: StateDep, repo: DirectorDep, device_id: DevicePath) -> Response:
    await _own(request, state, device_id)
    data = await _fetch(repo.timestamp, device_id)
    return Response(data, media_type=_JSON, headers=_NO_STORE)


@router.get("/director/{device_id}/{version}.{role}.json")
async def director_versioned(
    request: Request, state: StateDep, repo: DirectorDep, device_id: DevicePath, version: Version,
    role: Annotated[str, Path(pattern="^(root|snapshot|targets)$")],
) -> Response:
    await _own(request, state, device_id)
    data = await _fetch(repo.read, device_id, role, version)
    return Response(data, media_type=_JSON, headers=_IMMUTABLE)
