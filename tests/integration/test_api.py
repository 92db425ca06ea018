"""The REST API and device hosting of a real fleet server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import urllib3
from sqlalchemy import delete, insert, select, update

import agent.ota.transport as transport
from agent.config import AgentConfig
from agent.ota.fetch_worker import resolve
from agent.ota.image_repository import PARTIAL_SUFFIX
from fleet_server.dashboard import routes as dashboard_routes
from fleet_server.db.models import AuditEntry
from fleet_server.release.keys import KeyStore
from fleet_server.release.repository import ImageRepository
from testbed.api_server import ServerThread, repository_files
from testbed.images import HARDWARE
from testbed.waiting import wait_until
from tests.support.databases import DATABASES, database_url

pytestmark = pytest.mark.integration

V = "/api/v1"


@dataclass
class Fleet:
    """A running server, its tokens of each role, and a local image repository."""

    api: ServerThread
    admin: str
    operator: str
    viewer: str
    repo: ImageRepository
    keys: KeyStore

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        response = self.api.request(method, V + path, token=token, **kw)
        return response.status, json.loads(response.data) if response.data else None

    def device(self, device_id: str, *tags: str, hardware: str = HARDWARE) -> str:
        """Pre-register a device; returns its password."""
        status, body = self.call(
            "POST",
            "/devices",
            self.admin,
            json={"device_id": device_id, "hardware_id": hardware, "tags": list(tags)},
        )
        assert status == 201, body
        return str(body["password"])


def basic(device_id: str, password: str) -> dict[str, str]:
    return urllib3.make_headers(basic_auth=f"{device_id}:{password}")


@pytest.fixture(scope="module", params=DATABASES)
def fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    session_keys: KeyStore,
    bundles: dict[str, Path],
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    with database_url(request.param, tmp) as url:
        api = ServerThread(tmp / "server", url)
        try:
            admin = api.admin_token
            made = {}
            for role in ("operator", "viewer"):
                r = api.request(
                    "POST", f"{V}/tokens", token=admin, json={"name": role, "role": role}
                )
                assert r.status == 201, r.data
                made[role] = json.loads(r.data)["token"]
            repo = ImageRepository(tmp / "repo")
            repo.create(session_keys)
            repo.add_bundle(bundles["v1"], session_keys)
            fleet = Fleet(api, admin, made["operator"], made["viewer"], repo, session_keys)
            status, body = fleet.call(
                "POST", "/releases", fleet.operator, json={"files": repository_files(repo.path)}
            )
            assert status == 201, body
            yield fleet
        finally:
            api.close()


# -- tokens and roles ------------------------------------------------------------


def test_bootstrap_admin_token_is_written_private(fleet: Fleet) -> None:
    mode = stat.S_IMODE(os.stat(fleet.api.admin_token_file).st_mode)
    assert mode == 0o600
    status, tokens = fleet.call("GET", "/tokens", fleet.admin)
    assert status == 200
    assert {t["role"] for t in tokens["tokens"]} >= {"admin", "operator", "viewer"}


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer nodot",
        "Bearer abc.def",
        "Basic dXNlcjpwdw==",
        "Bearer \u00e9t\u00e9.x",
    ],
)
def test_missing_or_unknown_token_is_401(fleet: Fleet, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = fleet.api.request("GET", f"{V}/devices", headers=headers)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "error" in json.loads(r.data)


def test_viewer_reads_but_cannot_assign(fleet: Fleet) -> None:
    assert fleet.call("GET", "/devices", fleet.viewer)[0] == 200
    assert fleet.call("GET", "/releases", fleet.viewer)[0] == 200
    status, body = fleet.call(
        "POST", "/assignments", fleet.viewer, json={"release": "pump-health@1.0.0", "tag": "x"}
    )
    assert status == 403
    assert "operator" in body["error"]


def test_operator_cannot_create_tokens_or_register_devices(fleet: Fleet) -> None:
    status, _ = fleet.call("POST", "/tokens", fleet.operator, json={"name": "x", "role": "admin"})
    assert status == 403
    status, _ = fleet.call(
        "POST", "/devices", fleet.operator, json={"device_id": "op-made", "hardware_id": HARDWARE}
    )
    assert status == 403
    assert fleet.call("GET", "/tokens", fleet.operator)[0] == 403


def test_revoked_token_is_refused_at_once(fleet: Fleet) -> None:
    status, created = fleet.call(
        "POST", "/tokens", fleet.admin, json={"name": "short-lived", "role": "viewer"}
    )
    assert status == 201
    assert fleet.call("GET", "/devices", created["token"])[0] == 200
    status, revoked = fleet.call("DELETE", f"/tokens/{created['info']['id']}", fleet.admin)
    assert status == 200 and revoked["revoked_at"]
    assert fleet.call("GET", "/devices", created["token"])[0] == 401
    assert fleet.call("DELETE", f"/tokens/{created['info']['id']}", fleet.admin)[0] == 409
    assert fleet.call("DELETE", "/tokens/0000000000000000", fleet.admin)[0] == 404


def test_the_last_admin_token_cannot_be_revoked(fleet: Fleet) -> None:
    admin_id = fleet.admin.partition(".")[0]
    status, body = fleet.call("DELETE", f"/tokens/{admin_id}", fleet.admin)
    assert status == 409 and "last admin" in body["error"]
    _, other = fleet.call("POST", "/tokens", fleet.admin, json={"name": "a2", "role": "admin"})
    assert fleet.call("DELETE", f"/tokens/{other['info']['id']}", fleet.admin)[0] == 200


# -- devices ---------------------------------------------------------------------


def test_enrolment_with_a_provisioning_token(fleet: Fleet) -> None:
    status, token = fleet.call(
        "POST",
        "/provisioning-tokens",
        fleet.admin,
        json={"hardware_id": HARDWARE, "tags": ["line-3"], "uses": 1},
    )
    assert status == 201, token
    enrol = {"token": token["token"], "device_id": "enrolled-1", "hardware_id": HARDWARE}
    status, creds = fleet.call("POST", "/devices/enrol", json=enrol)
    assert status == 201, creds
    assert creds["device"]["tags"] == ["line-3"]
    # The credentials work at once, and the device's director repository exists.
    r = fleet.api.request(
        "GET",
        "/director/devices/enrolled-1/metadata/1.root.json",
        headers=basic("enrolled-1", creds["password"]),
    )
    assert r.status == 200
    status, body = fleet.call("POST", "/devices/enrol", json={**enrol, "device_id": "enrolled-2"})
    assert status == 401, "a used-up token enrolled a second device"
    assert "used up" in body["error"]


def test_enrolment_refuses_wrong_hardware_expired_and_unknown_tokens(fleet: Fleet) -> None:
    _, scoped = fleet.call(
        "POST", "/provisioning-tokens", fleet.admin, json={"hardware_id": HARDWARE, "uses": 5}
    )
    status, body = fleet.call(
        "POST",
        "/devices/enrol",
        json={"token": scoped["token"], "device_id": "wrong-hw", "hardware_id": "jetson-nano"},
    )
    assert status == 401 and HARDWARE in body["error"]
    _, short = fleet.call("POST", "/provisioning-tokens", fleet.admin, json={"ttl_s": 0.01})
    expires_at = datetime.fromisoformat(short["expires_at"]).replace(tzinfo=UTC)
    wait_until("the short token to expire", lambda: datetime.now(UTC) > expires_at, timeout=5)
    status, _ = fleet.call(
        "POST",
        "/devices/enrol",
        json={"token": short["token"], "device_id": "too-late", "hardware_id": HARDWARE},
    )
    assert status == 401
    status, _ = fleet.call(
        "POST",
        "/devices/enrol",
        json={"token": "0123456789abcdef.nope", "device_id": "nobody", "hardware_id": HARDWARE},
    )
    assert status == 401
    for device_id in ("wrong-hw", "too-late", "nobody"):
        assert fleet.call("GET", f"/devices/{device_id}", fleet.viewer)[0] == 404


def test_pre_registration_shows_the_password_once(fleet: Fleet) -> None:
    password = fleet.device("pre-1", "canary")
    assert len(password) >= 24
    status, shown = fleet.call("GET", "/devices/pre-1", fleet.viewer)
    assert status == 200
    assert "password" not in json.dumps(shown) and password not in json.dumps(shown)
    status, body = fleet.call(
        "POST", "/devices", fleet.admin, json={"device_id": "pre-1", "hardware_id": HARDWARE}
    )
    assert status == 409 and "already" in body["error"]


def test_tags_are_added_removed_and_filter_the_list(fleet: Fleet) -> None:
    fleet.device("tag-1", "old")
    status, device = fleet.call(
        "PATCH", "/devices/tag-1/tags", fleet.operator, json={"add": ["north"], "remove": ["old"]}
    )
    assert status == 200 and device["tags"] == ["north"]
    status, listed = fleet.call("GET", "/devices?tag=north", fleet.viewer)
    assert [d["id"] for d in listed["devices"]] == ["tag-1"]
    status, listed = fleet.call("GET", "/devices?online=true", fleet.viewer)
    assert status == 200 and listed["devices"] == []
    status, body = fleet.call("PATCH", "/devices/tag-1/tags", fleet.operator, json={"add": ["a b"]})
    assert status == 422 and body["error"].startswith("add.0:")
    assert fleet.call("PATCH", "/devices/ghost/tags", fleet.operator, json={"add": ["x"]})[0] == 404
    assert fleet.call("PATCH", "/devices/tag-1/tags", fleet.viewer, json={"add": ["x"]})[0] == 403
    status, body = fleet.call("GET", "/devices?online=maybe", fleet.viewer)
    assert status == 422 and "query online" in body["error"]


def test_device_events_of_a_new_device_are_empty(fleet: Fleet) -> None:
    fleet.device("quiet-1")
    assert fleet.call("GET", "/devices/quiet-1/events", fleet.viewer) == (200, {"events": []})
    assert fleet.call("GET", "/devices/ghost/events", fleet.viewer)[0] == 404


# -- malformed requests ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"device_id": "ok-1"}', 422, "hardware_id"),
        (b'{"device_id": "ok-1", "hardware_id": "h", "colour": "red"}', 422, "colour"),
        (b'{"device_id": "../etc", "hardware_id": "h"}', 422, "device_id"),
        (b"[" * 100_000, 400, "not valid JSON"),
    ],
)
def test_malformed_bodies_are_4xx_naming_what_is_wrong(
    fleet: Fleet, body: bytes, status: int, words: str
) -> None:
    r = fleet.api.request(
        "POST",
        f"{V}/devices",
        token=fleet.admin,
        body=body,
        headers={"Content-Type": "application/json"},
    )
    assert r.status == status, r.data
    assert words in json.loads(r.data)["error"]


def test_oversized_body_is_413(fleet: Fleet) -> None:
    r = fleet.api.request("POST", f"{V}/tokens", token=fleet.admin, body=b" " * (2 << 20))
    assert r.status == 413
    assert "limit" in json.loads(r.data)["error"]


def test_unknown_paths_and_methods_are_json_errors(fleet: Fleet) -> None:
    r = fleet.api.request("GET", f"{V}/nothing-here", token=fleet.viewer)
    assert r.status == 404 and "error" in json.loads(r.data)
    r = fleet.api.request("PUT", f"{V}/devices", token=fleet.admin)
    assert r.status == 405 and "GET" in r.headers["Allow"]
    assert "error" in json.loads(r.data)


# -- releases --------------------------------------------------------------------


def test_pushed_release_is_listed(fleet: Fleet) -> None:
    status, body = fleet.call("GET", "/releases?name=pump-health", fleet.viewer)
    assert status == 200
    v1 = next(r for r in body["releases"] if r["version"] == "1.0.0")
    local = next(b for b in fleet.repo.bundles() if b.version == "1.0.0")
    assert (v1["target_path"], v1["sha256"], v1["length"]) == (
        local.target_path,
        local.sha256,
        local.length,
    )


def test_push_of_tampered_metadata_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    copy = ImageRepository(tmp_path / "repo")
    shutil.copytree(fleet.repo.path, copy.path)
    copy.refresh_timestamp(fleet.keys)
    timestamp = copy.metadata_dir / "timestamp.json"
    signed = json.loads(timestamp.read_text())
    signed["signed"]["expires"] = "2099-01-01T00:00:00Z"  # without re-signing
    timestamp.write_text(json.dumps(signed))
    status, body = fleet.call(
        "POST", "/releases", fleet.operator, json={"files": repository_files(copy.path)}
    )
    assert status == 400, body
    assert "does not verify" in body["error"]
    # The server still serves the timestamp it had.
    password = fleet.device("tamper-witness")
    served = fleet.api.request(
        "GET", "/repository/metadata/timestamp.json", headers=basic("tamper-witness", password)
    )
    assert served.data == (fleet.repo.metadata_dir / "timestamp.json").read_bytes()


def test_push_of_a_tampered_bundle_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    target = next(p for p in fleet.repo.targets_dir.rglob("*.bundle"))
    rel = target.relative_to(fleet.repo.path).as_posix()
    tampered = bytearray(target.read_bytes())
    tampered[-1] ^= 0xFF
    files = repository_files(fleet.repo.path, only=set())
    files[rel] = base64.b64encode(bytes(tampered)).decode()
    status, body = fleet.call("POST", "/releases", fleet.operator, json={"files": files})
    assert status == 400, body
    assert "signed hash" in body["error"]


def test_published_metadata_cannot_be_rewritten(fleet: Fleet) -> None:
    files = {"metadata/1.root.json": base64.b64encode(b'{"signed": {}}').decode()}
    status, body = fleet.call("POST", "/releases", fleet.operator, json={"files": files})
    assert status == 409 and "never changes" in body["error"]
    status, body = fleet.call(
        "POST", "/releases", fleet.operator, json={"files": {"targets/../x": "AA=="}}
    )
    assert status == 422


# -- assignments, hosting, the agent's verification ---------------------------------


@pytest.fixture
def with_device_credentials(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the agent's fetcher send HTTP Basic credentials (it has no setting for it yet)."""
    credentials: dict[str, str] = {}
    original = transport.RepositoryFetcher.__init__

    def init(self: transport.RepositoryFetcher, config: Any = None) -> None:
        original(self, config)
        pool = self._http

        class Authenticated:
            def request(self, method: str, url: str, headers: Any = None, **kw: Any) -> Any:
                return pool.request(method, url, headers={**(headers or {}), **credentials}, **kw)

        self._http = Authenticated()  # type: ignore[assignment]

    monkeypatch.setattr(transport.RepositoryFetcher, "__init__", init)
    return credentials


def agent_config(fleet: Fleet, device_id: str, data_dir: Path) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": device_id,
            "hardware_id": HARDWARE,
            "data_dir": data_dir,
            "image_repository": {
                "url": f"{fleet.api.url}/repository",
                "root": fleet.repo.trusted_root_path,
            },
            "director": {
                "url": f"{fleet.api.url}/director",
                "root": fleet.api.config.director_dir / "metadata" / "1.root.json",
            },
        }
    )


def test_assignments_are_signed_and_the_agent_accepts_them(
    fleet: Fleet, tmp_path: Path, bundles: dict[str, Path], with_device_credentials: Any
) -> None:
    # A second release, pushed incrementally: new metadata and only the new bundle.
    fleet.repo.add_bundle(bundles["v2"], fleet.keys)
    have = {r["sha256"] for r in fleet.call("GET", "/releases", fleet.viewer)[1]["releases"]}
    files = {
        rel: data
        for rel, data in repository_files(fleet.repo.path).items()
        if rel.startswith("metadata/") or rel.split("/")[-1].split(".")[0] not in have
    }
    status, pushed = fleet.call("POST", "/releases", fleet.operator, json={"files": files})
    assert status == 201, pushed
    assert [r["version"] for r in pushed["published"]] == ["2.0.0"]

    solo = fleet.device("assign-solo")
    canaries = {d: fleet.device(d, "canary-wave") for d in ("assign-c1", "assign-c2")}
    status, one = fleet.call(
        "POST",
        "/assignments",
        fleet.operator,
        json={"release": "pump-health@1.0.0", "devices": ["assign-solo"]},
    )
    assert status == 201, one
    assert [a["device_id"] for a in one["assignments"]] == ["assign-solo"]
    v2_path = next(b.target_path for b in fleet.repo.bundles() if b.version == "2.0.0")
    status, tagged = fleet.call(
        "POST", "/assignments", fleet.operator, json={"release": v2_path, "tag": "canary-wave"}
    )
    assert status == 201, tagged
    assert sorted(a["device_id"] for a in tagged["assignments"]) == sorted(canaries)

    # The agent's own verification (python-tuf, both repositories, Uptane checks).
    with_device_credentials.update(basic("assign-solo", solo))
    target, image = resolve(agent_config(fleet, "assign-solo", tmp_path / "solo"), 0)
    assert target is not None and target.version == "1.0.0"
    # A download interrupted after 100 bytes resumes with HTTP Range.
    local = fleet.repo.path / "targets" / "pump-health" / f"{target.sha256}.{target.file_name}"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / (target.file_name + PARTIAL_SUFFIX)).write_bytes(local.read_bytes()[:100])
    path = image.download(target, downloads)
    assert path.read_bytes() == local.read_bytes()

    with_device_credentials.clear()
    with_device_credentials.update(basic("assign-c1", canaries["assign-c1"]))
    target, _ = resolve(agent_config(fleet, "assign-c1", tmp_path / "c1"), 0)
    assert target is not None and target.version == "2.0.0"

    status, device = fleet.call("GET", "/devices/assign-c2", fleet.viewer)
    assert device["assigned_target"] == v2_path and device["director_version"] >= 2


def test_assignment_refusals(fleet: Fleet) -> None:
    fleet.device("refuse-1", hardware="jetson-nano")
    cases = [
        ({"release": "pump-health@9.9.9", "devices": ["refuse-1"]}, 404),
        ({"release": "pump-health@1.0.0", "devices": ["ghost"]}, 404),
        ({"release": "pump-health@1.0.0", "devices": ["refuse-1"]}, 400),  # wrong hardware
        ({"release": "pump-health@1.0.0", "tag": "no-such-tag"}, 400),
        ({"release": "pump-health@1.0.0"}, 422),
    ]
    for body, status in cases:
        got, answer = fleet.call("POST", "/assignments", fleet.operator, json=body)
        assert got == status, (body, answer)


def test_device_hosting_checks_credentials_and_ownership(fleet: Fleet) -> None:
    mine = fleet.device("host-1")
    fleet.device("host-2")
    own = "/director/devices/host-1/metadata/1.root.json"
    other = "/director/devices/host-2/metadata/1.root.json"
    get = fleet.api.request
    assert get("GET", own).status == 401
    assert get("GET", own, headers=basic("host-1", "wrong")).status == 401
    assert get("GET", own, headers=basic("ghost", mine)).status == 401
    assert get("GET", own, token=fleet.admin).status == 401  # operators are not devices
    assert get("GET", own, headers=basic("host-1", mine)).status == 200
    assert get("GET", other, headers=basic("host-1", mine)).status == 403
    assert get("GET", "/director/metadata/1.root.json", headers=basic("host-1", mine)).status == 200
    r = get("GET", "/director/metadata/timestamp.json", headers=basic("host-1", mine))
    assert r.status == 404
    r = get("GET", "/repository/metadata/timestamp.json", headers=basic("host-1", mine))
    assert r.status == 200 and json.loads(r.data)["signed"]["_type"] == "timestamp"
    r = get("GET", "/repository/metadata/..%2F..%2Fadmin.token", headers=basic("host-1", mine))
    assert r.status == 404


def test_range_request_on_a_target_returns_206(fleet: Fleet) -> None:
    password = fleet.device("range-1")
    target = next(p for p in fleet.repo.targets_dir.rglob("*.bundle"))
    rel = target.relative_to(fleet.repo.path).as_posix()
    data = target.read_bytes()
    r = fleet.api.request(
        "GET",
        f"/repository/{rel}",
        headers={**basic("range-1", password), "Range": "bytes=100-"},
    )
    assert r.status == 206
    assert r.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert r.data == data[100:]


# -- audit -----------------------------------------------------------------------


def test_changes_are_audited(fleet: Fleet) -> None:
    fleet.device("audited-1")
    actions: set[str] = set()
    after = 0
    while True:
        status, page = fleet.call("GET", f"/audit?after={after}&limit=7", fleet.viewer)
        assert status == 200
        actions |= {e["action"] for e in page["entries"]}
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert {"token.create", "device.register", "release.publish"} <= actions
    status, page = fleet.call("GET", "/audit?action=device.register&limit=1000", fleet.viewer)
    assert "audited-1" in {e["subject"] for e in page["entries"]}


def test_audit_verify_finds_an_edited_and_a_deleted_entry(fleet: Fleet) -> None:
    fleet.device("audit-victim")
    assert fleet.call("GET", "/audit/verify", fleet.viewer)[1]["ok"] is True
    server = fleet.api.server

    async def rows() -> list[AuditEntry]:
        async with server.db.session() as s:
            return list((await s.scalars(select(AuditEntry).order_by(AuditEntry.seq))).all())

    async def execute(statement: Any) -> None:
        async with server.db.session() as s:
            await s.execute(statement)

    entries = fleet.api.call(rows())
    victim = entries[len(entries) // 2]
    original = dict(victim.details)
    fleet.api.call(
        execute(
            update(AuditEntry)
            .where(AuditEntry.seq == victim.seq)
            .values(details={**original, "edited": True})
        )
    )
    report = fleet.call("GET", "/audit/verify", fleet.viewer)[1]
    assert (report["ok"], report["broken_at"]) == (False, victim.seq)
    assert "changed" in report["problem"]
    fleet.api.call(
        execute(update(AuditEntry).where(AuditEntry.seq == victim.seq).values(details=original))
    )
    assert fleet.call("GET", "/audit/verify", fleet.viewer)[1]["ok"] is True

    columns = {c.name: getattr(victim, c.key) for c in AuditEntry.__table__.columns}
    fleet.api.call(execute(delete(AuditEntry).where(AuditEntry.seq == victim.seq)))
    report = fleet.call("GET", "/audit/verify", fleet.viewer)[1]
    following = entries[len(entries) // 2 + 1].seq
    assert (report["ok"], report["broken_at"]) == (False, following)
    assert "deleted" in report["problem"]
    fleet.api.call(execute(insert(AuditEntry).values(**columns)))
    assert fleet.call("GET", "/audit/verify", fleet.viewer)[1]["ok"] is True


# -- metrics and the OpenAPI document ----------------------------------------------


def test_metrics_name_devices_messages_latency_and_rejections(fleet: Fleet) -> None:
    fleet.api.request("GET", f"{V}/devices")  # one more 401
    r = fleet.api.request("GET", "/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.data.decode()
    for name in (
        "edgefleet_devices_online",
        "edgefleet_devices_registered",
        "edgefleet_mqtt_messages_ingested_total",
        "edgefleet_mqtt_messages_dropped_total",
        "edgefleet_api_request_seconds_bucket",
        'edgefleet_api_requests_rejected_total{status="401"}',
    ):
        assert name in text, name
    assert 'route="/api/v1/devices"' in text


def test_openapi_document_describes_every_route(fleet: Fleet) -> None:
    r = fleet.api.request("GET", f"{V}/openapi.json")
    assert r.status == 200
    doc = json.loads(r.data)
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = {
        (route.method, route.resource.canonical)
        for route in fleet.api.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    # The dashboard's HTML pages are no part of the API; every other route is documented.
    dashboard = {(method, path) for method, path, _ in dashboard_routes()}
    assert dashboard <= served
    assert documented == served - dashboard
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in doc["components"]["schemas"], ref
    assign = doc["paths"]["/api/v1/assignments"]["post"]
    assert assign["security"] == [{"bearer": []}]
    assert {"201", "401", "403", "422"} <= set(assign["responses"])
