"""Anchoring the audit log's head: a saved, signed head finds what the chain alone cannot.

Against a real server on SQLite and PostgreSQL, with ``fleetctl``: the newest
entries deleted, an entry rewritten with every later hash recomputed, and an
anchor signed by another key are each reported precisely, with exit status 1.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, func, select, update

from fleet_server.audit import (
    AUDIT_HEAD_FILE,
    AUDIT_KEY_FILE,
    AuditSigner,
    entry_hash,
    head_signature_problem,
)
from fleet_server.db.models import AuditEntry
from protocol.api.audit import SignedAuditHead
from testbed.api_server import ServerThread
from testbed.images import HARDWARE
from testbed.server_process import ServerProcess, wait_until
from tests.support.databases import DATABASES, database_url
from tests.support.fleetctl import Fleetctl, Result

pytestmark = pytest.mark.integration

SHARED_BROKER = "mqtt://127.0.0.1:1883"  # isolated by the server's own namespace


@dataclass
class Audited(Fleetctl):
    devices: int = 0

    def fleetctl(self, *args: str) -> Result:
        result = self.run(*args)
        if result.code != 0:  # every refusal is one line, never a traceback
            assert result.err.startswith("fleetctl: ") and result.err.count("\n") == 1, result.err
        return result

    def register(self, n: int = 1) -> None:
        for _ in range(n):
            self.devices += 1
            r = self.api.request(
                "POST",
                "/api/v1/devices",
                token=self.api.admin_token,
                json={"device_id": f"anchored-{self.devices}", "hardware_id": HARDWARE},
            )
            assert r.status == 201, r.data

    def forget_head_record(self) -> None:
        (self.api.config.data_dir / AUDIT_HEAD_FILE).unlink()

    def newest_seq(self) -> int:
        async def newest() -> int:
            async with self.api.server.db.session() as s:
                return int(await s.scalar(select(func.max(AuditEntry.seq))) or 0)

        return self.api.call(newest())

    def delete_after(self, seq: int) -> None:
        async def run() -> None:
            async with self.api.server.db.session() as s:
                await s.execute(delete(AuditEntry).where(AuditEntry.seq > seq))

        self.api.call(run())

    def rewrite_and_rehash(self, seq: int, subject: str) -> None:
        """Change entry ``seq``'s subject and recompute its hash and every later one."""

        async def run() -> None:
            async with self.api.server.db.session() as s:
                entries = list((await s.scalars(select(AuditEntry).order_by(AuditEntry.seq))).all())
                prev = None
                for e in entries:
                    if e.seq < seq:
                        prev = e.hash
                        continue
                    assert prev is not None
                    new_subject = subject if e.seq == seq else e.subject
                    h = entry_hash(prev, e.at, e.actor, e.action, new_subject, e.details)
                    await s.execute(
                        update(AuditEntry)
                        .where(AuditEntry.seq == e.seq)
                        .values(subject=new_subject, prev_hash=prev, hash=h)
                    )
                    prev = h

        self.api.call(run())


@pytest.fixture(params=DATABASES)
def audited(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Audited]:
    with database_url(request.param, tmp_path) as url:
        api = ServerThread(tmp_path / "server", url)
        try:
            a = Audited(api, tmp_path, capsys)
            a.register(4)
            yield a
        finally:
            api.close()


def test_the_head_is_signed_with_the_key_in_the_data_folder_for_viewers(
    audited: Audited,
) -> None:
    api = audited.api
    assert api.request("GET", "/api/v1/audit/head").status == 401
    r = api.request(
        "POST", "/api/v1/tokens", token=api.admin_token, json={"name": "v", "role": "viewer"}
    )
    viewer = json.loads(r.data)["token"]
    r = api.request("GET", "/api/v1/audit/head", token=viewer)
    assert r.status == 200, r.data
    signed = SignedAuditHead.model_validate_json(r.data)
    assert head_signature_problem(signed) is None
    assert signed.head.seq == audited.newest_seq()
    key_file = api.config.data_dir / AUDIT_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert signed.head.key_id == AuditSigner.in_folder(api.config.data_dir).key_id
    again = SignedAuditHead.model_validate_json(
        api.request("GET", "/api/v1/audit/head", token=viewer).data
    )
    assert again.head.key_id == signed.head.key_id


def test_a_saved_anchor_holds_while_the_log_grows(audited: Audited) -> None:
    anchor = audited.tmp / "anchor.json"
    saved = audited.fleetctl("audit", "head", "--out", str(anchor))
    assert saved.code == 0 and f"entry {audited.newest_seq()}" in saved.out
    audited.register(3)
    checked = audited.fleetctl("audit", "verify", "--anchor", str(anchor))
    assert checked.code == 0, checked
    assert "intact" in checked.out and "extends the anchor" in checked.out
    # Saving again replaces it: the log extends the previous anchor.
    assert audited.fleetctl("audit", "head", "--out", str(anchor)).code == 0
    assert json.loads(anchor.read_text())["head"]["seq"] == audited.newest_seq()


def test_deleting_the_newest_entries_is_reported(audited: Audited) -> None:
    anchor = audited.tmp / "anchor.json"
    assert audited.fleetctl("audit", "head", "--out", str(anchor)).code == 0
    newest = audited.newest_seq()
    audited.delete_after(newest - 2)
    # The server's own record of the head it handed out finds it...
    plain = audited.fleetctl("audit", "verify")
    assert plain.code == 1 and "were deleted" in plain.out, plain
    # ...until someone who can also write the server's data folder removes that record:
    # then the chain alone holds (that is the hole), and only a saved anchor finds it.
    audited.forget_head_record()
    assert audited.fleetctl("audit", "verify").code == 0
    checked = audited.fleetctl("audit", "verify", "--anchor", str(anchor), "--json")
    assert checked.code == 1
    report = json.loads(checked.out)
    assert (report["ok"], report["broken_at"]) == (False, newest - 1)
    assert f"ends at entry {newest - 2}" in report["problem"]
    assert f"names entry {newest}" in report["problem"] and "were deleted" in report["problem"]
    assert str(anchor) in checked.err
    # New entries after the deletion do not hide it.
    audited.register(3)
    checked = audited.fleetctl("audit", "verify", "--anchor", str(anchor))
    assert checked.code == 1 and "deleted" in checked.out, checked.out
    assert f"entry {newest}" in checked.out


def test_a_rewritten_entry_with_a_rehashed_chain_is_reported(audited: Audited) -> None:
    anchor = audited.tmp / "anchor.json"
    assert audited.fleetctl("audit", "head", "--out", str(anchor)).code == 0
    newest = audited.newest_seq()
    audited.rewrite_and_rehash(newest - 2, "forged")
    plain = audited.fleetctl("audit", "verify", "--json")
    assert plain.code == 1 and "rewritten" in json.loads(plain.out)["problem"]
    audited.forget_head_record()
    assert audited.fleetctl("audit", "verify").code == 0  # the chain alone holds
    checked = audited.fleetctl("audit", "verify", "--anchor", str(anchor), "--json")
    assert checked.code == 1
    report = json.loads(checked.out)
    assert report["broken_at"] == newest and "rewritten" in report["problem"]


def test_a_head_signed_by_another_key_or_altered_is_refused(audited: Audited) -> None:
    anchor = audited.tmp / "anchor.json"
    assert audited.fleetctl("audit", "head", "--out", str(anchor)).code == 0
    genuine = SignedAuditHead.model_validate_json(anchor.read_text())

    other = AuditSigner(Ed25519PrivateKey.generate())
    forged = audited.tmp / "forged.json"
    forged.write_text(
        other.sign(genuine.head.model_copy(update={"key_id": other.key_id})).model_dump_json()
    )
    checked = audited.fleetctl("audit", "verify", "--anchor", str(forged))
    assert checked.code == 1
    assert f"signed by audit key {other.key_id[:16]}" in checked.err
    assert f"this server signs with {genuine.head.key_id[:16]}" in checked.err

    altered = audited.tmp / "altered.json"
    data: dict[str, Any] = json.loads(anchor.read_text())
    data["head"]["seq"] -= 1
    altered.write_text(json.dumps(data))
    checked = audited.fleetctl("audit", "verify", "--anchor", str(altered))
    assert checked.code == 1 and "signature does not verify" in checked.err

    broken = audited.tmp / "broken.json"
    broken.write_text('{"head": {}}')
    checked = audited.fleetctl("audit", "verify", "--anchor", str(broken))
    assert checked.code == 1 and "not a signed audit head" in checked.err
    missing = audited.fleetctl("audit", "verify", "--anchor", str(audited.tmp / "nope.json"))
    assert missing.code == 1 and "cannot read the anchor" in missing.err


def test_saving_a_head_never_replaces_an_anchor_the_log_no_longer_extends(
    audited: Audited,
) -> None:
    anchor = audited.tmp / "anchor.json"
    assert audited.fleetctl("audit", "head", "--out", str(anchor)).code == 0
    before = anchor.read_text()
    audited.delete_after(audited.newest_seq() - 1)
    refused = audited.fleetctl("audit", "head", "--out", str(anchor))
    assert refused.code == 1 and "not replacing" in refused.err and "deleted" in refused.err
    assert anchor.read_text() == before


def test_an_unreadable_audit_key_is_a_503_naming_it_never_a_new_key(audited: Audited) -> None:
    key_file = audited.api.config.data_dir / AUDIT_KEY_FILE
    key_file.write_text("not a key\n")
    r = audited.api.request("GET", "/api/v1/audit/head", token=audited.api.admin_token)
    assert r.status == 503 and b"audit key is unavailable" in r.data
    assert key_file.read_text() == "not a key\n"  # left for the operator to restore
    refused = audited.fleetctl("audit", "head")
    assert refused.code == 1 and "(503)" in refused.err


def test_a_forged_or_foreign_head_record_on_the_server_is_reported(audited: Audited) -> None:
    assert audited.fleetctl("audit", "verify").code == 0
    record = audited.api.config.data_dir / AUDIT_HEAD_FILE
    genuine = SignedAuditHead.model_validate_json(record.read_text())
    other = AuditSigner(Ed25519PrivateKey.generate())
    record.write_text(
        other.sign(genuine.head.model_copy(update={"key_id": other.key_id})).model_dump_json()
    )
    refused = audited.fleetctl("audit", "verify", "--json")
    assert refused.code == 1
    report = json.loads(refused.out)
    assert report["ok"] is False and "another key" in report["problem"]
    record.write_text("{}")
    refused = audited.fleetctl("audit", "verify")
    assert refused.code == 1 and "cannot be read" in refused.err
    assert record.read_text() == "{}"  # left as evidence


def _gauge(server: ServerProcess, name: str) -> float | None:
    r = server.http.request("GET", f"{server.url}/metrics")
    for family in text_string_to_metric_families(r.data.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def test_the_server_records_its_head_itself_so_a_tail_deleted_in_the_database_is_found(
    tmp_path: Path,
) -> None:
    # Nobody asks for the head here: the server's own periodic record (at start, every
    # interval, at a clean stop) is what finds entries deleted while it was down.
    server = ServerProcess(
        tmp_path, db_url=None, broker=SHARED_BROKER, replica_id=f"anchor-{secrets.token_hex(3)}"
    )
    server.start()
    try:
        token = server.admin_token()
        for i in range(4):
            server.api("POST", "/devices", token, {"device_id": f"a-{i}", "hardware_id": HARDWARE})
        assert _gauge(server, "edgefleet_audit_chain_intact") == 1
    finally:
        server.stop()
    assert (server.data / AUDIT_HEAD_FILE).exists()
    with sqlite3.connect(server.data / "fleet.db") as db:
        (newest,) = db.execute("SELECT max(seq) FROM audit_log").fetchone()
        db.execute("DELETE FROM audit_log WHERE seq > ?", (newest - 2,))
    server.start()
    try:
        wait_until(
            "the server to find the deleted tail",
            lambda: _gauge(server, "edgefleet_audit_chain_intact") == 0,
        )
        assert "audit log broken" in server.log()
        report = server.api("GET", "/audit/verify", server.admin_token())
        assert report["ok"] is False and "were deleted" in report["problem"], report
    finally:
        server.stop()
