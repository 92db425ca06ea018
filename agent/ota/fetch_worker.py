"""The update fetcher, run as a child process of the agent.

TUF, urllib3 and the cryptography libraries are large; running them in a
short-lived child keeps them out of the serving process's memory. The child
prints its answer (:mod:`agent.ota.answers`) as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Collection
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.config import AgentConfig
from agent.ota.answers import (
    Assigned,
    Changed,
    Downloaded,
    FetchAnswer,
    NoShadow,
    PlanAnswer,
    PlanRead,
    Refused,
    RollbackAssigned,
    ShadowAnswer,
    ShadowDownloaded,
    ShadowKept,
    Unassigned,
    Unavailable,
    Why,
)
from agent.ota.director_client import (
    DirectorClient,
    DirectorTarget,
    DirectorTargets,
    image_target_or_none,
    resolve_assignment,
)
from agent.ota.errors import RepositoryUnavailable, UpdateRefused
from agent.ota.faults import Faults
from agent.ota.image_repository import BundleTarget, ImageRepositoryClient, open_verified_manifest
from agent.ota.journal import InstallTarget
from agent.ota.poll_gate import trust_dirs as trust_dirs  # where it always was
from agent.ota.transport import FetchConfig

if TYPE_CHECKING:  # the child process imports no more than it needs
    from agent.ota.parts import FaultPoints


def downloads_dir(config: AgentConfig) -> Path:
    return config.data_dir / "downloads"


def shadow_downloads_dir(config: AgentConfig) -> Path:
    """Where shadow bundles are downloaded, apart from the assignment's downloads."""
    return config.data_dir / "shadow-downloads"


def _fetch_config(config: AgentConfig) -> FetchConfig:
    f = config.update.fetch
    auth = None
    creds = config.credentials
    if creds.password_file is not None:
        auth = (creds.username or config.device_id, creds.password_file.read_text().strip())
    return FetchConfig(
        connect_timeout=f.connect_timeout_s,
        read_timeout=f.read_timeout_s,
        min_bytes_per_second=f.min_bytes_per_second,
        grace_seconds=f.grace_s,
        ca_file=str(f.ca_file) if f.ca_file else None,
        auth=auth,
    )


def resolve(
    config: AgentConfig, installed_counter: int
) -> tuple[BundleTarget | None, ImageRepositoryClient]:
    """What to install: the director's answer checked against the image repository.

    A standalone device (no director) takes the newest bundle of its configured
    name released for its hardware, never one below ``installed_counter``. A
    marked fleet rollback is returned without the counter check
    (:func:`resolve_marked` says which bundle it replaces).
    """
    target, _, image = resolve_marked(config, installed_counter)
    return target, image


def resolve_marked(
    config: AgentConfig, installed_counter: int
) -> tuple[BundleTarget | None, str | None, ImageRepositoryClient]:
    """:func:`resolve`, with the bundle a marked fleet rollback replaces (``None``: none)."""
    director, image = _director_and_image(config)
    if director is None:
        assert config.image_repository.name is not None  # the config insists on one
        image.refresh()
        chosen = image.choose(config.image_repository.name, config.hardware_id, installed_counter)
        return chosen, None, image
    assigned = director.assignment()
    if assigned is None:
        return None, None, image
    return _checked(assigned, image, config, installed_counter), assigned.rollback_of, image


def _checked(
    listed: DirectorTarget, image: ImageRepositoryClient, config: AgentConfig, counter: int
) -> BundleTarget:
    """The director's entry ``listed``, checked against the image repository (refreshed)."""
    image.refresh()
    return resolve_assignment(
        listed,
        image_target_or_none(image, listed.path),
        config.device_id,
        config.hardware_id,
        counter,
    )


def _director_and_image(
    config: AgentConfig,
) -> tuple[DirectorClient | None, ImageRepositoryClient]:
    image_dir, director_dir = trust_dirs(config)
    ImageRepositoryClient.provision(image_dir, config.image_repository.root)
    fetch = _fetch_config(config)
    image = ImageRepositoryClient(image_dir, config.image_repository.url, fetch)
    if config.director is None:
        return None, image
    ImageRepositoryClient.provision(director_dir, config.director.root)
    return DirectorClient(director_dir, config.director.url, config.device_id, fetch), image


def resolve_shadow(
    config: AgentConfig, installed_counter: int
) -> tuple[BundleTarget | None, ImageRepositoryClient]:
    """The director's shadow target, checked against the image repository like an assignment.

    ``None`` when the director lists none (and always on a standalone device).
    """
    director, image = _director_and_image(config)
    if director is None:
        return None, image
    listed: DirectorTarget | None = director.targets().shadow
    if listed is None:
        return None, image
    return _checked(listed, image, config, installed_counter), image


def run_shadow(
    config: AgentConfig, installed_counter: int, have: Collection[str] = ()
) -> ShadowAnswer:
    """Carry out ``shadow``: what the director lists as this device's shadow, downloaded.

    ``have`` are the bundle ids not to download (the shadow the device holds,
    one it refused, one it waits to retry): if the director lists one of
    them, nothing is downloaded. A refused download names its bundle. Installing
    the shadow never touches the assignment's downloads, slots or journal.
    """
    try:
        target, image = resolve_shadow(config, installed_counter)
    except RepositoryUnavailable as exc:
        return _unavailable(exc)
    except UpdateRefused as exc:
        return _refused(exc, "shadow")
    if target is None:
        return NoShadow()
    signed = InstallTarget.model_validate(asdict(target))
    if any(known in signed.matching_ids() for known in have):
        return ShadowKept(target=signed)
    try:
        path = image.download(target, shadow_downloads_dir(config))
        open_verified_manifest(path, target)
    except RepositoryUnavailable as exc:
        return _unavailable(exc)
    except UpdateRefused as exc:
        return _refused(exc, "shadow").model_copy(update={"target": signed})
    return ShadowDownloaded(target=signed, path=str(path))


def run_plan(config: AgentConfig, now: datetime | None = None) -> PlanAnswer:
    """Carry out ``plan``: the director's hybrid plan for this device, checked.

    The director is refreshed first; when that fails (unreachable, or its new
    metadata refused by TUF) the plan is read from the director targets the
    device trusted before, verified again, as long as they have not expired
    (:meth:`~agent.ota.director_client.DirectorClient.trusted_plan`). A
    standalone device has no director and so no plan.
    """
    if config.director is None:
        return PlanRead()
    try:
        director, _ = _director_and_image(config)
        assert director is not None
    except UpdateRefused as exc:  # the trusted roots themselves
        return _unavailable(exc)
    try:
        return _plan_read(director.plan(now))
    except UpdateRefused as refresh:
        failed = Why(reason=refresh.reason, message=refresh.detail)
    try:
        return _plan_read(director.trusted_plan(now), failed)
    except UpdateRefused as exc:
        message = f"{failed.message}; and the director targets trusted before: {exc}"
        return PlanRead(refresh_failed=Why(reason=failed.reason, message=message))


def _plan_read(listing: DirectorTargets, refresh_failed: Why | None = None) -> PlanRead:
    refusal = listing.plan_refusal
    return PlanRead(
        plan=listing.plan,
        refusal=Why(reason=refusal.reason, message=refusal.message) if refusal else None,
        expires=listing.expires,
        refresh_failed=refresh_failed,
    )


def run(
    command: str,
    config: AgentConfig,
    installed_counter: int,
    expect: str | None = None,
    faults: FaultPoints | None = None,
) -> FetchAnswer:
    """Carry out ``check`` or ``download``; ``expect`` is the bundle id a download is for.

    ``faults`` is where a download may be held (``download``, once bytes
    arrived); by default the configuration's ``faults.hold_at``. An in-process
    caller passes its own (a simulated device's power cut).

    A download first asks the director again: if it now names another bundle
    (or nothing, or something refused), the expected bundle is not touched and
    the answer says so, so the installer never blames the expected bundle for
    what the director said.
    """
    try:
        target, rollback_of, image = resolve_marked(config, installed_counter)
    except RepositoryUnavailable as exc:
        return _unavailable(exc)
    except UpdateRefused as exc:
        return _refused(exc, "assignment")
    if target is None:
        return Unassigned()
    signed = InstallTarget.model_validate(asdict(target))
    if command == "check":
        if rollback_of is not None:
            return RollbackAssigned(target=signed, rollback_of=rollback_of)
        return Assigned(target=signed)
    if rollback_of is not None or (expect is not None and expect not in signed.matching_ids()):
        # A fleet rollback is never downloaded: the director changed its mind.
        return Changed(target=signed)
    hold = faults or Faults(config.faults.hold_at)

    def progress(received: int) -> None:
        if received > 0:
            hold.hold("download")

    try:
        path = image.download(target, downloads_dir(config), on_progress=progress)
        open_verified_manifest(path, target)
    except RepositoryUnavailable as exc:
        return _unavailable(exc)
    except UpdateRefused as exc:
        return _refused(exc, "download")
    return Downloaded(target=signed, path=str(path))


def _unavailable(exc: UpdateRefused) -> Unavailable:
    return Unavailable(reason=exc.reason, message=exc.detail)


def _refused(exc: UpdateRefused, about: Literal["assignment", "download", "shadow"]) -> Refused:
    return Refused(
        reason=exc.reason,
        message=exc.detail,
        about=about,
        condemns_bundle=about != "assignment" and exc.condemns_bundle,
    )


def _die_with(parent: int) -> None:
    """Be killed when ``parent`` dies (PR_SET_PDEATHSIG), or exit if it already has."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="edge-agent-fetch")
    parser.add_argument("command", choices=["check", "download", "shadow", "plan"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--installed-counter", type=int, default=0)
    parser.add_argument("--expect", help="the bundle id (ALGORITHM:HEX) a download is for")
    parser.add_argument(
        "--have",
        action="append",
        default=[],
        help="a bundle id (ALGORITHM:HEX) not to download as the shadow (repeatable)",
    )
    parser.add_argument("--parent", type=int, help="the agent's pid: the fetcher dies with it")
    args = parser.parse_args()
    if args.parent is not None:
        _die_with(args.parent)
    config = AgentConfig.load(Path(args.config))
    answer: FetchAnswer | ShadowAnswer | PlanAnswer
    if args.command == "shadow":
        answer = run_shadow(config, args.installed_counter, args.have)
    elif args.command == "plan":
        answer = run_plan(config)
    else:
        answer = run(args.command, config, args.installed_counter, args.expect)
    print(answer.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
