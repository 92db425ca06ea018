"""The device's own trusted root, damaged on disk, is a refusal naming the file, never a crash.

A root that is missing, not JSON, stripped of its signatures or re-signed by
other keys cannot be repaired from the network: the device says so (reason
``untrusted-root``), from ``edge-agent verify`` and from the running agent's
fetcher alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli import EXIT_REFUSED, main
from agent.config import AgentConfig
from agent.ota import errors
from agent.ota.answers import Refused
from agent.ota.fetch_worker import run
from agent.ota.verify import verify_bundle
from fleet_server.director import DirectorRepository
from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository
from testbed.images import HARDWARE


def not_json(root: Path) -> None:
    root.write_bytes(root.read_bytes()[:100])


def unsigned(root: Path) -> None:
    data = json.loads(root.read_text())
    data["signatures"] = []
    root.write_text(json.dumps(data))


def tampered(root: Path) -> None:
    data = json.loads(root.read_text())
    data["signed"]["expires"] = "2099-01-01T00:00:00Z"  # the signature no longer covers it
    root.write_text(json.dumps(data))


def not_a_root(root: Path) -> None:
    targets = root.parent / "1.targets.json"
    root.write_bytes(targets.read_bytes() if targets.exists() else b"{}")


def missing(root: Path) -> None:
    root.unlink()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "not-json": (not_json, "is not valid TUF root metadata"),
    "unsigned": (unsigned, "is not signed by a threshold of its own root keys"),
    "tampered": (tampered, "is not signed by a threshold of its own root keys"),
    "not-a-root": (not_a_root, "is not"),
    "missing": (missing, "does not exist"),
}


def damaged_store(repo: ImageRepository, tmp_path: Path, damage: str) -> Path:
    store = tmp_path / "trust"
    store.mkdir()
    root = store / "root.json"
    root.write_bytes(repo.trusted_root_path.read_bytes())
    (store / "1.targets.json").write_bytes((repo.metadata_dir / "1.targets.json").read_bytes())
    DAMAGE[damage][0](root)
    return store


@pytest.mark.parametrize("damage", sorted(set(DAMAGE) - {"missing"}))
def test_a_damaged_trusted_root_on_disk_is_refused_naming_the_file(
    damage: str, repo: ImageRepository, tmp_path: Path
) -> None:
    store = damaged_store(repo, tmp_path, damage)
    with pytest.raises(errors.UntrustedRoot) as refused:
        verify_bundle(
            trusted_root=repo.trusted_root_path,
            repository=str(repo.path),
            name="pump-health",
            hardware_id=HARDWARE,
            out_dir=tmp_path / "out",
            metadata_dir=store,
        )
    message = str(refused.value)
    assert message.startswith("untrusted-root: the trusted root ")
    assert str(store / "root.json") in message and DAMAGE[damage][1] in message
    assert "\n" not in message


def test_a_trusted_root_that_cannot_be_provisioned_is_refused(
    repo: ImageRepository, tmp_path: Path
) -> None:
    with pytest.raises(errors.UntrustedRoot, match="cannot install the trusted root"):
        verify_bundle(
            trusted_root=tmp_path / "no-such-root.json",
            repository=str(repo.path),
            name="pump-health",
            hardware_id=HARDWARE,
            out_dir=tmp_path / "out",
        )


@pytest.mark.parametrize("damage", ["not-json", "unsigned"])
def test_edge_agent_verify_reports_a_damaged_trusted_root_in_one_line(
    damage: str, repo: ImageRepository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = damaged_store(repo, tmp_path, damage)
    code = main(
        [
            "verify",
            "--root",
            str(repo.trusted_root_path),
            "--repo",
            str(repo.path),
            "--name",
            "pump-health",
            "--hardware",
            HARDWARE,
            "--out",
            str(tmp_path / "out"),
            "--metadata-dir",
            str(store),
        ]
    )
    out = capsys.readouterr()
    assert code == EXIT_REFUSED
    assert out.out == ""
    [line] = out.err.splitlines()
    assert line.startswith("edge-agent: refused pump-health for rpi4-arm64: untrusted-root: ")
    assert str(store / "root.json") in line and DAMAGE[damage][1] in line


@pytest.mark.parametrize("which", ["image", "director"])
def test_the_running_agents_fetcher_refuses_a_damaged_root_instead_of_retrying(
    which: str, repo: ImageRepository, tmp_path: Path
) -> None:
    director_keys: KeyStore = init_keys(tmp_path / "director-keys")
    director = DirectorRepository(tmp_path / "director")
    director.create(director_keys)
    director.register(director_keys, "pump-1")
    config = AgentConfig.model_validate(
        {
            "device_id": "pump-1",
            "hardware_id": HARDWARE,
            "data_dir": str(tmp_path / "device"),
            "image_repository": {"url": str(repo.path), "root": str(repo.trusted_root_path)},
            "director": {"url": str(director.path), "root": str(director.trusted_root_path)},
        }
    )
    root = tmp_path / "device" / "trust" / which / "root.json"
    root.parent.mkdir(parents=True)
    root.write_text("{ not json")
    if which == "image":
        # The image repository is consulted only once the director names a bundle.
        director.assign(director_keys, "pump-1", HARDWARE, repo.bundles()[0])
    answer = run("check", config, 0)
    assert isinstance(answer, Refused), answer
    assert answer.reason == "untrusted-root"
    assert str(root) in answer.message
