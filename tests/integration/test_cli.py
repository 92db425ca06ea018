"""The command-line tools as users run them: real processes, no terminal on stdin."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.images import MODELS

HW = "rpi4-arm64"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    module = {"fleetctl": "fleet_server.fleetctl", "edge-agent": "agent.cli"}[args[0]]
    return subprocess.run(
        [sys.executable, "-m", module, *args[1:]],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def build(
    out: Path | str, model: str = "v1", version: str = "1.0.0"
) -> subprocess.CompletedProcess[str]:
    return run(
        "fleetctl",
        "bundle",
        "build",
        str(MODELS / f"{model}.tflite"),
        "--name",
        "pump-health",
        "--version",
        version,
        "--hardware",
        HW,
        "--baseline",
        str(MODELS / "baseline.npy"),
        "--features",
        str(MODELS / "features.json"),
        "--out",
        str(out),
    )


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Encrypted keys, a v1 bundle and a repository holding it, made with the CLI."""
    tmp = tmp_path_factory.mktemp("cli")
    env = {"RELEASE_PASS": "correct horse"}
    r = run(
        "fleetctl",
        "keys",
        "init",
        "--dir",
        str(tmp / "keys"),
        "--threshold",
        "2",
        "--passphrase-env",
        "RELEASE_PASS",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert build(tmp).returncode == 0
    r = run(
        "fleetctl",
        "release",
        "add",
        str(tmp / "pump-health-1.0.0.bundle"),
        "--repo",
        str(tmp / "repo"),
        "--keys",
        str(tmp / "keys"),
        "--passphrase-env",
        "RELEASE_PASS",
        "--json",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["created"] is True
    return tmp


def test_keys_are_private_encrypted_and_thresholded(released: Path) -> None:
    keys = released / "keys"
    index = json.loads((keys / "keys.json").read_text())
    assert index["encrypted"] is True
    assert index["roles"]["root"]["threshold"] == 2
    assert len(index["roles"]["targets"]["files"]) == 2
    for key in keys.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    root = json.loads((released / "repo" / "metadata" / "1.root.json").read_text())
    assert len(root["signatures"]) == 2
    assert root["signed"]["roles"]["root"]["threshold"] == 2


def test_encrypted_keys_without_a_passphrase_fail_without_prompting(released: Path) -> None:
    r = run(
        "fleetctl",
        "release",
        "timestamp",
        "--repo",
        str(released / "repo"),
        "--keys",
        str(released / "keys"),
    )
    assert r.returncode == 1
    assert "encrypted" in r.stderr and "--passphrase-env" in r.stderr
    assert "Traceback" not in r.stderr


def test_wrong_passphrase_is_a_clear_error(released: Path) -> None:
    r = run(
        "fleetctl",
        "release",
        "timestamp",
        "--repo",
        str(released / "repo"),
        "--keys",
        str(released / "keys"),
        "--passphrase-env",
        "P",
        env={"P": "wrong"},
    )
    assert r.returncode == 1 and "wrong passphrase" in r.stderr
    assert "Traceback" not in r.stderr


def test_inspect_shows_the_manifest(released: Path) -> None:
    bundle = str(released / "pump-health-1.0.0.bundle")
    human = run("fleetctl", "bundle", "inspect", bundle)
    assert human.returncode == 0
    assert "pump-health 1.0.0" in human.stdout and "shaft_rpm" in human.stdout
    machine = run("fleetctl", "bundle", "inspect", bundle, "--json")
    manifest = json.loads(machine.stdout)
    assert manifest["name"] == "pump-health" and manifest["hardware_ids"] == [HW]


def test_verify_puts_the_bundle_in_out(released: Path, tmp_path: Path) -> None:
    r = run(
        "edge-agent",
        "verify",
        "--root",
        str(released / "repo/metadata/1.root.json"),
        "--repo",
        str(released / "repo"),
        "--name",
        "pump-health",
        "--hardware",
        HW,
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "pump-health-1.0.0.bundle").read_bytes() == (
        released / "pump-health-1.0.0.bundle"
    ).read_bytes()


def test_verify_refusal_is_one_line_without_traceback(released: Path, tmp_path: Path) -> None:
    r = run(
        "edge-agent",
        "verify",
        "--root",
        str(released / "repo/metadata/1.root.json"),
        "--repo",
        str(released / "repo"),
        "--name",
        "pump-health",
        "--hardware",
        "esp32",
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 3
    assert r.stderr.strip().count("\n") == 0
    assert "wrong-hardware" in r.stderr and "esp32" in r.stderr


def test_verify_with_a_missing_root_says_so(tmp_path: Path) -> None:
    r = run(
        "edge-agent",
        "verify",
        "--root",
        str(tmp_path / "nope.json"),
        "--repo",
        str(tmp_path),
        "--name",
        "x",
        "--hardware",
        HW,
        "--out",
        str(tmp_path / "o"),
    )
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_build_of_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    r = run(
        "fleetctl",
        "bundle",
        "build",
        str(tmp_path / "missing.tflite"),
        "--name",
        "x",
        "--version",
        "1.0.0",
        "--hardware",
        HW,
        "--baseline",
        str(MODELS / "baseline.npy"),
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 1 and "cannot read the model" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_version_is_a_clear_error(tmp_path: Path) -> None:
    r = build(tmp_path, version="one")
    assert r.returncode == 1 and "not a semantic version" in r.stderr
    assert "Traceback" not in r.stderr


def test_rereleasing_different_bytes_under_the_same_version_is_refused(released: Path) -> None:
    other = released / "other"
    other.mkdir(exist_ok=True)
    assert build(other, model="v2").returncode == 0
    r = run(
        "fleetctl",
        "release",
        "add",
        str(other / "pump-health-1.0.0.bundle"),
        "--repo",
        str(released / "repo"),
        "--keys",
        str(released / "keys"),
        "--passphrase-env",
        "P",
        env={"P": "correct horse"},
    )
    assert r.returncode == 1 and "already released with different content" in r.stderr


def test_build_out_with_a_trailing_slash_makes_a_folder_with_parents(tmp_path: Path) -> None:
    r = build(f"{tmp_path}/a/b/")
    assert r.returncode == 0, r.stderr
    bundle = tmp_path / "a" / "b" / "pump-health-1.0.0.bundle"
    assert bundle.is_file()
    assert f"Built {bundle}" in r.stdout


def test_build_out_as_a_file_path_gets_its_parent_folders(tmp_path: Path) -> None:
    r = build(tmp_path / "x" / "y" / "model.bundle")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / "y" / "model.bundle").is_file()


def test_build_out_below_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    r = build(f"{tmp_path}/plain/")
    assert r.returncode == 1 and str(tmp_path / "plain") in r.stderr
    assert "Traceback" not in r.stderr


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _release(bundle: Path, repo: Path | str, keys: Path) -> subprocess.CompletedProcess[str]:
    return run("fleetctl", "release", "add", str(bundle), "--repo", str(repo), "--keys", str(keys))


def test_release_with_keys_the_root_does_not_trust_is_refused_before_writing(
    tmp_path: Path,
) -> None:
    for name in ("keys", "other"):
        r = run("fleetctl", "keys", "init", "--dir", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    assert build(f"{tmp_path}/b/").returncode == 0
    assert build(f"{tmp_path}/b/", model="v2", version="1.1.0").returncode == 0
    repo = tmp_path / "repo"
    r = _release(tmp_path / "b" / "pump-health-1.0.0.bundle", repo, tmp_path / "keys")
    assert r.returncode == 0, r.stderr
    before = _tree(repo / "metadata"), _tree(repo / "targets")

    r = _release(tmp_path / "b" / "pump-health-1.1.0.bundle", repo, tmp_path / "other")
    assert r.returncode == 1 and "Released" not in r.stdout
    assert "not trusted for the targets role" in r.stderr and "key ids" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (_tree(repo / "metadata"), _tree(repo / "targets")) == before
    r = run(
        "fleetctl", "release", "timestamp", "--repo", str(repo), "--keys", str(tmp_path / "other")
    )
    assert r.returncode == 1 and "not trusted for the timestamp role" in r.stderr
    assert (_tree(repo / "metadata"), _tree(repo / "targets")) == before

    r = _release(tmp_path / "b" / "pump-health-1.1.0.bundle", repo, tmp_path / "keys")
    assert r.returncode == 0, r.stderr
    root = repo / "metadata" / "1.root.json"
    r = run(
        "edge-agent", "verify", "--repo", str(repo), "--root", str(root),
        "--name", "pump-health", "--hardware", HW, "--out", str(tmp_path / "dev"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1.1.0" in r.stdout


def test_release_list_of_a_missing_repository_is_an_error(tmp_path: Path) -> None:
    r = run("fleetctl", "release", "list", "--repo", str(tmp_path / "nosuchrepo"))
    assert r.returncode == 1 and "holds no image repository" in r.stderr
    assert "No bundles released" not in r.stdout


def test_release_add_creates_a_repository_only_in_an_existing_folder(tmp_path: Path) -> None:
    assert run("fleetctl", "keys", "init", "--dir", str(tmp_path / "keys")).returncode == 0
    assert build(f"{tmp_path}/b/").returncode == 0
    bundle = tmp_path / "b" / "pump-health-1.0.0.bundle"
    r = _release(bundle, tmp_path / "no" / "such" / "repo", tmp_path / "keys")
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "no").exists()
    r = _release(bundle, tmp_path / "repo", tmp_path / "keys")
    assert r.returncode == 0, r.stderr
    assert f"Created repository {tmp_path / 'repo'}" in r.stdout
    r = _release(bundle, tmp_path / "repo", tmp_path / "keys")
    assert r.returncode == 0 and "Created repository" not in r.stdout


def test_a_release_candidate_then_its_release_are_both_released_in_order(tmp_path: Path) -> None:
    assert run("fleetctl", "keys", "init", "--dir", str(tmp_path / "keys")).returncode == 0
    assert build(f"{tmp_path}/b/", version="1.2.0-rc1").returncode == 0
    assert build(f"{tmp_path}/b/", model="v2", version="1.2.0").returncode == 0
    for version in ("1.2.0-rc1", "1.2.0"):
        r = _release(
            tmp_path / "b" / f"pump-health-{version}.bundle", tmp_path / "repo", tmp_path / "keys"
        )
        assert r.returncode == 0, r.stderr
    r = run("fleetctl", "release", "list", "--repo", str(tmp_path / "repo"), "--json")
    listed = [(b["version"], b["release_counter"]) for b in json.loads(r.stdout)]
    assert listed == [("1.2.0-rc1", 1_002_000_602), ("1.2.0", 1_002_000_999)]
