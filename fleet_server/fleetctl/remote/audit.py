"""``fleetctl audit``: the hash-chained audit log, its signed head and anchors."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fleet_server.api.client import ApiClient
from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.files import write_file
from fleet_server.fleetctl.remote.client import api_client
from fleet_server.fleetctl.render import emit, text_table, when
from protocol.api.audit import SignedAuditHead

if TYPE_CHECKING:
    from fleet_server.audit import ChainReport


def cmd_audit_list(args: argparse.Namespace) -> None:
    page = api_client(args).get("/audit", after=args.after, limit=args.limit, action=args.action)
    entries = page["entries"]
    table = text_table(
        ["SEQ", "AT", "ACTOR", "ACTION", "SUBJECT"],
        [[e["seq"], when(e["at"]), e["actor"], e["action"], e["subject"]] for e in entries],
    )
    human = table if entries else "No audit entries."
    if page["next_after"] is not None:
        human += f"\nMore: --after {page['next_after']}"
    emit(args, page, human)


def _verified_head(data: Any, where: str) -> SignedAuditHead:
    """A signed audit head from ``where`` whose signature verifies under the key it carries."""
    try:
        signed = SignedAuditHead.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "the head"
        raise CommandError(f"{where} is not a signed audit head: {field}: {err['msg']}") from None
    # Imported here: the audit package brings the server's database layer, which every
    # other fleetctl command would otherwise load at start for nothing.
    from fleet_server.audit import head_signature_problem

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
    from fleet_server.audit import ChainCheck, anchor_of

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
    client = api_client(args)
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
        write_file(out, signed.model_dump_json(indent=2) + "\n", what=f"the anchor {args.out}")
        lines.append(f"Saved to {args.out}; check later with: fleetctl audit verify --anchor FILE")
    emit(args, signed.model_dump(mode="json"), "\n".join(lines))


def cmd_audit_verify(args: argparse.Namespace) -> None:
    if args.anchor:
        client = api_client(args)
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
            emit(
                args,
                data,
                f"Audit log intact: {checked.entries} entries, hash chain verified, and it "
                f"extends the anchor ({_head_line(anchor)}).",
            )
            return
        emit(
            args,
            data,
            f"Audit log BROKEN at entry {checked.broken_at}: {checked.problem} "
            f"(checked {checked.entries} entries against {args.anchor}).",
        )
        raise CommandError(
            f"the audit log does not extend the anchor {args.anchor}: "
            f"broken at entry {checked.broken_at}"
        )
    report = api_client(args).get("/audit/verify")
    if report["ok"]:
        emit(
            args,
            report,
            f"Audit log intact: {report['entries']} entries, hash chain verified "
            "(and it extends the last head the server recorded).",
        )
        return
    if report["broken_at"] is None:  # the server's head record itself is in doubt
        emit(args, report, f"Audit log NOT VERIFIED: {report['problem']}.")
        raise CommandError(f"the audit log cannot be verified: {report['problem']}")
    emit(
        args,
        report,
        f"Audit log BROKEN at entry {report['broken_at']}: {report['problem']} "
        f"(checked {report['entries']} entries).",
    )
    raise CommandError(f"the audit log's hash chain is broken at entry {report['broken_at']}")


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``audit list|verify|head``."""
    audit = add_group(groups, "audit", "the audit log (server)")
    p = add_command(
        audit,
        "list",
        cmd_audit_list,
        parents,
        "a page of the audit log, oldest first",
        "fleetctl audit list",
        "fleetctl audit list --after 100 --limit 50",
        "fleetctl audit list --action assignment.create --json",
    )
    p.add_argument("--after", type=int, default=0, help="entries after this sequence number")
    p.add_argument(
        "--limit", type=int, default=100, help="at most this many entries (default %(default)s)"
    )
    p.add_argument("--action", help="only this action, e.g. assignment.create")
    p = add_command(
        audit,
        "verify",
        cmd_audit_verify,
        parents,
        "check the hash chain (and with --anchor, that it extends a saved head); "
        "exit 1 if an entry was changed or deleted",
        "fleetctl audit verify",
        "fleetctl audit verify --anchor /backup/audit-head.json",
    )
    p.add_argument(
        "--anchor",
        metavar="FILE",
        help="a head saved by 'audit head --out': check here, entry by entry, that the log "
        "still holds it (finds deleted newest entries and a re-hashed chain)",
    )
    p = add_command(
        audit,
        "head",
        cmd_audit_head,
        parents,
        "the log's newest entry signed by the server's audit key; --out saves it as an anchor",
        "fleetctl audit head",
        "fleetctl audit head --out /backup/audit-head.json",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="save the signed head here (kept where the server cannot write); an existing FILE "
        "is replaced only if the log still extends it",
    )
