"""``fleetctl release push|yank``: the server's copy of the image repository."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

from fleet_server.api.client import ApiClientError
from fleet_server.fleetctl.commands import add_command
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.release_engineering.release import existing_repository
from fleet_server.fleetctl.remote.client import api_client, with_token_hint
from fleet_server.fleetctl.render import emit
from fleet_server.release.repository import ImageRepository


def _current_metadata(repo: ImageRepository) -> list[Path]:
    """What a device reads now: every root, the timestamp and the versions it leads to."""
    metadata = repo.metadata_dir
    try:
        timestamp = json.loads((metadata / "timestamp.json").read_bytes())
        snapshot_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
        snapshot_file = metadata / f"{snapshot_version}.snapshot.json"
        snapshot = json.loads(snapshot_file.read_bytes())
        roles = [
            metadata / f"{meta['version']}.{name}"
            for name, meta in snapshot["signed"]["meta"].items()
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"{repo.path} has unreadable metadata: {exc}") from None
    roots = sorted(
        (p for p in metadata.glob("*.root.json") if p.name.split(".")[0].isdigit()),
        key=lambda p: int(p.name.split(".")[0]),
    )
    return [*roots, metadata / "timestamp.json", snapshot_file, *roles]


def _repository_files(repo: ImageRepository, known: set[tuple[str, str]]) -> dict[str, str]:
    """The current metadata, and each target file the server does not hold yet (base64).

    Older snapshot and targets versions are not sent: with consistent snapshots
    a device only ever asks for the versions the newest timestamp leads to.
    """
    files = {
        f"metadata/{p.name}": base64.b64encode(p.read_bytes()).decode()
        for p in _current_metadata(repo)
    }
    for path in sorted(repo.targets_dir.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        # Consistent snapshots: targets/DIR/SHA256.NAME is target DIR/NAME with that hash.
        digest, _, name = path.name.partition(".")
        directory = path.parent.relative_to(repo.targets_dir).as_posix()
        if (f"{directory}/{name}", digest) in known:
            continue
        rel = path.relative_to(repo.path).as_posix()
        files[rel] = base64.b64encode(path.read_bytes()).decode()
    return files


def cmd_release_push(args: argparse.Namespace) -> None:
    repo = existing_repository(args.repo)
    client = api_client(args)
    try:
        known = {(r["target_path"], r["sha256"]) for r in client.get("/releases")["releases"]}
        files = _repository_files(repo, known)
        result = client.post("/releases", {"files": files})
    except ApiClientError as exc:
        raise CommandError(with_token_hint(exc, client)) from None
    published = result["published"]
    bundles = sum(1 for path in files if path.startswith("targets/"))
    lines = [
        f"Pushed {result['files']} files ({bundles} bundle{'' if bundles == 1 else 's'}) "
        f"to {client.server}"
    ]
    lines += [
        f"  published {r['name']} {r['version']} (release counter {r['release_counter']}) "
        f"for {', '.join(r['hardware_ids'])}"
        for r in published
    ]
    if not published:
        lines.append("  no new bundle (metadata refreshed)")
    emit(args, {**result, "sent": sorted(files)}, "\n".join(lines))


def cmd_release_yank(args: argparse.Namespace) -> None:
    result = api_client(args).post(
        "/releases/yank", {"release": args.release, "reason": args.reason}
    )
    r = result["release"]
    withdrawn, kept = result["withdrawn"], result["kept"]
    lines = [f"Yanked {r['name']} {r['version']} ({r['target_path']}): {r['yank_reason']}"]
    lines.append(
        f"  withdrawn from {len(withdrawn)} device(s) not running it (they keep what they run)"
        + (f": {', '.join(withdrawn)}" if withdrawn else "")
    )
    lines.append(
        f"  {len(kept)} device(s) running it keep it until assigned another release"
        + (f": {', '.join(kept)}" if kept else "")
    )
    if result.get("rules_cancelled"):
        lines.append(f"  tag rules cancelled: {', '.join(result['rules_cancelled'])}")
    lines.append(
        "A yank is not a rollback: to move devices off this release, release the model to "
        "return to again above it (fleetctl release add --re-release-of NAME@VERSION, "
        "release push) and assign that."
    )
    emit(args, result, "\n".join(lines))


def add_commands(release: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``release push|yank`` in the release group."""
    p = add_command(
        release,
        "push",
        cmd_release_push,
        parents,
        "push a local image repository's new files to the server",
        "fleetctl release push --repo repo",
        "fleetctl release push --repo repo --server https://fleet.example "
        "--token-file operator.token --ca-file ca.pem",
    )
    p.add_argument("--repo", required=True, help="the local image repository (release add)")
    p = add_command(
        release,
        "yank",
        cmd_release_yank,
        parents,
        "stop offering a release to devices not running it yet (not a rollback)",
        "fleetctl release yank pump-health@1.2.0 --reason 'false alarms on line B'",
    )
    p.add_argument("release", help="NAME@VERSION or the bundle's target path")
    p.add_argument(
        "--reason", required=True, help="why, shown by release list and in refusals to assign it"
    )
