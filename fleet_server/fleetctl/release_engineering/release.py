"""``fleetctl release add|list|timestamp``: the image repository, signed with the offline keys."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fleet_server.fleetctl.commands import add_command
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.release_engineering.keys import (
    load_store,
    passphrase_flags,
)
from fleet_server.fleetctl.remote.client import api_client, remote_flags
from fleet_server.fleetctl.render import emit, when
from fleet_server.release.repository import ImageRepository


def existing_repository(path: str) -> ImageRepository:
    """The image repository in the folder ``path``; refused if there is none."""
    repo = ImageRepository(Path(path))
    if not repo.exists():
        raise CommandError(f"{path} holds no image repository (fleetctl release add)")
    return repo


def cmd_release_add(args: argparse.Namespace) -> None:
    if args.re_release_of is not None:
        cmd_release_re_release(args)
        return
    if args.version is not None:
        raise CommandError("--version goes with --re-release-of (a bundle carries its version)")
    if args.bundle is None:
        raise CommandError("give a bundle to release, or --re-release-of NAME@VERSION")
    repo = ImageRepository(Path(args.repo))
    if not Path(args.bundle).is_file():
        raise CommandError(f"bundle {args.bundle} does not exist")
    created = False
    if not repo.exists():
        # Creating a repository is the point of the first release, but only in a
        # folder that exists: a mistyped path must not grow a new repository.
        parent = repo.path.absolute().parent
        if not parent.is_dir():
            raise CommandError(
                f"{args.repo} holds no image repository and its folder {parent} does not "
                "exist; create the folder first (or give the path of an existing repository)"
            )
    store = load_store(args)
    if not repo.exists():
        repo.create(store)
        created = True
    released = repo.add_bundle(Path(args.bundle), store)
    emit(
        args,
        {
            "repository": str(repo.path),
            "created": created,
            "target": released.target_path,
            "sha256": released.sha256,
            "length": released.length,
            "release_counter": released.release_counter,
            "trusted_root": str(repo.trusted_root_path),
        },
        (
            f"Created repository {repo.path}: a new image repository "
            f"(trusted root for devices: {repo.trusted_root_path})\n"
            if created
            else ""
        )
        + f"Released {released.target_path} ({released.length} bytes, release counter "
        f"{released.release_counter}) for {', '.join(released.hardware_ids)}",
    )


def cmd_release_re_release(args: argparse.Namespace) -> None:
    """An old model released again above the current release counter (a rollback)."""
    if args.bundle is not None:
        raise CommandError(
            "--re-release-of takes the bundle from the repository; give no bundle file"
        )
    name, at, version = args.re_release_of.rpartition("@")
    if not at or not name or not version:
        raise CommandError(f"--re-release-of {args.re_release_of!r}: give NAME@VERSION")
    repo = existing_repository(args.repo)
    released = repo.re_release(name, version, load_store(args), args.version)
    emit(
        args,
        {
            "repository": str(repo.path),
            "target": released.target_path,
            "version": released.version,
            "re_release_of": version,
            "sha256": released.sha256,
            "length": released.length,
            "release_counter": released.release_counter,
        },
        f"Re-released {name} {version} as {name} {released.version} "
        f"({released.target_path}, release counter {released.release_counter}) for "
        f"{', '.join(released.hardware_ids)}\n"
        f"Next: fleetctl release push --repo {args.repo}, then "
        f"fleetctl assign {name}@{released.version} ...",
    )


def cmd_release_list(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]]
    if args.repo:
        bundles = existing_repository(args.repo).bundles()
        rows = [
            {
                "name": b.name,
                "version": b.version,
                "release_counter": b.release_counter,
                "hardware_ids": list(b.hardware_ids),
                "length": b.length,
                "target": b.target_path,
            }
            for b in bundles
        ]
    elif args.server or os.environ.get("EDGEFLEET_SERVER"):
        rows = _release_rows(api_client(args).get("/releases")["releases"])
    else:
        raise CommandError("give --repo DIR (a local repository) or --server URL")
    table = [f"{'NAME':<16} {'VERSION':<10} {'COUNTER':>10}  {'BYTES':>9}  HARDWARE"]
    table += [
        f"{r['name']:<16} {r['version']:<10} {r['release_counter']:>10}  {r['length']:>9}  "
        f"{', '.join(r['hardware_ids'])}{_yank_note(r)}"
        for r in rows
    ]
    emit(args, rows, "\n".join(table) if rows else "No bundles released.")


def _release_rows(releases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "name": r["name"],
            "version": r["version"],
            "release_counter": r["release_counter"],
            "hardware_ids": list(r["hardware_ids"]),
            "length": r["length"],
            "target": r["target_path"],
            "yanked_at": r.get("yanked_at"),
            "yank_reason": r.get("yank_reason"),
        }
        for r in releases
    ]


def _yank_note(r: dict[str, Any]) -> str:
    if not r.get("yanked_at"):
        return ""
    return f"  [yanked {when(r['yanked_at'])[:10]}: {r.get('yank_reason')}]"


def cmd_release_timestamp(args: argparse.Namespace) -> None:
    repo = existing_repository(args.repo)
    version = repo.refresh_timestamp(load_store(args))
    emit(args, {"timestamp_version": version}, f"Re-signed timestamp (version {version})")


def add_commands(release: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``release add|list|timestamp`` in the release group (list also reads a server's)."""
    p = add_command(
        release,
        "add",
        cmd_release_add,
        parents,
        "sign a bundle into the image repository",
        "fleetctl release add bundles/pump-health-1.1.0.bundle --repo repo --keys keys",
        "fleetctl release add bundles/pump-health-1.1.0.bundle --repo repo --keys keys "
        "--passphrase-env RELEASE_PASS",
        "fleetctl release add --re-release-of pump-health@1.1.0 --repo repo --keys keys",
        epilog="The first release creates the repository, in a folder that exists; devices are\n"
        "provisioned with its REPO/metadata/1.root.json. To roll back to an old model,\n"
        "release it again above the current counter with --re-release-of.\n\n",
    )
    p.add_argument(
        "bundle",
        nargs="?",
        help="the .bundle file (fleetctl bundle build); none with --re-release-of",
    )
    p.add_argument(
        "--repo", required=True, help="the image repository's folder (created if it is new)"
    )
    p.add_argument("--keys", required=True, help="the release keys' folder (fleetctl keys init)")
    p.add_argument(
        "--re-release-of",
        metavar="NAME@VERSION",
        help="release this old version's model again, above the highest release counter "
        "(devices never install a lower one); takes no bundle file",
    )
    p.add_argument(
        "--version",
        help="with --re-release-of: the new version (default: the patch version after the "
        "highest released one)",
    )
    passphrase_flags(p)
    p = add_command(
        release,
        "list",
        cmd_release_list,
        [*parents, remote_flags()],
        "list released bundles (local or server)",
        "fleetctl release list --repo repo",
        "fleetctl release list --server http://127.0.0.1:8080 --json",
    )
    p.add_argument("--repo", help="a local image repository (else: --server)")
    p = add_command(
        release,
        "timestamp",
        cmd_release_timestamp,
        parents,
        "re-sign the timestamp before it expires",
        "fleetctl release timestamp --repo repo --keys keys",
        "fleetctl release timestamp --repo repo --keys keys --passphrase-file release.pass",
    )
    p.add_argument("--repo", required=True, help="the image repository's folder")
    p.add_argument("--keys", required=True, help="the release keys' folder")
    passphrase_flags(p)
