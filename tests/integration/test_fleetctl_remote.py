"""``fleetctl`` against a real fleet server: devices, releases, assignments, audit, tokens."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from fleet_server.db.models import AuditEntry
from fleet_server.fleetctl import main
from testbed.api_server import ServerThread
from testbed.images import HARDWARE
from tests.support.databases import DATABASES, database_url
from tests.support.fleetctl import Fleetctl, fleetctl_process, one_line_error

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleetctl]:
    tmp = tmp_path_factory.mktemp(f"fleetctl-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(tmp / "server", url)
        try:
            yield Fleetctl(api, tmp)
        finally:
            api.close()


@pytest.fixture
def remote(server: Fleetctl, capsys: pytest.CaptureFixture[str]) -> Fleetctl:
    server.capsys = capsys
    return server


@pytest.fixture(scope="module")
def local_repo(server: Fleetctl, bundles: dict[str, Path]) -> Path:
    """Release keys and an image repository holding v1, made with ``fleetctl`` offline."""
    keys, repo = server.tmp / "keys", server.tmp / "repo"
    assert main(["keys", "init", "--dir", str(keys)]) == 0
    assert (
        main(["release", "add", str(bundles["v1"]), "--repo", str(repo), "--keys", str(keys)]) == 0
    )
    return repo


def test_release_push_then_list_from_the_server(
    remote: Fleetctl, local_repo: Path, bundles: dict[str, Path]
) -> None:
    pushed = remote.run("release", "push", "--repo", str(local_repo), "--json").json()
    assert [r["version"] for r in pushed["published"]] == ["1.0.0"]
    assert [p for p in pushed["sent"] if p.startswith("targets/")] == [
        p.relative_to(local_repo).as_posix() for p in local_repo.glob("targets/*/*.bundle")
    ]
    # v2 released offline, then pushed: only the new bundle travels.
    added = remote.local(
        "release",
        "add",
        str(bundles["v2"]),
        "--repo",
        str(local_repo),
        "--keys",
        str(remote.tmp / "keys"),
    )
    assert added.code == 0, added.err
    again = remote.run("release", "push", "--repo", str(local_repo), "--json").json()
    assert [r["version"] for r in again["published"]] == ["2.0.0"]
    sent = [p for p in again["sent"] if p.startswith("targets/")]
    assert len(sent) == 1 and sent[0].endswith("pump-health-2.0.0.bundle")
    # Only the metadata a device reads now: the roots, the timestamp and where it leads.
    assert "metadata/3.targets.json" in again["sent"]
    assert "metadata/2.targets.json" not in again["sent"]
    human = remote.run("release", "push", "--repo", str(local_repo))
    assert human.code == 0 and "(0 bundles)" in human.out and "no new bundle" in human.out
    listed = remote.run("release", "list", "--json")
    assert [r["version"] for r in listed.json()] == ["1.0.0", "2.0.0"]
    table = remote.run("release", "list")
    assert table.out.splitlines()[0].split()[:3] == ["NAME", "VERSION", "COUNTER"]
    # The offline listing still works the same.
    assert "2.0.0" in remote.local("release", "list", "--repo", str(local_repo)).out


def test_devices_register_list_show_tag(remote: Fleetctl) -> None:
    created = remote.run(
        "devices", "register", "cli-1", "--hardware", HARDWARE, "--tag", "line-1", "--json"
    )
    assert created.code == 0, created.err
    assert created.json()["password"]
    human = remote.run("devices", "register", "cli-2", "--hardware", HARDWARE)
    assert "shown only now" in human.out
    listed = remote.run("devices", "list", "--tag", "line-1", "--json")
    assert [d["id"] for d in listed.json()] == ["cli-1"]
    table = remote.run("devices", "list")
    assert table.out.splitlines()[0].split() == [
        "DEVICE",
        "HARDWARE",
        "ONLINE",
        "RUNNING",
        "ASSIGNED",
        "TAGS",
    ]
    assert {line.split()[0] for line in table.out.splitlines()[1:]} >= {"cli-1", "cli-2"}
    tagged = remote.run("devices", "tag", "cli-2", "--add", "line-1", "--add", "north")
    assert tagged.code == 0 and "line-1, north" in tagged.out
    shown = remote.run("devices", "show", "cli-2")
    assert "tags:" in shown.out and "line-1, north" in shown.out
    assert "no device" in one_line_error(remote.run("devices", "show", "ghost"))


def test_assign_to_a_device_and_to_a_tag(remote: Fleetctl, local_repo: Path) -> None:
    remote.run("release", "push", "--repo", str(local_repo))
    for device in ("as-1", "as-2", "as-3"):
        remote.run("devices", "register", device, "--hardware", HARDWARE, "--tag", "as-wave")
    one = remote.run("assign", "pump-health@1.0.0", "--device", "as-1", "--json")
    assert one.code == 0, one.err
    assert [a["device_id"] for a in one.json()["assignments"]] == ["as-1"]
    wave = remote.run("assign", "pump-health@2.0.0", "--tag", "as-wave")
    assert wave.code == 0, wave.err
    assert {"as-1", "as-2", "as-3"} <= set(wave.out.split())
    shown = remote.run("devices", "show", "as-2", "--json").json()
    assert shown["assigned_target"].endswith("pump-health-2.0.0.bundle")
    assert "give --device" in one_line_error(remote.run("assign", "pump-health@1.0.0"))
    assert "no release" in one_line_error(remote.run("assign", "nope@1.0.0", "--tag", "as-wave"))


def test_tokens_and_roles(remote: Fleetctl) -> None:
    created = remote.run("tokens", "create", "--name", "ci-viewer", "--role", "viewer", "--json")
    assert created.code == 0, created.err
    viewer_file = remote.tmp / "viewer.token"
    viewer_file.write_text(created.json()["token"] + "\n")
    assert remote.run("devices", "list", token_file=viewer_file).code == 0
    refused = one_line_error(
        remote.run("assign", "pump-health@1.0.0", "--tag", "x", token_file=viewer_file)
    )
    assert "403" in refused and "operator" in refused
    refused = one_line_error(
        remote.run("tokens", "create", "--name", "x", "--role", "admin", token_file=viewer_file)
    )
    assert "403" in refused
    listed = remote.run("tokens", "list")
    assert "ci-viewer" in listed.out and "viewer" in listed.out
    token_id = created.json()["info"]["id"]
    assert remote.run("tokens", "revoke", token_id).code == 0
    assert "401" in one_line_error(remote.run("devices", "list", token_file=viewer_file))


def test_provisioning_token_enrols_a_device(remote: Fleetctl) -> None:
    created = remote.run(
        "provisioning-token",
        "create",
        "--hardware",
        HARDWARE,
        "--uses",
        "2",
        "--ttl",
        "1h",
        "--json",
    )
    assert created.code == 0, created.err
    token = created.json()["token"]
    r = remote.api.request(
        "POST",
        "/api/v1/devices/enrol",
        json={"token": token, "device_id": "self-enrolled", "hardware_id": HARDWARE},
    )
    assert r.status == 201
    assert "self-enrolled" in remote.run("devices", "list").out


def test_provisioning_token_written_to_a_file_readable_by_its_owner_only(
    remote: Fleetctl, tmp_path: Path
) -> None:
    out = tmp_path / "provisioning-token"
    created = remote.run("provisioning-token", "create", "--hardware", HARDWARE, "--out", str(out))
    assert created.code == 0, created.err
    assert f"written to {out} (mode 0600)" in created.out
    token = out.read_text().strip()
    assert token and token not in created.out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    r = remote.api.request(
        "POST",
        "/api/v1/devices/enrol",
        json={"token": token, "device_id": "enrolled-from-file", "hardware_id": HARDWARE},
    )
    assert r.status == 201

    as_json = remote.run("provisioning-token", "create", "--out", str(out), "--json").json()
    assert "token" not in as_json and as_json["out"] == str(out)
    assert out.read_text().strip() != token

    missing = tmp_path / "no-such-folder" / "token"
    refused = remote.run("provisioning-token", "create", "--out", str(missing))
    assert refused.code == 1 and not missing.exists()
    assert "no-such-folder" in one_line_error(refused) and "no token was created" in refused.err


def test_audit_list_and_verify_detects_an_edit(remote: Fleetctl) -> None:
    remote.run("devices", "register", "audit-cli", "--hardware", HARDWARE)
    listed = remote.run("audit", "list", "--action", "device.register")
    assert listed.code == 0 and "audit-cli" in listed.out
    page = remote.run("audit", "list", "--limit", "1", "--json").json()
    assert len(page["entries"]) == 1 and page["next_after"] == page["entries"][0]["seq"]
    ok = remote.run("audit", "verify")
    assert ok.code == 0 and "intact" in ok.out
    server = remote.api.server

    async def tamper(details: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        async with server.db.session() as s:
            entry = (
                await s.scalars(select(AuditEntry).where(AuditEntry.subject == "audit-cli"))
            ).one()
            before = dict(entry.details)
            await s.execute(
                update(AuditEntry)
                .where(AuditEntry.seq == entry.seq)
                .values(details=details if details is not None else before)
            )
            return entry.seq, before

    seq, original = remote.api.call(tamper({"hardware_id": "forged"}))
    broken = remote.run("audit", "verify", "--json")
    assert broken.code == 1
    assert broken.json()["broken_at"] == seq
    assert f"entry {seq}" in one_line_error(broken)
    remote.api.call(tamper(original))
    assert remote.run("audit", "verify").code == 0


def test_errors_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef.secret\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    for args in (
        ["devices", "list", "--server", "http://127.0.0.1:9", "--token-file", str(token)],
        ["devices", "list", "--token-file", str(token)],
        ["devices", "list", "--server", "http://127.0.0.1:9", "--token-file", "/nonexistent"],
        ["release", "list"],
    ):
        r = fleetctl_process(args, env=env, timeout=60)
        assert r.code == 1, (args, r.err)
        assert r.err.count("\n") == 1 and r.err.startswith("fleetctl: "), r.err
        assert r.out == ""


def test_release_push_without_a_token_says_how_to_give_one(
    remote: Fleetctl, local_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEFLEET_TOKEN", raising=False)
    result = remote.local("release", "push", "--repo", str(local_repo), "--server", remote.api.url)
    err = one_line_error(result)
    assert "401" in err and "no API token was given" in err
    assert "--token-file" in err and "EDGEFLEET_TOKEN" in err
    bad = remote.tmp / "bad.token"
    bad.write_text("not-a-token\n")
    err = one_line_error(remote.run("release", "push", "--repo", str(local_repo), token_file=bad))
    assert "401" in err and "the token given was not accepted" in err and "EDGEFLEET_TOKEN" in err
