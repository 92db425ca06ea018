"""The poll gate reads only whole, plain HTTP answers and python-tuf's trust stores; anything
else is a doubt (the fetcher child answers then)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.ota.poll_gate import parse_response, response_complete, store_state


def test_a_whole_answer_gives_its_status_and_body() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert response_complete(raw)
    assert parse_response(raw, 16) == (200, b"hello")
    assert parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nno such file", 0) == (404, b"")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello", "shorter than its Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello", "encoded"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 17, "more than 16 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Len", "no complete HTTP response head"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1 response"),
    ],
)
def test_anything_but_a_whole_plain_answer_is_a_doubt(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_response(raw, 16)


def _metadata(role: str, version: int, expires: str) -> bytes:
    signed = {"_type": role, "version": version, "expires": expires}
    return json.dumps({"signatures": [], "signed": signed}).encode()


def test_a_store_expires_with_its_earliest_metadata_and_the_provisioned_root_is_not_read(
    tmp_path: Path,
) -> None:
    (tmp_path / "provisioned-root.json").write_bytes(_metadata("root", 1, "2000-01-01T00:00:00Z"))
    (tmp_path / "root.json").write_bytes(_metadata("root", 3, "2030-01-01T00:00:00Z"))
    (tmp_path / "timestamp.json").write_bytes(_metadata("timestamp", 9, "2029-06-01T00:00:00Z"))
    (tmp_path / "snapshot.json").write_bytes(_metadata("snapshot", 9, "2029-01-01T00:00:00Z"))
    (tmp_path / "targets.json").write_bytes(_metadata("targets", 9, "2031-01-01T00:00:00Z"))
    state = store_state(tmp_path)
    assert state.root_version == 3
    assert state.expires == 1861920000.0  # 2029-01-01, the snapshot's
    assert [name for name, _ in state.files] == [
        "provisioned-root.json",
        "root.json",
        "snapshot.json",
        "targets.json",
        "timestamp.json",
    ]


def test_a_store_without_a_timestamp_keeps_nothing(tmp_path: Path) -> None:
    (tmp_path / "root.json").write_bytes(_metadata("root", 1, "2030-01-01T00:00:00Z"))
    with pytest.raises(ValueError, match="holds no timestamp"):
        store_state(tmp_path)
