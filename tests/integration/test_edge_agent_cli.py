"""``edge-agent`` as a device engineer runs it: real processes, real repositories, real pipes.

Every bad trust input to ``edge-agent verify`` is a refusal (exit 3, one line
on stderr naming the file and why), a root that disagrees with the trust store
already in ``--out`` is never silently ignored, and output piped into a reader
that stops early (``| head -1``) ends quietly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_server.release.keys import KeyStore, init_keys
from fleet_server.release.repository import ImageRepository
from testbed.images import HARDWARE

EXIT_REFUSED = 3


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def verify(root: Path, repo: ImageRepository, out: Path) -> subprocess.CompletedProcess[str]:
    return edge_agent(
        "verify",
        "--root",
        str(root),
        "--repo",
        str(repo.path),
        "--name",
        "pump-health",
        "--hardware",
        HARDWARE,
        "--out",
        str(out),
    )


def assert_one_line_refusal(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == EXIT_REFUSED, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    [line] = r.stderr.splitlines()
    assert "untrusted-root" in line
    for needle in needles:
        assert needle in line, line


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def other_root(tmp_path: Path) -> Path:
    """The root of another repository, signed by keys the first one does not use."""
    keys: KeyStore = init_keys(tmp_path / "other-keys")
    other = ImageRepository(tmp_path / "other-repo")
    other.create(keys)
    return other.trusted_root_path


def bad_root(kind: str, repo: ImageRepository, tmp_path: Path) -> tuple[Path, str]:
    """A trust input of ``kind`` and the words its refusal must use."""
    path = tmp_path / f"{kind}.json"
    good = repo.trusted_root_path.read_bytes()
    if kind == "targets-file":
        return repo.metadata_dir / "1.targets.json", "targets metadata, not a root"
    if kind == "not-json":
        path.write_bytes(good[:100])
        return path, "is not JSON"
    if kind == "binary":
        path.write_bytes(bytes(range(256)))
        return path, "is not"
    if kind == "unsigned":
        data = json.loads(good)
        data["signatures"] = []
        path.write_text(json.dumps(data))
        return path, "is not signed by a threshold of its own root keys"
    if kind == "directory":
        path.mkdir()
        return path, "cannot be read"
    assert kind == "missing"
    return path, "does not exist"


@pytest.mark.parametrize(
    "kind", ["targets-file", "not-json", "binary", "unsigned", "directory", "missing"]
)
def test_a_bad_root_is_a_one_line_refusal_that_leaves_no_out_folder(
    kind: str, repo: ImageRepository, tmp_path: Path
) -> None:
    root, why = bad_root(kind, repo, tmp_path)
    out = tmp_path / "out"
    r = verify(root, repo, out)
    assert_one_line_refusal(r, str(root), why)
    assert not out.exists()


def test_a_root_that_disagrees_with_the_trust_store_in_out_is_refused_naming_both(
    repo: ImageRepository, other_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = verify(repo.trusted_root_path, repo, out)
    assert first.returncode == 0, first.stderr
    store = out / ".metadata"
    before = snapshot(store)

    r = verify(other_root, repo, out)
    assert_one_line_refusal(r, str(other_root), str(store), "disagrees")
    assert "Verified" not in r.stdout
    # The refusal changed nothing: the store and the verified bundle are as they were.
    assert snapshot(store) == before
    assert (out / "pump-health-1.0.0.bundle").exists()

    again = verify(repo.trusted_root_path, repo, out)
    assert again.returncode == 0, again.stderr
    assert "Verified pump-health 1.0.0" in again.stdout


def test_a_failed_verify_removes_only_the_out_folder_it_created(
    repo: ImageRepository, tmp_path: Path
) -> None:
    created = tmp_path / "new-out"
    r = edge_agent(
        "verify",
        "--root",
        str(repo.trusted_root_path),
        "--repo",
        str(repo.path),
        "--name",
        "pump-health",
        "--hardware",
        "esp32",
        "--out",
        str(created),
    )
    assert r.returncode == EXIT_REFUSED and "wrong-hardware" in r.stderr
    assert not created.exists()

    existing = tmp_path / "existing-out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    r = verify(tmp_path / "missing-root.json", repo, existing)
    assert r.returncode == EXIT_REFUSED
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]


def test_output_piped_into_a_reader_that_is_gone_ends_quietly(
    repo: ImageRepository, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "pump-1"\nhardware_id = "{HARDWARE}"\ndata_dir = "{tmp_path / "device"}"\n'
        f'[image_repository]\nurl = "{repo.path}"\nroot = "{repo.trusted_root_path}"\n'
        f'[director]\nurl = "{tmp_path / "director"}"\nroot = "{repo.trusted_root_path}"\n'
    )
    status = [sys.executable, "-m", "agent.cli", "status", "--config", str(config), "--json"]
    works = subprocess.run(status, capture_output=True, text=True, timeout=120)
    assert works.returncode == 0 and works.stdout, works.stderr

    r = run_into_a_closed_pipe(status)
    assert r.stderr == ""
    assert r.returncode == 141  # 128 + SIGPIPE, what a shell reports for tools cut off by head


def run_into_a_closed_pipe(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with stdout a pipe whose reader has already closed."""
    # A pipe whose reader has already closed, as after ``| head -1`` took its line:
    # every write fails with EPIPE, whatever the timing.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            command,
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
