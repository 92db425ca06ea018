"""``fleetctl``: the release engineer's and operator's command-line tool.

Human output by default, ``--json`` for scripts. It never prompts unless
standard input is a terminal; passphrases come from ``--passphrase-file`` or
``--passphrase-env``. Commands that talk to a fleet server (devices, assign,
audit, tokens, release push, drift, alerts, labels) take ``--server URL`` and an API token from
``--token-file`` or ``--token-env``. Errors a user can cause end in one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import csv
import getpass
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleet_server.api.client import ApiClient, ApiClientError, path_segment
from fleet_server.audit import ChainCheck, ChainReport, anchor_of, head_signature_problem
from fleet_server.broker_config import (
    DEFAULT_PORT,
    DEFAULT_TLS_PORT,
    BrokerTLS,
    write_broker_config,
)
from fleet_server.release.bundle_builder import (
    BundleBuildError,
    BundleSpec,
    build_bundle,
    load_feature_file,
    parse_safe_default,
)
from fleet_server.release.keys import KeyStoreError, init_keys, is_encrypted, load_keys
from fleet_server.release.repository import ImageRepository, RepositoryError
from protocol.api import ASSIGNMENT_ID_PATTERN, SignedAuditHead
from protocol.bundle import BundleFormatError, read_bundle
from protocol.cli import (
    EXIT_BROKEN_PIPE,
    EXIT_USAGE,
    CommandParser,
    edgefleet_version,
    silence_stdout,
)
from protocol.cli import examples as _examples
from protocol.manifest import Manifest, ResourceBudget

EXIT_FAILED = 1


class CommandError(Exception):
    """A command cannot go on; the message is shown to the user as is."""


def _passphrase(args: argparse.Namespace, needed: bool, confirm: bool = False) -> bytes | None:
    if args.passphrase_file:
        try:
            return Path(args.passphrase_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise CommandError(f"cannot read the passphrase file: {exc}") from None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise CommandError(f"environment variable {args.passphrase_env} is not set")
        return value.encode()
    if not needed:
        return None
    if not sys.stdin.isatty():
        raise CommandError(
            "the release keys are encrypted and standard input is not a terminal to ask on; "
            "give --passphrase-file FILE or --passphrase-env VAR"
        )
    first = getpass.getpass("Passphrase for the release keys: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise CommandError("the passphrases differ")
    return first.encode()


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human)


# -- keys --------------------------------------------------------------------


def cmd_keys_init(args: argparse.Namespace) -> None:
    passphrase = _passphrase(args, needed=False)
    store = init_keys(Path(args.dir), threshold=args.threshold, passphrase=passphrase)
    data = {
        "dir": str(args.dir),
        "encrypted": passphrase is not None,
        "roles": {
            role: {"threshold": keys.threshold, "keyids": [k.keyid for k in keys.public_keys]}
            for role, keys in store.roles.items()
        },
    }
    lines = [f"Created release keys in {args.dir} ({'encrypted' if passphrase else 'unencrypted'})"]
    lines += [
        f"  {role:<10} threshold {v['threshold']}  {', '.join(k[:12] for k in v['keyids'])}"
        for role, v in data["roles"].items()
    ]
    lines.append("Keep the root and targets keys offline.")
    _emit(args, data, "\n".join(lines))


def _load_store(args: argparse.Namespace) -> Any:
    keys_dir = Path(args.keys)
    encrypted = is_encrypted(keys_dir)
    return load_keys(
        keys_dir, passphrase=_passphrase(args, needed=encrypted) if encrypted else None
    )


# -- bundles -------------------------------------------------------------------


def cmd_bundle_build(args: argparse.Namespace) -> None:
    model_path = Path(args.model)
    try:
        model = model_path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read the model {model_path}: {exc.strerror}") from None
    features = classes = None
    if args.features:
        features, classes = load_feature_file(Path(args.features))
    safe_default = None
    if args.safe_default:
        source = Path(args.safe_default)
        text = source.read_text() if source.exists() else args.safe_default
        safe_default = parse_safe_default(text)
    spec = BundleSpec(
        name=args.name,
        version=args.version,
        hardware_ids=args.hardware,
        release_counter=args.release_counter,
        min_agent_version=args.min_agent_version,
        description=args.description,
        feature_specs=features,
        classes=args.classes.split(",") if args.classes else classes,
        confidence_threshold=args.confidence_threshold,
        safe_default=safe_default,
        budget=ResourceBudget(max_latency_ms=args.max_latency_ms, max_memory_mb=args.max_memory_mb),
    )
    calibration = Path(args.calibration) if args.calibration else None
    built = build_bundle(model, Path(args.baseline), spec, calibration=calibration)
    out = _bundle_destination(args.out, f"{built.manifest.name}-{built.manifest.version}.bundle")
    try:
        built.write(out)
    except OSError as exc:
        raise CommandError(f"cannot write the bundle {out}: {exc.strerror}") from None
    m = built.manifest
    _emit(
        args,
        {
            "bundle": str(out),
            "name": m.name,
            "version": m.version,
            "release_counter": m.release_counter,
            "sha256": _sha256(out),
            "calibration_rows": (
                m.baseline.calibration.reference_rows if m.baseline.calibration else None
            ),
        },
        f"Built {out}: {m.name} {m.version} (release counter {m.release_counter}) for "
        f"{', '.join(m.hardware_ids)}; {len(m.features)} features, {m.golden.count} golden vectors"
        + _calibration_note(m),
    )


def _bundle_destination(out_arg: str, file_name: str) -> Path:
    """Where ``--out`` puts the bundle: a folder (trailing slash or existing) gets FILE_NAME.

    A folder is created with its parents; a file path gets its parent folders too,
    so ``--out bundles/`` never becomes a file named ``bundles``.
    """
    out = Path(out_arg)
    is_folder = out_arg.endswith(("/", os.sep)) or out.is_dir()
    folder = out if is_folder else out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CommandError(f"cannot write into {folder}: it exists and is not a folder") from None
    except OSError as exc:
        raise CommandError(f"cannot create the folder {folder}: {exc.strerror}") from None
    return folder / file_name if is_folder else out


def _calibration_note(m: Manifest) -> str:
    c = m.baseline.calibration
    if c is None:
        return "; no calibration (accuracy cannot be estimated without labels)"
    return f"; calibrated on {c.reference_rows} labelled rows ({c.reference_accuracy:.1%} right)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cmd_bundle_inspect(args: argparse.Namespace) -> None:
    path = Path(args.bundle)
    try:
        with path.open("rb") as f:
            manifest, _ = read_bundle(f)
    except FileNotFoundError:
        raise CommandError(f"bundle {path} does not exist") from None
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return
    print(describe_manifest(manifest))


def describe_manifest(m: Manifest) -> str:
    """A human description of a manifest."""

    def tensor(t: Any) -> str:
        return f"{t.name} {t.dtype}{t.shape_signature}"

    lines = [
        f"{m.name} {m.version}  (release counter {m.release_counter}, schema {m.schema_version})",
        f"  hardware:       {', '.join(m.hardware_ids)}",
        f"  min agent:      {m.min_agent_version}",
        f"  model:          {m.model_file}  {m.files[m.model_file].length} bytes  "
        f"sha256 {m.files[m.model_file].sha256[:16]}…",
        f"  inputs:         {'; '.join(tensor(t) for t in m.inputs)}",
        f"  outputs:        {'; '.join(tensor(t) for t in m.outputs)}",
    ]
    if m.classes:
        lines.append(f"  classes:        {', '.join(m.classes)}")
    lines.append(
        f"  summary:        {', '.join(f'{d.input}: {d.method}' for d in m.derivations)}; "
        f"baseline {m.baseline.rows} rows, bins {m.baseline.id[:19]}…"
    )
    lines.append(f"  calibration:    {_calibration_note(m).removeprefix('; ')}")
    lines.append(
        f"  self-test:      {m.golden.count} golden vectors (atol {m.golden.atol}, "
        f"rtol {m.golden.rtol}); budget {m.budget.max_latency_ms} ms, {m.budget.max_memory_mb} MB"
    )
    lines.append(
        f"  fallback:       escalate below {m.fallback.confidence_threshold} on "
        f"{m.fallback.confidence_output or '-'}; safe default "
        + "; ".join(
            f"{k}={[round(v, 3) for v in vals]}" for k, vals in m.fallback.safe_default.items()
        )
    )
    lines.append("  features:")
    width = max(len(f.name) for f in m.features)
    for spec, base in zip(m.features, m.baseline.features, strict=True):
        s = base.summary
        valid = ""
        if spec.valid_min is not None or spec.valid_max is not None:
            valid = f"  valid [{spec.valid_min}, {spec.valid_max}]"
        lines.append(
            f"    {spec.name:<{width}}  mean {s.mean:>10.4g}  sd {s.variance**0.5:>9.4g}  "
            f"range [{s.min:.4g}, {s.max:.4g}]  {len(s.counts)} bins{valid}"
            + (f" {spec.unit}" if spec.unit else "")
        )
    return "\n".join(lines)


# -- releases ------------------------------------------------------------------


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
    store = _load_store(args)
    if not repo.exists():
        repo.create(store)
        created = True
    released = repo.add_bundle(Path(args.bundle), store)
    _emit(
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
    repo = ImageRepository(Path(args.repo))
    if not repo.exists():
        raise CommandError(f"{args.repo} holds no image repository (fleetctl release add)")
    released = repo.re_release(name, version, _load_store(args), args.version)
    _emit(
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
        local = ImageRepository(Path(args.repo))
        if not local.exists():
            raise CommandError(f"{args.repo} holds no image repository (fleetctl release add)")
        bundles = local.bundles()
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
        rows = _release_rows(_client(args).get("/releases")["releases"])
    else:
        raise CommandError("give --repo DIR (a local repository) or --server URL")
    table = [f"{'NAME':<16} {'VERSION':<10} {'COUNTER':>10}  {'BYTES':>9}  HARDWARE"]
    table += [
        f"{r['name']:<16} {r['version']:<10} {r['release_counter']:>10}  {r['length']:>9}  "
        f"{', '.join(r['hardware_ids'])}{_yank_note(r)}"
        for r in rows
    ]
    _emit(args, rows, "\n".join(table) if rows else "No bundles released.")


def cmd_release_timestamp(args: argparse.Namespace) -> None:
    repo = ImageRepository(Path(args.repo))
    if not repo.exists():
        raise CommandError(f"{args.repo} holds no image repository (fleetctl release add)")
    version = repo.refresh_timestamp(_load_store(args))
    _emit(args, {"timestamp_version": version}, f"Re-signed timestamp (version {version})")


# -- fleet server (remote) -------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    server = args.server or os.environ.get("EDGEFLEET_SERVER")
    if not server:
        raise CommandError("give --server URL (or set EDGEFLEET_SERVER)")
    token = None
    if args.token_file:
        token = _read_secret(args.token_file, "API token")
    elif args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise CommandError(f"environment variable {args.token_env} is not set")
    else:
        token = os.environ.get("EDGEFLEET_TOKEN") or None
    return ApiClient(server, token, ca_file=args.ca_file)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, each column as wide as its widest cell."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _when(text: str | None) -> str:
    return text[:19].replace("T", " ") if text else "-"


def _describe_device(d: dict[str, Any]) -> str:
    fields = [
        ("device", d["id"]),
        ("hardware", d["hardware_id"]),
        ("region", d.get("region") or "-"),
        ("tags", ", ".join(d.get("tags") or []) or "-"),
        ("online", "yes" if d["online"] else "no"),
        ("last seen", _when(d.get("last_seen_at"))),
        ("enrolled", _when(d.get("enrolled_at"))),
        ("agent", d.get("agent_version") or "-"),
        ("running", d.get("active_bundle") or "-"),
        ("counter", d.get("installed_counter", 0)),
        ("phase", d.get("phase") or "-"),
        ("assigned", d.get("assigned_target") or "-"),
        ("director version", d.get("director_version", 0)),
        *_decommission_fields(d),
    ]
    return "\n".join(f"{name + ':':<18}{value}" for name, value in fields)


def cmd_devices_list(args: argparse.Namespace) -> None:
    devices = _client(args).get(
        "/devices",
        tag=args.tag,
        hardware_id=args.hardware,
        online=args.online,
        include_decommissioned=args.all or None,
    )["devices"]
    table = _table(
        ["DEVICE", "HARDWARE", "ONLINE", "RUNNING", "ASSIGNED", "TAGS"],
        [
            [
                d["id"],
                d["hardware_id"],
                _online_cell(d),
                d.get("active_bundle"),
                d.get("assigned_target"),
                ",".join(d.get("tags") or []) or None,
            ]
            for d in devices
        ],
    )
    _emit(args, devices, table if devices else "No devices.")


def cmd_devices_show(args: argparse.Namespace) -> None:
    device = _client(args).get(f"/devices/{path_segment(args.device)}")
    _emit(args, device, _describe_device(device) + _describe_refusals(device))


def _describe_refusals(d: dict[str, Any]) -> str:
    """The warning about a refused assignment, and the device's latest refusals."""
    lines = []
    if d.get("assignment_warning"):
        lines.append(f"WARNING: {d['assignment_warning']}")
    refusals = d.get("refusals") or []
    if refusals:
        lines.append("recent refusals:")
        lines += [
            f"  {_when(r.get('at'))}  {r.get('bundle') or '-'}  "
            f"{r.get('reason') or r.get('event')}: {r.get('message') or '-'}"
            for r in refusals
        ]
    return "".join(f"\n{line}" for line in lines)


def cmd_devices_tag(args: argparse.Namespace) -> None:
    if not args.add and not args.remove:
        raise CommandError("give --add TAG or --remove TAG (each repeatable)")
    device = _client(args).request(
        "PATCH",
        f"/devices/{path_segment(args.device)}/tags",
        body={"add": args.add, "remove": args.remove},
    )
    _emit(args, device, f"{device['id']}: tags {', '.join(device['tags']) or '(none)'}")


def _password_lines(
    args: argparse.Namespace, created: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The answer to show and its password lines: the password itself, or where --out wrote it."""
    if not args.out:
        return created, (
            "Password (shown only now; the device's HTTP and MQTT credential):\n"
            f"  {created['password']}"
        )
    _write_secret(Path(args.out), created["password"] + "\n")
    shown = {k: v for k, v in created.items() if k != "password"}
    return {**shown, "out": args.out}, (
        f"Password written to {args.out} (mode 0600; the device's HTTP and MQTT credential, "
        "for its [credentials] password_file)"
    )


def _check_out_folder(args: argparse.Namespace, what: str) -> None:
    """Refuse an --out whose folder does not exist before the server makes a secret."""
    if args.out and not Path(args.out).absolute().parent.is_dir():
        raise CommandError(f"--out {args.out}: its folder does not exist; no {what}")


def cmd_devices_register(args: argparse.Namespace) -> None:
    _check_out_folder(args, "device was registered")
    created = _client(args).post(
        "/devices",
        {
            "device_id": args.device,
            "hardware_id": args.hardware,
            "region": args.region,
            "tags": args.tag,
            "reuse_decommissioned": args.reuse_decommissioned,
        },
    )
    shown, password = _password_lines(args, created)
    _emit(
        args,
        shown,
        f"Registered {created['device_id']} ({created['device']['hardware_id']}).\n"
        + password
        + (
            f"\nMQTT namespace (agent.toml, [mqtt] namespace): {created['mqtt_namespace']}"
            if created.get("mqtt_namespace")
            else ""
        ),
    )


def cmd_devices_events(args: argparse.Namespace) -> None:
    events = _client(args).get(f"/devices/{path_segment(args.device)}/events", limit=args.limit)[
        "events"
    ]
    table = _table(
        ["AT", "EVENT", "DETAILS"],
        [[_when(e.get("at")), e.get("event"), _details_cell(e)] for e in events],
    )
    _emit(args, events, table if events else "No events.")


def _details_cell(item: dict[str, Any]) -> str:
    """An event's or audit entry's details in one cell; a clear note if the server left them out."""
    omitted = item.get("details_omitted")
    if omitted:
        return f"[{omitted}]"
    return json.dumps(item.get("details") or {}, sort_keys=True)[:80]


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 3600, 30m or 7d"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return seconds


def cmd_provisioning_token_create(args: argparse.Namespace) -> None:
    _check_out_folder(args, "token was created")
    created = _client(args).post(
        "/provisioning-tokens",
        {"hardware_id": args.hardware, "tags": args.tag, "uses": args.uses, "ttl_s": args.ttl},
    )
    scope = f" for {created['hardware_id']} devices" if created["hardware_id"] else ""
    summary = (
        f"Provisioning token{scope}, {created['uses']} use(s), expires "
        f"{_when(created['expires_at'])} UTC"
    )
    if not args.out:
        _emit(args, created, f"{summary} (shown only now):\n  {created['token']}")
        return
    _write_secret(Path(args.out), created["token"] + "\n")
    shown = {k: v for k, v in created.items() if k != "token"}
    _emit(
        args,
        {**shown, "out": args.out},
        f"{summary}, written to {args.out} (mode 0600); devices name it in agent.toml: "
        "[enrolment] token_file",
    )


def _write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the start), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


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
    repo = ImageRepository(Path(args.repo))
    if not repo.exists():
        raise CommandError(f"{args.repo} holds no image repository (fleetctl release add)")
    client = _client(args)
    try:
        known = {(r["target_path"], r["sha256"]) for r in client.get("/releases")["releases"]}
        files = _repository_files(repo, known)
        result = client.post("/releases", {"files": files})
    except ApiClientError as exc:
        raise CommandError(_with_token_hint(exc, client)) from None
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
    _emit(args, {**result, "sent": sorted(files)}, "\n".join(lines))


def _with_token_hint(exc: ApiClientError, client: ApiClient) -> str:
    """The server's refusal, plus how to give a token when it wanted one (401)."""
    if exc.status != 401:
        return str(exc)
    given = "the token given was not accepted" if client.token else "no API token was given"
    return (
        f"{exc} ({given}; pass an operator or admin token with --token-file FILE, "
        "--token-env VAR or the EDGEFLEET_TOKEN environment variable)"
    )


def cmd_assign(args: argparse.Namespace) -> None:
    if not args.device and not args.tag:
        raise CommandError("give --device ID (repeatable) or --tag TAG")
    result = _client(args).post(
        "/assignments", {"release": args.release, "devices": args.device, "tag": args.tag}
    )
    r = result["release"]
    lines = [f"Assigned {r['name']} {r['version']} ({r['target_path']}):"]
    if result["assignments"]:
        lines.append(
            _table(
                ["DEVICE", "DIRECTOR VERSION"],
                [[a["device_id"], a["director_version"]] for a in result["assignments"]],
            )
        )
    if result.get("rule"):
        lines.append(
            f"Rule {result['rule']}: devices that gain the tag {args.tag} get it too "
            f"(fleetctl assignments cancel {result['rule']} stops that)"
        )
    _emit(args, result, "\n".join(lines))


def _checked_root(data: Any) -> tuple[bytes, int]:
    """The director root the server sent, as JSON text, and its version; refused unless valid.

    Devices anchor all trust in this file, so only a TUF root signed by a
    threshold of its own keys is written.
    """
    from tuf.api import exceptions as tuf_exc
    from tuf.api.metadata import Metadata, Root

    text = json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"
    try:
        md = Metadata.from_bytes(text)
        if not isinstance(md.signed, Root):
            raise ValueError(f"it is {md.signed.type} metadata")
        md.verify_delegate(Root.type, md)
    except (tuf_exc.RepositoryError, ValueError, TypeError, KeyError) as exc:
        raise CommandError(
            f"the server's answer is not a director root signed by its own keys: {exc}"
        ) from None
    return text, md.signed.version


def cmd_director_root(args: argparse.Namespace) -> None:
    text, version = _checked_root(_client(args).get("/director/root"))
    if not args.out:
        sys.stdout.write(text.decode())
        return
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(text)
        tmp.replace(out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    _emit(
        args,
        {"out": str(out), "version": version},
        f"Wrote the director's root (version {version}) to {args.out}; devices name it in "
        "agent.toml: [director] root",
    )


# -- device and release lifecycle ---------------------------------------------------


def _online_cell(d: dict[str, Any]) -> str:
    if d.get("decommissioned_at"):
        return "decommissioned"
    return "yes" if d["online"] else "no"


def _decommission_fields(d: dict[str, Any]) -> list[tuple[str, Any]]:
    if not d.get("decommissioned_at"):
        return []
    return [
        ("decommissioned", f"{_when(d['decommissioned_at'])} UTC"),
        ("reason", d.get("decommission_reason") or "-"),
    ]


def _yank_note(r: dict[str, Any]) -> str:
    if not r.get("yanked_at"):
        return ""
    return f"  [yanked {_when(r['yanked_at'])[:10]}: {r.get('yank_reason')}]"


# What an operator must do on a broker whose passwd file `fleetctl broker config` wrote.
_BROKER_NOTE = (
    "If the broker's passwd file comes from 'fleetctl broker config', run it again {what} "
    "and reload Mosquitto (kill -HUP): it re-reads passwd and acl and disconnects clients "
    "whose credentials no longer hold."
)


_PASSWORD_OUT_HELP = (
    "write only the password to FILE, readable by its owner only (mode 0600), for the "
    "device's [credentials] password_file and broker config --device ID:FILE "
    "(default: print it)"
)


def cmd_devices_decommission(args: argparse.Namespace) -> None:
    device = _client(args).post(
        f"/devices/{path_segment(args.device)}/decommission", {"reason": args.reason}
    )
    _emit(
        args,
        device,
        f"Decommissioned {device['id']}: its credentials no longer work (HTTP 401, MQTT "
        "messages dropped), its assignment is withdrawn, its history is kept; "
        "'devices list --all' still shows it.\n"
        + _BROKER_NOTE.format(what="without --device " + device["id"]),
    )


def cmd_devices_rotate_credentials(args: argparse.Namespace) -> None:
    _check_out_folder(args, "credentials were rotated")
    created = _client(args).post(f"/devices/{path_segment(args.device)}/credentials", {})
    shown, password = _password_lines(args, created)
    _emit(
        args,
        shown,
        f"New credentials for {created['device_id']}; the old password no longer works.\n"
        + password
        + "\nInstall it on the device (its credentials password file). "
        + _BROKER_NOTE.format(
            what=f"with --device {created['device_id']}:FILE holding the new password"
        ),
    )


def cmd_release_yank(args: argparse.Namespace) -> None:
    result = _client(args).post("/releases/yank", {"release": args.release, "reason": args.reason})
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
    _emit(args, result, "\n".join(lines))


# -- assignments: listing and cancelling ------------------------------------------


def cmd_assignments_list(args: argparse.Namespace) -> None:
    items = _client(args).get(
        "/assignments",
        device=args.device,
        tag=args.tag,
        name=args.name,
        cancelled="true" if args.cancelled else None,
    )["assignments"]
    table = _table(
        ["ID", "APPLIES TO", "RELEASE", "COUNTER", "ASSIGNED", "BY", "STATE"],
        [
            [
                a["id"],
                f"tag {a['tag']} ({a['devices']} devices)"
                if a["kind"] == "tag"
                else a["device_id"] + (f" (rule {a['rule']})" if a.get("rule") else ""),
                f"{a['name']} {a['version']}",
                a["release_counter"],
                _when(a["assigned_at"]),
                a["actor"],
                f"cancelled {_when(a['cancelled_at'])} by {a['cancelled_by']}"
                if a.get("cancelled_at")
                else "active",
            ]
            for a in items
        ],
    )
    _emit(args, items, table if items else "No assignments.")


def cmd_assignments_cancel(args: argparse.Namespace) -> None:
    if not re.match(ASSIGNMENT_ID_PATTERN, args.id):
        raise CommandError(
            f"assignment id {args.id!r}: give dev-N (a device's) or tag-N (a tag rule), "
            "as fleetctl assignments list shows"
        )
    cancelled = _client(args).request("DELETE", f"/assignments/{path_segment(args.id)}")
    _emit(args, cancelled, _cancelled_line(cancelled))


def _cancelled_line(c: dict[str, Any]) -> str:
    devices = c["devices"]
    if not devices:
        return f"Cancelled {c['id']} ({c['target_path']}): no device held it"
    keep = "keeps what it runs" if len(devices) == 1 else "keep what they run"
    return f"Cancelled {c['id']} ({c['target_path']}): {', '.join(devices)} {keep}"


def cmd_unassign(args: argparse.Namespace) -> None:
    if (args.device is None) == (args.tag is None):
        raise CommandError("give --device ID or --tag TAG")
    client = _client(args)
    items = client.get("/assignments", device=args.device, tag=args.tag)["assignments"]
    if args.device is not None:
        ids = [a["id"] for a in items if a["kind"] == "device"]
        if not ids:
            raise CommandError(f"{args.device} has no current assignment to cancel")
    else:
        ids = [a["id"] for a in items if a["kind"] == "tag"]
        if not ids:
            raise CommandError(f"no tag rule for {args.tag} to cancel")
    done = [client.request("DELETE", f"/assignments/{path_segment(i)}") for i in ids]
    _emit(args, done, "\n".join(_cancelled_line(c) for c in done))


def cmd_audit_list(args: argparse.Namespace) -> None:
    page = _client(args).get("/audit", after=args.after, limit=args.limit, action=args.action)
    entries = page["entries"]
    table = _table(
        ["SEQ", "AT", "ACTOR", "ACTION", "SUBJECT"],
        [[e["seq"], _when(e["at"]), e["actor"], e["action"], e["subject"]] for e in entries],
    )
    human = table if entries else "No audit entries."
    if page["next_after"] is not None:
        human += f"\nMore: --after {page['next_after']}"
    _emit(args, page, human)


def _verified_head(data: Any, where: str) -> SignedAuditHead:
    """A signed audit head from ``where`` whose signature verifies under the key it carries."""
    try:
        signed = SignedAuditHead.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "the head"
        raise CommandError(f"{where} is not a signed audit head: {field}: {err['msg']}") from None
    problem = head_signature_problem(signed)
    if problem is not None:
        raise CommandError(f"{where}: {problem}")
    return signed


def _read_anchor(path: str) -> SignedAuditHead:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CommandError(f"cannot read the anchor {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CommandError(f"the anchor {path} is not JSON: {exc}") from None
    return _verified_head(data, f"the anchor {path}")


def _check_against(client: ApiClient, anchor: SignedAuditHead, path: str) -> ChainReport:
    """Walk the whole log as the API serves it, checking the chain and that it extends ``anchor``.

    The anchor must have been signed by the key the server signs with now.
    """
    current = _verified_head(client.get("/audit/head"), "the server's audit head")
    if current.head.key_id != anchor.head.key_id:
        raise CommandError(
            f"the anchor {path} was signed by audit key {anchor.head.key_id[:16]}…, but this "
            f"server signs with {current.head.key_id[:16]}…: the anchor is another server's, "
            "or this server's audit key was replaced"
        )
    check = ChainCheck(anchor_of(anchor))
    after = 0
    while True:
        page = client.get("/audit", after=after, limit=1000)
        for e in page["entries"]:
            omitted = e.get("details_omitted")
            report = check.add(
                seq=e["seq"],
                at=datetime.fromisoformat(e["at"]),
                actor=e["actor"],
                action=e["action"],
                subject=e["subject"],
                details=e["details"],
                prev_hash=e["prev_hash"],
                hash=e["hash"],
                unreadable=f"cannot be shown ({omitted})" if omitted else None,
            )
            if report is not None:
                return report
        if page["next_after"] is None:
            return check.finish()
        after = page["next_after"]


def _head_line(signed: SignedAuditHead) -> str:
    h = signed.head
    return (
        f"entry {h.seq} of {h.entries}, hash {h.hash[:16]}…, signed "
        f"{h.signed_at.isoformat(timespec='seconds')} by audit key {h.key_id[:16]}…"
    )


def cmd_audit_head(args: argparse.Namespace) -> None:
    client = _client(args)
    signed = _verified_head(client.get("/audit/head"), "the server's audit head")
    lines = [f"Audit head: {_head_line(signed)}"]
    if args.out:
        out = Path(args.out)
        if out.exists():
            # Replacing an anchor the log no longer extends would destroy the evidence.
            previous = _read_anchor(args.out)
            report = _check_against(client, previous, args.out)
            if not report.ok:
                raise CommandError(
                    f"not replacing {args.out}: the audit log no longer extends it; "
                    f"at entry {report.broken_at}: {report.problem}"
                )
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            tmp.write_text(signed.model_dump_json(indent=2) + "\n")
            tmp.replace(out)
        except OSError as exc:
            raise CommandError(
                f"cannot write the anchor {args.out}: {exc.strerror or exc}"
            ) from None
        lines.append(f"Saved to {args.out}; check later with: fleetctl audit verify --anchor FILE")
    _emit(args, signed.model_dump(mode="json"), "\n".join(lines))


def cmd_audit_verify(args: argparse.Namespace) -> None:
    if args.anchor:
        client = _client(args)
        anchor = _read_anchor(args.anchor)
        checked = _check_against(client, anchor, args.anchor)
        data = {
            "ok": checked.ok,
            "entries": checked.entries,
            "broken_at": checked.broken_at,
            "problem": checked.problem,
            "anchor": anchor.head.model_dump(mode="json"),
        }
        if checked.ok:
            _emit(
                args,
                data,
                f"Audit log intact: {checked.entries} entries, hash chain verified, and it "
                f"extends the anchor ({_head_line(anchor)}).",
            )
            return
        _emit(
            args,
            data,
            f"Audit log BROKEN at entry {checked.broken_at}: {checked.problem} "
            f"(checked {checked.entries} entries against {args.anchor}).",
        )
        raise CommandError(
            f"the audit log does not extend the anchor {args.anchor}: "
            f"broken at entry {checked.broken_at}"
        )
    report = _client(args).get("/audit/verify")
    if report["ok"]:
        _emit(
            args,
            report,
            f"Audit log intact: {report['entries']} entries, hash chain verified "
            "(and it extends the last head the server recorded).",
        )
        return
    if report["broken_at"] is None:  # the server's head record itself is in doubt
        _emit(args, report, f"Audit log NOT VERIFIED: {report['problem']}.")
        raise CommandError(f"the audit log cannot be verified: {report['problem']}")
    _emit(
        args,
        report,
        f"Audit log BROKEN at entry {report['broken_at']}: {report['problem']} "
        f"(checked {report['entries']} entries).",
    )
    raise CommandError(f"the audit log's hash chain is broken at entry {report['broken_at']}")


def cmd_tokens_create(args: argparse.Namespace) -> None:
    created = _client(args).post("/tokens", {"name": args.name, "role": args.role})
    info = created["info"]
    _emit(
        args,
        created,
        f"Created {info['role']} token {info['id']} ({info['name']}), shown only now:\n"
        f"  {created['token']}",
    )


def cmd_tokens_list(args: argparse.Namespace) -> None:
    tokens = _client(args).get("/tokens")["tokens"]
    table = _table(
        ["ID", "NAME", "ROLE", "CREATED", "REVOKED"],
        [
            [t["id"], t["name"], t["role"], _when(t["created_at"]), _when(t["revoked_at"])]
            for t in tokens
        ],
    )
    _emit(args, tokens, table if tokens else "No tokens.")


def cmd_tokens_revoke(args: argparse.Namespace) -> None:
    token = _client(args).request("DELETE", f"/tokens/{path_segment(args.token_id)}")
    _emit(args, token, f"Revoked token {token['id']} ({token['name']}, {token['role']})")


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def cmd_drift(args: argparse.Namespace) -> None:
    scopes = {
        "device": args.device,
        "tag": args.tag,
        "hardware_id": args.hardware,
        "region": args.region,
    }
    if sum(v is not None for v in scopes.values()) + args.fleet != 1:
        raise CommandError(
            "give one of --device ID, --tag TAG, --hardware HW, --region REGION, --fleet"
        )
    report = _client(args).get(
        "/drift",
        **scopes,
        fleet=args.fleet or None,
        model=args.model,
        version=args.version,
        since=args.since,
        until=args.until,
    )
    lines = [
        f"Drift of {report['scope']} {report['scope_value']}".rstrip() + ", "
        f"windows ended {_when(report['since'])} .. {_when(report['until'])}"
    ]
    if not report["models"]:
        lines.append("No windows.")
    for m in report["models"]:
        lines.append("")
        lines.append(
            f"{m['model']} {m['version']}: {m['windows']} windows, {m['requests']} requests"
            f"{_sampled(m)} "
            f"({_when(m['start'])} .. {_when(m['end'])}); drift at false-alarm rate "
            f"{m['false_alarm_rate']} per feature, at least {m['min_n']} values"
        )
        if m.get("problem"):
            lines.append(f"  cannot test: {m['problem']}")
            continue
        lines.append(_accuracy_line(m.get("accuracy")))
        lines.append(
            _table(
                ["FEATURE", "N", "NAN", "PSI", "JS", "STATISTIC/THRESHOLD", "REASONS", "VERDICT"],
                [
                    [
                        f["name"] or f["feature"],
                        f["n"],
                        f.get("nan", 0),
                        _number(f["psi"]),
                        _number(f["js"]),
                        f"{_number(f['statistic'], 1)}/{_number(f['threshold'], 1)}",
                        ",".join(f.get("reasons") or []) or "-",
                        f["verdict"].upper() if f["verdict"] == "drift" else f["verdict"],
                    ]
                    for f in m["features"]
                ],
            )
        )
    _emit(args, report, "\n".join(lines))


def _sampled(m: dict[str, Any]) -> str:
    summarised = m.get("summarised_requests")
    if summarised is None or summarised == m["requests"]:
        return ""
    return f" ({summarised} summarised)"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _accuracy_line(a: dict[str, Any] | None) -> str:
    """The accuracy estimated without labels, its interval and threshold, and the labelled one."""
    if a is None:
        return "  accuracy: not estimated (the release has no calibration or no score output)"
    line = (
        f"  accuracy: estimated {_percent(a['estimated'])} "
        f"({_percent(a['low'])} .. {_percent(a['high'])}, {a['n']} predictions), "
        f"reference {_percent(a['reference'])}, alert below {_percent(a['threshold'])}"
    )
    labelled = a.get("labelled")
    if labelled:
        line += (
            f"; measured {_percent(labelled['accuracy'])} on {labelled['rows']} labelled "
            f"predictions in {labelled['windows']} windows "
            f"(estimated {_percent(labelled['estimated'])} there)"
        )
    if a.get("assumption"):
        allowance = _percent(a.get("allowance"))
        if not a.get("allowance_measured", True):
            allowance += " (default: the bundle predates its measurement)"
        line += f"\n  the interval assumes {a['assumption']}; allowance {allowance}"
    return line


# -- alerts: filters, acknowledgements, silences ----------------------------------------


def _test_figures(reason: str, ev: dict[str, Any]) -> str:
    """One test's numbers in a few characters."""
    if reason in ("missing-values", "out-of-range"):
        return (
            f"{reason}: {_percent(ev.get('share'))} vs {_percent(ev.get('baseline_share'))}, "
            f"p {_p(ev.get('p_value'))}"
        )
    if reason == "new-range":
        return (
            f"new-range: {_number(ev.get('min'))}..{_number(ev.get('max'))} vs "
            f"{_number(ev.get('baseline_min'))}..{_number(ev.get('baseline_max'))}, "
            f"p {_p(ev.get('p_value'))}"
        )
    return f"{_number(ev.get('statistic'), 1)}/{_number(ev.get('threshold'), 1)}"


def _alert_figures(a: dict[str, Any]) -> str:
    ev = a["evidence"]
    if a["kind"] == "accuracy":
        return f"{_percent(ev.get('estimated'))} < {_percent(ev.get('threshold'))}"
    tests = [
        f"{f.get('name') or f['feature']} {_test_figures(reason, figures)}"
        for f in a.get("features") or []
        for reason, figures in sorted((f.get("tests") or {}).items())
    ]
    return "; ".join(tests[:2]) + (f"; +{len(tests) - 2} more" if len(tests) > 2 else "")


def _alert_features(a: dict[str, Any], most: int = 3) -> str | None:
    names = [
        f"{f.get('name') or f['feature']}({','.join(f.get('reasons') or [])})"
        for f in a.get("features") or []
    ]
    if not names:
        return None
    return " ".join(names[:most]) + (f" +{len(names) - most}" if len(names) > most else "")


def _alert_state(a: dict[str, Any]) -> str:
    notes = []
    if a.get("acknowledged") and a["state"] == "open":
        notes.append("acked")
    if a.get("silenced_by"):
        notes.append("silenced")
    return a["state"] + (f" ({', '.join(notes)})" if notes else "")


def _scope(kind: str | None, value: str | None) -> str:
    if kind is None:
        return "any"
    return f"{kind}:{value}" if value else kind


def cmd_alerts(args: argparse.Namespace) -> None:
    alerts = _client(args).get(
        "/alerts",
        state=args.state,
        kind=args.kind,
        scope=args.scope,
        device=args.device,
        model=args.model,
        version=args.version,
        limit=args.limit,
    )["alerts"]
    table = _table(
        [
            *("ID", "KIND", "STATE", "SCOPE", "MODEL", "FEATURES"),
            *("OPENED", "LAST SEEN", "CLOSED", "EVIDENCE"),
        ],
        [
            [
                a["id"],
                a["kind"],
                _alert_state(a),
                _scope(a["scope"], a["scope_value"]),
                f"{a['model']}@{a['version']}",
                _alert_features(a),
                _when(a["opened_at"]),
                _when(a["last_seen_at"]),
                _when(a["closed_at"]),
                _alert_figures(a),
            ]
            for a in alerts
        ],
    )
    _emit(args, alerts, table if alerts else "No alerts.")


def cmd_alerts_ack(args: argparse.Namespace) -> None:
    alert = _client(args).post(f"/alerts/{args.alert_id}/ack", {"comment": args.comment})
    _emit(
        args,
        alert,
        f"Acknowledged alert {alert['id']} ({alert['kind']}, "
        f"{_scope(alert['scope'], alert['scope_value'])}, {alert['model']}@{alert['version']}): "
        "not notified again; it still closes when its condition clears",
    )


def _silence_scope(text: str) -> tuple[str, str | None]:
    kind, sep, value = text.partition(":")
    kinds = ("device", "tag", "hardware_id", "region", "fleet")
    if kind not in kinds or (sep and not value) or (kind == "fleet" and value):
        raise CommandError(
            f"--scope {text!r}: give KIND or KIND:VALUE with KIND one of {', '.join(kinds)} "
            "(fleet has no value), e.g. device:pump-17"
        )
    return kind, value or None


def _describe_silence(s: dict[str, Any]) -> str:
    matchers = [f"scope {_scope(s['scope'], s['scope_value'])}"]
    if s.get("kind"):
        matchers.append(f"kind {s['kind']}")
    if s.get("model") or s.get("version"):
        matchers.append(f"model {s.get('model') or '*'}@{s.get('version') or '*'}")
    return ", ".join(matchers)


def cmd_alerts_silence(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"duration_s": args.duration, "reason": args.reason}
    if args.alert_id is not None:
        if args.scope or args.kind or args.model or args.version:
            raise CommandError("give an alert ID or --scope (with --kind, --model, --version)")
        body["alert_id"] = args.alert_id
    elif args.scope is None:
        raise CommandError("give an alert ID or --scope KIND[:VALUE] to silence")
    else:
        body["scope"], body["scope_value"] = _silence_scope(args.scope)
        body |= {"kind": args.kind, "model": args.model, "version": args.version}
    silence = _client(args).post("/silences", {k: v for k, v in body.items() if v is not None})
    _emit(
        args,
        silence,
        f"Silence {silence['id']} ({_describe_silence(silence)}) until "
        f"{_when(silence['ends_at'])} UTC; it matches {silence['matching']} open alerts",
    )


def cmd_alerts_silences(args: argparse.Namespace) -> None:
    silences = _client(args).get("/silences", state=args.state, limit=args.limit)["silences"]
    table = _table(
        ["ID", "ACTIVE", "MATCHES", "ENDS", "OPEN ALERTS", "BY", "REASON"],
        [
            [
                s["id"],
                "yes" if s["active"] else "no",
                _describe_silence(s),
                _when(s["ends_at"]),
                s["matching"],
                s["created_by"],
                s["reason"][:60],
            ]
            for s in silences
        ],
    )
    _emit(args, silences, table if silences else "No silences.")


def cmd_alerts_unsilence(args: argparse.Namespace) -> None:
    silence = _client(args).request("DELETE", f"/silences/{args.silence_id}")
    _emit(args, silence, f"Silence {silence['id']} ended ({_describe_silence(silence)})")


def _alert_commands(groups: Any, both: list[argparse.ArgumentParser]) -> None:
    """``fleetctl alerts``: the list with its filters; ack, silence, silences, unsilence."""
    raw = argparse.RawDescriptionHelpFormatter
    alerts = groups.add_parser(
        "alerts",
        parents=both,
        help="drift and accuracy alerts, one per scope and cause, newest first (server)",
        formatter_class=raw,
        epilog="examples:\n"
        "  fleetctl alerts --state open --device pump-17\n"
        "  fleetctl alerts --scope tag:line-a --kind drift --json\n"
        "  fleetctl alerts ack 42 --comment 'sensor replaced tomorrow'\n"
        "  fleetctl alerts silence --scope device:pump-17 --for 2h --reason maintenance",
    )
    alerts.add_argument(
        "--state",
        choices=["open", "closed", "acknowledged", "silenced"],
        help="open (all open ones), closed, acknowledged or silenced (open and so handled)",
    )
    alerts.add_argument("--kind", choices=["drift", "accuracy"], help="only this kind")
    alerts.add_argument(
        "--scope", help="a scope kind (tag) or one scope (tag:line-a, device:pump-17, fleet)"
    )
    alerts.add_argument("--device", help="only alerts of this device's own scope")
    alerts.add_argument("--model", help="only this model")
    alerts.add_argument("--version", help="only this model version")
    alerts.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    alerts.set_defaults(func=cmd_alerts)
    actions = alerts.add_subparsers(dest="action", metavar="ACTION", title="actions")

    p = actions.add_parser(
        "ack",
        parents=both,
        help="acknowledge an open alert: not notified again, still closed when it clears",
        formatter_class=raw,
        epilog="example:\n  fleetctl alerts ack 42 --comment 'on site at 14:00'",
    )
    p.add_argument("alert_id", type=int, metavar="ID", help="the alert's id (fleetctl alerts)")
    p.add_argument("--comment", help="why, or who is on it (shown with the alert, audited)")
    p.set_defaults(func=cmd_alerts_ack)

    p = actions.add_parser(
        "silence",
        parents=both,
        help="withhold the notifications of matching alerts for a while",
        formatter_class=raw,
        epilog="examples:\n"
        "  fleetctl alerts silence 42 --for 2h --reason 'recalibrating'\n"
        "  fleetctl alerts silence --scope tag:line-a --kind drift --for 1d --reason 'line moved'",
    )
    p.add_argument(
        "alert_id",
        type=int,
        nargs="?",
        metavar="ID",
        help="silence this alert's scope and cause (its kind, scope and model version)",
    )
    p.add_argument("--scope", help="KIND or KIND:VALUE: device:pump-17, tag:line-a, fleet")
    p.add_argument("--kind", choices=["drift", "accuracy"], help="only alerts of this kind")
    p.add_argument("--model", help="only alerts of this model")
    p.add_argument("--version", help="only alerts of this model version")
    p.add_argument(
        "--for",
        dest="duration",
        required=True,
        type=_duration,
        help="how long, e.g. 2h, 30m, 7d (ends on its own)",
    )
    p.add_argument("--reason", required=True, help="why (shown with the silence, audited)")
    p.set_defaults(func=cmd_alerts_silence)

    p = actions.add_parser(
        "silences",
        parents=both,
        help="list silences (active ones by default)",
        formatter_class=raw,
        epilog="example:\n  fleetctl alerts silences --state all",
    )
    p.add_argument(
        "--state",
        choices=["active", "expired", "all"],
        default="active",
        help="active (default), expired or all",
    )
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=cmd_alerts_silences)

    p = actions.add_parser(
        "unsilence",
        parents=both,
        help="end a silence now",
        formatter_class=raw,
        epilog="example:\n  fleetctl alerts unsilence 7",
    )
    p.add_argument("silence_id", type=int, metavar="SILENCE_ID", help="fleetctl alerts silences")
    p.set_defaults(func=cmd_alerts_unsilence)


# -- a device's windows ---------------------------------------------------------------

WINDOWS_PER_REQUEST = 1000


def cmd_devices_windows(args: argparse.Namespace) -> None:
    if args.limit < 1:
        raise CommandError("--limit must be at least 1")
    client = _client(args)
    windows: list[dict[str, Any]] = []
    before = None
    while len(windows) < args.limit:
        page = client.get(
            f"/devices/{path_segment(args.device)}/windows",
            since=args.since,
            until=args.until,
            model=args.model,
            version=args.version,
            limit=min(WINDOWS_PER_REQUEST, args.limit - len(windows)),
            before=before,
        )
        windows += page["windows"]
        before = page.get("next_before")
        if before is None:
            break
    if args.ids:
        sys.stdout.write("".join(f"{w['window_id']}\n" for w in windows))
        return
    table = _table(
        ["WINDOW", "START", "END", "MODEL", "REQUESTS", "ERRORS", "LABELLED"],
        [
            [
                w["window_id"],
                _when(w["start"]),
                _when(w["end"]),
                f"{w['model']}@{w['version']}",
                w["requests"],
                w["errors"],
                "yes" if w["labelled"] else "no",
            ]
            for w in windows
        ],
    )
    more = f"\n(more: --limit {args.limit * 2}, or an earlier --until)" if before else ""
    _emit(args, windows, (table + more) if windows else "No windows.")


def _window_commands(devices: Any, both: list[argparse.ArgumentParser]) -> None:
    """``fleetctl devices windows``: the window ids ``labels post`` needs."""
    p = devices.add_parser(
        "windows",
        parents=both,
        help="a device's windows, newest first: the ids to label (fleetctl labels post)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fleetctl devices windows pump-17 --since 2031-01-01T00:00:00Z --limit 20\n"
        "  fleetctl devices windows pump-17 --version 1.1.0 --json\n"
        "  fleetctl devices windows pump-17 --limit 1 --ids",
    )
    p.add_argument("device", help="the device's id")
    p.add_argument("--since", help="ISO time: windows that ended after it")
    p.add_argument("--until", help="ISO time: windows that ended at or before it")
    p.add_argument("--model", help="only windows of this model")
    p.add_argument("--version", help="only windows of this model version")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument(
        "--ids",
        action="store_true",
        help="print only the window ids, one a line (for scripts, such as a labels CSV)",
    )
    p.set_defaults(func=cmd_devices_windows)


# -- labels ------------------------------------------------------------------------

LABELS_PER_REQUEST = 1000


def read_labels_file(path: Path) -> list[dict[str, Any]]:
    """Per-window label bodies from a file.

    ``.json``: the API's body (or its list of windows); ``.csv``: columns
    ``window_id,actual,predicted`` (class names) and optionally ``count``.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{path} is not JSON: {exc}") from None
        windows = data.get("windows") if isinstance(data, dict) else data
        if not isinstance(windows, list):
            raise CommandError(f'{path} must hold {{"windows": [...]}} or a list of windows')
        return windows
    if path.suffix.lower() != ".csv":
        raise CommandError(
            f"{path}: give labels as .csv (window_id,actual,predicted[,count]) or .json"
        )
    reader = csv.DictReader(io.StringIO(text))
    needed = {"window_id", "actual", "predicted"}
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise CommandError(f"{path} needs a header with columns window_id,actual,predicted[,count]")
    by_window: dict[str, list[dict[str, Any]]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            count = int(row.get("count") or 1)
        except ValueError:
            raise CommandError(
                f"{path}:{line}: count {row['count']!r} is not a whole number"
            ) from None
        by_window.setdefault(row["window_id"], []).append(
            {"actual": row["actual"], "predicted": row["predicted"], "count": count}
        )
    return [{"window_id": w, "labels": labels} for w, labels in by_window.items()]


def cmd_labels_post(args: argparse.Namespace) -> None:
    windows = read_labels_file(Path(args.file))
    if not windows:
        raise CommandError(f"{args.file} holds no labels")
    client = _client(args)
    totals = {"stored": 0, "replaced": 0, "rows": 0, "correct": 0}
    for i in range(0, len(windows), LABELS_PER_REQUEST):
        result = client.post("/labels", {"windows": windows[i : i + LABELS_PER_REQUEST]})
        for key in totals:
            totals[key] += result[key]
    share = totals["correct"] / totals["rows"] if totals["rows"] else None
    _emit(
        args,
        totals,
        f"Labels of {totals['stored'] + totals['replaced']} windows stored "
        f"({totals['replaced']} replaced earlier ones): {totals['rows']} predictions, "
        f"{totals['correct']} right ({_percent(share)})",
    )


# -- broker ----------------------------------------------------------------------


def _read_secret(path: str, what: str) -> str:
    try:
        secret = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise CommandError(f"cannot read the {what} from {path}: {exc.strerror}") from None
    if not secret:
        raise CommandError(f"{path} is empty; it should hold the {what}")
    return secret


def _device_credential(text: str) -> tuple[str, str]:
    device_id, sep, path = text.partition(":")
    if not (sep and device_id and path):
        raise argparse.ArgumentTypeError(f"{text!r} is not DEVICE_ID:PASSWORD_FILE")
    return device_id, path


def cmd_broker_config(args: argparse.Namespace) -> None:
    devices: dict[str, str] = {}
    for device_id, path in args.device:
        if device_id in devices:
            raise CommandError(f"device {device_id} is given twice")
        devices[device_id] = _read_secret(path, f"password of device {device_id}")
    tls_files = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls_files) and not all(tls_files):
        raise CommandError("a TLS listener needs --tls-cert, --tls-key and --tls-ca together")
    tls = (
        BrokerTLS(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca), port=args.tls_port)
        if all(tls_files)
        else None
    )
    files = write_broker_config(
        Path(args.out),
        args.server_user,
        _read_secret(args.server_password_file, "server password"),
        devices,
        namespace=args.namespace,
        tls=tls,
        port=args.port,
        bind_address=args.bind,
    )
    listeners = [
        {"port": li.port, "address": li.address or "*", "tls": li.tls} for li in files.listeners
    ]
    where = ", ".join(
        f"{li['address']}:{li['port']}{' (TLS)' if li['tls'] else ''}" for li in listeners
    )
    count = f"{len(devices)} device{'' if len(devices) == 1 else 's'}"
    _emit(
        args,
        {
            "conf": str(files.conf),
            "passwd": str(files.passwd),
            "acl": str(files.acl),
            "server_user": args.server_user,
            "namespace": args.namespace,
            "devices": sorted(devices),
            "listeners": listeners,
        },
        f"Wrote {files.conf}, {files.passwd.name} and {files.acl.name} (mode 0600): server user "
        f"{args.server_user}, namespace {args.namespace}, {count}, listening on {where}\n"
        f"Run the broker with: mosquitto -c {files.conf}",
    )


# -- parser ----------------------------------------------------------------------


def _remote_flags() -> argparse.ArgumentParser:
    """``--server`` and the API token, for every command that talks to a fleet server."""
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", help="the fleet server's URL (default: $EDGEFLEET_SERVER)")
    remote.add_argument(
        "--token-file", help="file holding an API token (else --token-env, else $EDGEFLEET_TOKEN)"
    )
    remote.add_argument(
        "--token-env", help="environment variable holding an API token (default: EDGEFLEET_TOKEN)"
    )
    remote.add_argument(
        "--ca-file", help="CA bundle (PEM) to verify an https:// server (default: the system's)"
    )
    return remote


def _remote_commands(groups: Any, leaf: argparse.ArgumentParser, release: Any) -> None:
    """The commands that talk to a fleet server's REST API."""
    both = [leaf, _remote_flags()]

    p = release.add_parser(
        "push",
        parents=both,
        help="push a local image repository's new files to the server",
        epilog=_examples(
            "fleetctl release push --repo repo",
            "fleetctl release push --repo repo --server https://fleet.example "
            "--token-file operator.token --ca-file ca.pem",
        ),
    )
    p.add_argument("--repo", required=True, help="the local image repository (release add)")
    p.set_defaults(func=cmd_release_push)

    devices = groups.add_parser("devices", help="the device registry (server)").add_subparsers(
        dest="cmd", required=True
    )
    p = devices.add_parser(
        "list",
        parents=both,
        help="list devices",
        epilog=_examples(
            "fleetctl devices list",
            "fleetctl devices list --tag line-a --online",
            "fleetctl devices list --hardware rpi4-arm64 --json",
        ),
    )
    p.add_argument("--tag", help="only devices with this tag")
    p.add_argument("--hardware", help="only devices of this hardware id")
    state = p.add_mutually_exclusive_group()
    state.add_argument(
        "--online", dest="online", action="store_const", const=True, help="only devices online"
    )
    state.add_argument(
        "--offline", dest="online", action="store_const", const=False, help="only devices offline"
    )
    p.add_argument(
        "--all", action="store_true", help="list decommissioned devices too (hidden by default)"
    )
    p.set_defaults(func=cmd_devices_list)
    p = devices.add_parser(
        "show",
        parents=both,
        help="show one device",
        epilog=_examples("fleetctl devices show pump-17", "fleetctl devices show pump-17 --json"),
    )
    p.add_argument("device", help="the device's id")
    p.set_defaults(func=cmd_devices_show)
    p = devices.add_parser(
        "tag",
        parents=both,
        help="add or remove a device's tags",
        epilog=_examples(
            "fleetctl devices tag pump-17 --add canary",
            "fleetctl devices tag pump-17 --add line-b --remove line-a",
        ),
    )
    p.add_argument("device", help="the device's id")
    p.add_argument("--add", action="append", default=[], metavar="TAG", help="add TAG (repeatable)")
    p.add_argument(
        "--remove", action="append", default=[], metavar="TAG", help="remove TAG (repeatable)"
    )
    p.set_defaults(func=cmd_devices_tag)
    p = devices.add_parser(
        "register",
        parents=both,
        help="pre-register a device and show its password (admin)",
        epilog=_examples(
            "fleetctl devices register pump-17 --hardware rpi4-arm64",
            "fleetctl devices register pump-18 --hardware rpi4-arm64 --region eu-west "
            "--tag line-a --tag canary",
            "fleetctl devices register pump-19 --hardware rpi4-arm64 --out pump-19.pw",
        ),
    )
    p.add_argument("device", help="the new device's id (its MQTT and HTTP username)")
    p.add_argument("--out", metavar="FILE", help=_PASSWORD_OUT_HELP)
    p.add_argument("--hardware", required=True, help="the device's hardware id")
    p.add_argument("--region", help="the device's region, for drift by region")
    p.add_argument("--tag", action="append", default=[], help="a tag to give it (repeatable)")
    p.add_argument(
        "--reuse-decommissioned",
        action="store_true",
        help="register a new device under the id of a decommissioned one (refused otherwise); "
        "its history stays, the new device starts with nothing assigned",
    )
    p.set_defaults(func=cmd_devices_register)
    _window_commands(devices, both)
    p = devices.add_parser(
        "events",
        parents=both,
        help="a device's recent events",
        epilog=_examples(
            "fleetctl devices events pump-17", "fleetctl devices events pump-17 --limit 10"
        ),
    )
    p.add_argument("device", help="the device's id")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default %(default)s)")
    p.set_defaults(func=cmd_devices_events)
    _lifecycle_commands(devices, release, both)

    tokens = groups.add_parser(
        "provisioning-token", help="tokens devices enrol with (server, admin)"
    ).add_subparsers(dest="cmd", required=True)
    p = tokens.add_parser(
        "create",
        parents=both,
        help="create a provisioning token",
        epilog=_examples(
            "fleetctl provisioning-token create --hardware rpi4-arm64 --uses 100",
            "fleetctl provisioning-token create --tag line-a --uses 10 --ttl 12h",
            "fleetctl provisioning-token create --hardware rpi4-arm64 --uses 10 "
            "--out provisioning-token",
        ),
    )
    p.add_argument("--hardware", help="enrol only devices of this hardware id")
    p.add_argument("--tag", action="append", default=[], help="tag enrolled devices (repeatable)")
    p.add_argument(
        "--uses", type=int, default=1, help="how many devices may enrol with it (default 1)"
    )
    p.add_argument(
        "--ttl",
        type=_duration,
        default=7 * 86400,
        help="lifetime: seconds, or 30m, 12h, 7d (default 7d)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write only the token to FILE, readable by its owner only (mode 0600), for a "
        "device's [enrolment] token_file (default: print it)",
    )
    p.set_defaults(func=cmd_provisioning_token_create)

    director = groups.add_parser("director", help="the server's director (Uptane)").add_subparsers(
        dest="cmd", required=True
    )
    p = director.add_parser(
        "root",
        parents=both,
        help="the director's root.json, which devices are provisioned with ([director] root)",
        epilog=_examples(
            "fleetctl director root --out /etc/edgefleet/director-root.json",
            "fleetctl director root",
        ),
    )
    p.add_argument(
        "--out", metavar="FILE", help="write it to FILE (default: print it on standard output)"
    )
    p.set_defaults(func=cmd_director_root)

    p = groups.add_parser(
        "assign",
        parents=both,
        help="assign a released bundle to devices or a tag (server)",
        epilog=_examples(
            "fleetctl assign pump-health@1.1.0 --tag canary",
            "fleetctl assign pump-health@1.1.0 --device pump-17 --device pump-18",
        ),
    )
    p.add_argument("release", help="NAME@VERSION or the bundle's target path")
    p.add_argument("--device", action="append", default=[], help="device id (repeatable)")
    p.add_argument("--tag", help="every device with this tag")
    p.set_defaults(func=cmd_assign)
    _assignment_commands(groups, both)

    audit = groups.add_parser("audit", help="the audit log (server)").add_subparsers(
        dest="cmd", required=True
    )
    p = audit.add_parser(
        "list",
        parents=both,
        help="a page of the audit log, oldest first",
        epilog=_examples(
            "fleetctl audit list",
            "fleetctl audit list --after 100 --limit 50",
            "fleetctl audit list --action assignment.create --json",
        ),
    )
    p.add_argument("--after", type=int, default=0, help="entries after this sequence number")
    p.add_argument(
        "--limit", type=int, default=100, help="at most this many entries (default %(default)s)"
    )
    p.add_argument("--action", help="only this action, e.g. assignment.create")
    p.set_defaults(func=cmd_audit_list)
    p = audit.add_parser(
        "verify",
        parents=both,
        help="check the hash chain (and with --anchor, that it extends a saved head); "
        "exit 1 if an entry was changed or deleted",
        epilog=_examples(
            "fleetctl audit verify", "fleetctl audit verify --anchor /backup/audit-head.json"
        ),
    )
    p.add_argument(
        "--anchor",
        metavar="FILE",
        help="a head saved by 'audit head --out': check here, entry by entry, that the log "
        "still holds it (finds deleted newest entries and a re-hashed chain)",
    )
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser(
        "head",
        parents=both,
        help="the log's newest entry signed by the server's audit key; --out saves it as an anchor",
        epilog=_examples(
            "fleetctl audit head", "fleetctl audit head --out /backup/audit-head.json"
        ),
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="save the signed head here (kept where the server cannot write); an existing FILE "
        "is replaced only if the log still extends it",
    )
    p.set_defaults(func=cmd_audit_head)

    api_tokens = groups.add_parser("tokens", help="API tokens (server, admin)").add_subparsers(
        dest="cmd", required=True
    )
    p = api_tokens.add_parser(
        "create",
        parents=both,
        help="create an API token",
        epilog=_examples(
            "fleetctl tokens create --name ci --role operator",
            "fleetctl tokens create --name dashboard --role viewer --json",
        ),
    )
    p.add_argument("--name", required=True, help="what the token is for, shown in the audit log")
    p.add_argument(
        "--role",
        required=True,
        choices=["viewer", "operator", "admin"],
        help="viewer reads; operator releases and assigns; admin also manages tokens and devices",
    )
    p.set_defaults(func=cmd_tokens_create)
    p = api_tokens.add_parser(
        "list",
        parents=both,
        help="list API tokens",
        epilog=_examples("fleetctl tokens list", "fleetctl tokens list --json"),
    )
    p.set_defaults(func=cmd_tokens_list)
    p = api_tokens.add_parser(
        "revoke",
        parents=both,
        help="revoke an API token",
        epilog=_examples("fleetctl tokens revoke 3f9a1c0d5e7b2a64"),
    )
    p.add_argument("token_id", help="the token's id (the ID column of tokens list)")
    p.set_defaults(func=cmd_tokens_revoke)

    p = groups.add_parser(
        "drift",
        parents=both,
        help="drift per feature and estimated accuracy of a device, a cohort or the fleet (server)",
        epilog=_examples(
            "fleetctl drift --device pump-17",
            "fleetctl drift --tag canary --model pump-health --version 1.1.0",
            "fleetctl drift --fleet --since 2026-12-01T00:00:00Z --until 2026-12-02T00:00:00Z",
        ),
    )
    p.add_argument("--device", help="one device")
    p.add_argument("--tag", help="every device with this tag")
    p.add_argument("--hardware", help="every device of this hardware id")
    p.add_argument("--region", help="every device in this region")
    p.add_argument("--fleet", action="store_true", help="every device")
    p.add_argument("--model", help="only this model")
    p.add_argument("--version", help="only this model version")
    p.add_argument(
        "--since", help="windows that ended from this ISO time on (default: an hour before --until)"
    )
    p.add_argument("--until", help="windows that ended up to this ISO time (default: now)")
    p.set_defaults(func=cmd_drift)

    _alert_commands(groups, both)

    labels = groups.add_parser(
        "labels", help="labels that arrived later, per window (server)"
    ).add_subparsers(dest="cmd", required=True)
    p = labels.add_parser(
        "post",
        parents=both,
        help="post labels: .csv window_id,actual,predicted[,count] or the API's .json body",
        epilog=_examples("fleetctl labels post labels.csv", "fleetctl labels post labels.json"),
    )
    p.add_argument("file", help=".csv with a header window_id,actual,predicted[,count], or .json")
    p.set_defaults(func=cmd_labels_post)


def _lifecycle_commands(devices: Any, release: Any, both: list[argparse.ArgumentParser]) -> None:
    """Decommissioning devices, rotating their credentials, yanking releases (server)."""
    p = devices.add_parser(
        "decommission",
        parents=both,
        help="take a device out of the fleet: its credentials stop working, its history stays "
        "(admin)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples("fleetctl devices decommission pump-17 --reason 'returned for repair'"),
    )
    p.add_argument("device", help="the device id")
    p.add_argument("--reason", help="why, kept with the device and in the audit log")
    p.set_defaults(func=cmd_devices_decommission)
    p = devices.add_parser(
        "rotate-credentials",
        parents=both,
        help="give a device a new password, shown once; the old one stops working at once (admin)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "fleetctl devices rotate-credentials pump-17",
            "fleetctl devices rotate-credentials pump-17 --out pump-17.pw",
        ),
    )
    p.add_argument("device", help="the device id")
    p.add_argument("--out", metavar="FILE", help=_PASSWORD_OUT_HELP)
    p.set_defaults(func=cmd_devices_rotate_credentials)
    p = release.add_parser(
        "yank",
        parents=both,
        help="stop offering a release to devices not running it yet (not a rollback)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "fleetctl release yank pump-health@1.2.0 --reason 'false alarms on line B'"
        ),
    )
    p.add_argument("release", help="NAME@VERSION or the bundle's target path")
    p.add_argument(
        "--reason", required=True, help="why, shown by release list and in refusals to assign it"
    )
    p.set_defaults(func=cmd_release_yank)


def _assignment_commands(groups: Any, both: list[argparse.ArgumentParser]) -> None:
    """``assignments list|cancel`` and ``unassign``."""
    assignments = groups.add_parser(
        "assignments", help="list and cancel assignments and tag rules (server)"
    ).add_subparsers(dest="cmd", required=True)
    p = assignments.add_parser(
        "list",
        parents=both,
        help="current assignments: each device's (dev-N) and the tag rules (tag-N)",
        epilog=_examples("fleetctl assignments list --tag canary --name pump-health"),
    )
    p.add_argument("--device", help="only this device's assignment and the rules of its tags")
    p.add_argument("--tag", help="only this tag's rules and its devices' assignments")
    p.add_argument("--name", help="only assignments of this bundle name")
    p.add_argument("--cancelled", action="store_true", help="list cancelled ones too")
    p.set_defaults(func=cmd_assignments_list)
    p = assignments.add_parser(
        "cancel",
        parents=both,
        help="cancel an assignment or tag rule; devices keep what they run (operator)",
        epilog=_examples("fleetctl assignments cancel tag-3"),
    )
    p.add_argument("id", help="dev-N or tag-N, as assignments list shows")
    p.set_defaults(func=cmd_assignments_cancel)
    p = groups.add_parser(
        "unassign",
        parents=both,
        help="cancel a device's assignment or a tag's rules; devices keep what they run",
        epilog=_examples("fleetctl unassign --device pump-17", "fleetctl unassign --tag canary"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", help="cancel this device's current assignment")
    p.add_argument("--tag", help="cancel every active rule of this tag")
    p.set_defaults(func=cmd_unassign)


def _passphrase_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passphrase-file", help="file holding the release keys' passphrase")
    parser.add_argument(
        "--passphrase-env",
        help="environment variable holding the release keys' passphrase (without either, "
        "encrypted keys ask for it on a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fleetctl",
        description=__doc__.splitlines()[0].replace("``", ""),
        epilog="Commands marked (server) talk to a fleet server: --server URL or "
        "EDGEFLEET_SERVER,\nand an API token from --token-file, --token-env VAR or "
        "EDGEFLEET_TOKEN.\nEach command's --help shows its options and examples.\n\n"
        + _examples(
            "fleetctl keys init --dir keys",
            "fleetctl devices list --server http://127.0.0.1:8080",
        ),
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--version", action="version", version=f"%(prog)s {edgefleet_version()}")
    # Leaf commands accept --json too; SUPPRESS keeps a top-level --json from being reset.
    leaf = argparse.ArgumentParser(add_help=False)
    leaf.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    # Not required: ``fleetctl`` alone prints the groups (main) rather than "required: group".
    groups = parser.add_subparsers(dest="group", title="commands", metavar="COMMAND")

    keys = groups.add_parser("keys", help="release keys").add_subparsers(dest="cmd", required=True)
    p = keys.add_parser(
        "init",
        parents=[leaf],
        help="create Ed25519 keys for every TUF role",
        epilog="With --passphrase-file or --passphrase-env the keys are encrypted with that "
        "passphrase.\n\n"
        + _examples(
            "fleetctl keys init --dir keys",
            "fleetctl keys init --dir keys --threshold 2 --passphrase-env RELEASE_PASS",
        ),
    )
    p.add_argument("--dir", required=True, help="a new folder for the keys")
    p.add_argument(
        "--threshold",
        type=int,
        default=1,
        help="keys and signatures needed for root and targets (default 1)",
    )
    _passphrase_flags(p)
    p.set_defaults(func=cmd_keys_init)

    bundle = groups.add_parser("bundle", help="model bundles").add_subparsers(
        dest="cmd", required=True
    )
    p = bundle.add_parser(
        "build",
        parents=[leaf],
        help="build a bundle from a .tflite model and baseline data",
        epilog=_examples(
            "fleetctl bundle build firmware_images/models/v1.tflite --name pump-health "
            "--version 1.0.0 --hardware rpi4-arm64 --baseline firmware_images/models/baseline.npy "
            "--out bundles/",
            "fleetctl bundle build firmware_images/models/v2.tflite --name pump-health "
            "--version 1.1.0 --hardware rpi4-arm64 --baseline firmware_images/models/baseline.npy "
            "--features firmware_images/models/features.json "
            "--calibration firmware_images/models/heldout.npz --out bundles/",
        ),
    )
    p.add_argument("model", help="the .tflite model file")
    p.add_argument("--name", required=True, help="the model's name, e.g. pump-health")
    p.add_argument("--version", required=True, help="the bundle's semantic version, e.g. 1.1.0")
    p.add_argument("--hardware", action="append", required=True, help="hardware id (repeatable)")
    p.add_argument("--baseline", required=True, help=".npy, .npz or .csv baseline data")
    p.add_argument("--out", required=True, help="bundle file or directory")
    p.add_argument(
        "--calibration",
        help=".npz of labelled reference rows (inputs and 'labels') the model was not trained "
        "on, for estimating accuracy without labels in the field",
    )
    p.add_argument("--features", help="JSON: feature names, units, valid ranges, classes")
    p.add_argument("--classes", help="comma-separated class labels of the score output")
    p.add_argument(
        "--release-counter",
        type=int,
        help="the counter devices compare to refuse rollbacks (default: derived from the version)",
    )
    p.add_argument(
        "--min-agent-version",
        default="0.1.0",
        help="oldest agent that may install it (default %(default)s)",
    )
    p.add_argument("--description", default="", help="a free-form description for people")
    p.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.6,
        help="top score below which a request goes to the next fallback stage (default "
        "%(default)s)",
    )
    p.add_argument(
        "--safe-default",
        help='JSON or a JSON file: {"output": [values]}, the answer when every stage fails',
    )
    p.add_argument(
        "--max-latency-ms",
        type=float,
        default=100.0,
        help="self-test latency budget in milliseconds (default %(default)s)",
    )
    p.add_argument(
        "--max-memory-mb",
        type=float,
        default=64.0,
        help="self-test memory budget in MB (default %(default)s)",
    )
    p.set_defaults(func=cmd_bundle_build)
    p = bundle.add_parser(
        "inspect",
        parents=[leaf],
        help="show a bundle's manifest",
        epilog=_examples(
            "fleetctl bundle inspect bundles/pump-health-1.1.0.bundle",
            "fleetctl bundle inspect bundles/pump-health-1.1.0.bundle --json",
        ),
    )
    p.add_argument("bundle", help="the .bundle file")
    p.set_defaults(func=cmd_bundle_inspect)

    release = groups.add_parser("release", help="the image repository").add_subparsers(
        dest="cmd", required=True
    )
    p = release.add_parser(
        "add",
        parents=[leaf],
        help="sign a bundle into the image repository",
        epilog="The first release creates the repository, in a folder that exists; devices are\n"
        "provisioned with its REPO/metadata/1.root.json. To roll back to an old model,\n"
        "release it again above the current counter with --re-release-of.\n\n"
        + _examples(
            "fleetctl release add bundles/pump-health-1.1.0.bundle --repo repo --keys keys",
            "fleetctl release add bundles/pump-health-1.1.0.bundle --repo repo --keys keys "
            "--passphrase-env RELEASE_PASS",
            "fleetctl release add --re-release-of pump-health@1.1.0 --repo repo --keys keys",
        ),
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
    _passphrase_flags(p)
    p.set_defaults(func=cmd_release_add)
    p = release.add_parser(
        "list",
        parents=[leaf, _remote_flags()],
        help="list released bundles (local or server)",
        epilog=_examples(
            "fleetctl release list --repo repo",
            "fleetctl release list --server http://127.0.0.1:8080 --json",
        ),
    )
    p.add_argument("--repo", help="a local image repository (else: --server)")
    p.set_defaults(func=cmd_release_list)
    p = release.add_parser(
        "timestamp",
        parents=[leaf],
        help="re-sign the timestamp before it expires",
        epilog=_examples(
            "fleetctl release timestamp --repo repo --keys keys",
            "fleetctl release timestamp --repo repo --keys keys --passphrase-file release.pass",
        ),
    )
    p.add_argument("--repo", required=True, help="the image repository's folder")
    p.add_argument("--keys", required=True, help="the release keys' folder")
    _passphrase_flags(p)
    p.set_defaults(func=cmd_release_timestamp)
    _remote_commands(groups, leaf, release)

    broker = groups.add_parser("broker", help="the MQTT broker (Mosquitto 2)").add_subparsers(
        dest="cmd", required=True
    )
    p = broker.add_parser(
        "config",
        parents=[leaf],
        help="write mosquitto.conf, passwd and acl confining each device to its own topics",
        epilog=_examples(
            "fleetctl broker config --out broker/ --server-user fleet --server-password-file "
            "server.pw --namespace fleet-3c5a0e9d21b7 --device pump-17:pump-17.pw",
            "fleetctl broker config --out broker/ --server-user fleet --server-password-file "
            "server.pw --namespace plant-7 --device pump-17:pump-17.pw --tls-cert broker.pem "
            "--tls-key broker.key --tls-ca ca.pem",
        ),
    )
    p.add_argument("--out", required=True, help="directory for mosquitto.conf, passwd and acl")
    p.add_argument("--server-user", required=True, help="the fleet server's MQTT username")
    p.add_argument(
        "--namespace",
        required=True,
        help="the deployment's MQTT topic namespace (fleet-server logs it at start, and "
        "fleetctl devices register shows it)",
    )
    p.add_argument(
        "--server-password-file", required=True, help="file holding the server's MQTT password"
    )
    p.add_argument(
        "--device",
        type=_device_credential,
        action="append",
        default=[],
        metavar="ID:PASSWORD_FILE",
        help="a device and the file holding its MQTT password (repeatable)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"plain MQTT listener (default {DEFAULT_PORT}; on 127.0.0.1 only when TLS is on)",
    )
    p.add_argument("--bind", help="address the network-facing listener binds (default: all)")
    p.add_argument("--tls-cert", help="the broker's certificate chain (PEM)")
    p.add_argument("--tls-key", help="the broker's private key (PEM)")
    p.add_argument("--tls-ca", help="the CA devices trust (PEM)")
    p.add_argument(
        "--tls-port",
        type=int,
        default=DEFAULT_TLS_PORT,
        help=f"TLS listener (default {DEFAULT_TLS_PORT})",
    )
    p.set_defaults(func=cmd_broker_config)
    return parser


USER_ERRORS = (
    CommandError,
    ApiClientError,
    BundleBuildError,
    BundleFormatError,
    KeyStoreError,
    RepositoryError,
    ValueError,
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.group is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args.func(args)
        # Written here, inside the handler, so a closed pipe is not found at exit instead.
        sys.stdout.flush()
    except BrokenPipeError:  # first: it is an OSError, which a user error may one day include
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except USER_ERRORS as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
