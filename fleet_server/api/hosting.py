"""Release hosting for devices: the image repository and each device's director metadata.

Only authenticated devices are served (HTTP Basic: device id and password).
Any device may read the image repository, which is the same for everyone; a
device reads only its own director metadata, since it says what that device
runs. Files are answered by aiohttp's ``FileResponse``, which honours HTTP
Range, so an interrupted bundle download resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from fleet_server.api.errors import ApiError
from fleet_server.api.operations import DEVICE, SERVER, Operation

_CHUNK = 256 * 1024


def _file(path: Path, *, cacheable: bool) -> web.FileResponse:
    if not path.is_file():
        raise ApiError(404, f"no file {path.name}")
    # Metadata changes (timestamp.json every day); target files are content-addressed.
    cache = "public, max-age=31536000, immutable" if cacheable else "no-store"
    return web.FileResponse(path, chunk_size=_CHUNK, headers={"Cache-Control": cache})


async def repository_metadata(request: web.Request) -> web.StreamResponse:
    repository = request.app[SERVER].releases.repository
    return _file(repository.metadata_dir / request.match_info["file"], cacheable=False)


async def repository_target(request: web.Request) -> web.StreamResponse:
    repository = request.app[SERVER].releases.repository
    path = repository.targets_dir / request.match_info["name"] / request.match_info["file"]
    return _file(path, cacheable=True)


async def director_root(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if not name.endswith(".root.json"):
        raise ApiError(404, f"no file {name}; the director's shared metadata is its root")
    director = request.app[SERVER].assignments.director
    return _file(director.path / "metadata" / name, cacheable=False)


async def director_metadata(request: web.Request) -> web.StreamResponse:
    device_id = request.match_info["device_id"]
    if request[DEVICE] != device_id:
        raise ApiError(403, "a device may read only its own director metadata")
    director = request.app[SERVER].assignments.director
    repo = director.device(device_id)
    return _file(repo.metadata_dir / request.match_info["file"], cacheable=False)


_ERRORS = (401, 404)

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/repository/metadata/{file}", repository_metadata, "getRepositoryMetadata",
        "Image repository metadata (TUF)",
        tag="hosting", auth="device", errors=_ERRORS,
    ),
    Operation(
        "GET", "/repository/targets/{name}/{file}", repository_target, "getRepositoryTarget",
        "A bundle of the image repository (HTTP Range answered with 206)",
        tag="hosting", auth="device", other_success=(206,), errors=(*_ERRORS, 416),
        media_type="application/octet-stream",
    ),
    Operation(
        "GET", "/director/metadata/{file}", director_root, "getDirectorRoot",
        "The director's root metadata (N.root.json)",
        tag="hosting", auth="device", errors=_ERRORS,
    ),
    Operation(
        "GET", "/director/devices/{device_id}/metadata/{file}", director_metadata,
        "getDirectorMetadata", "A device's own director metadata (Uptane)",
        tag="hosting", auth="device", errors=(401, 403, 404),
    ),
)
# fmt: on
