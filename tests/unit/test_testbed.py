"""The testbed's own parts: waits with a deadline, observation windows, the directory server."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest
import urllib3

from testbed.http_repo import RepositoryServer, serve_directory
from testbed.waiting import WaitTimeout, free_port, observe_for, wait_until


def test_wait_until_returns_what_the_probe_found() -> None:
    calls = itertools.count()
    assert wait_until("the third call", lambda: next(calls) >= 2 and "found", every=0) == "found"


def test_wait_until_names_what_it_waited_for_at_the_deadline() -> None:
    with pytest.raises(WaitTimeout, match="waiting for the answer"):
        wait_until("the answer", lambda: None, timeout=0, every=0)
    with pytest.raises(RuntimeError, match="waiting for the answer"):
        wait_until("the answer", lambda: None, timeout=0, every=0, failure=RuntimeError)


def test_observe_for_ends_at_the_first_sign_of_what_must_not_happen() -> None:
    calls = itertools.count()
    assert observe_for(60, lambda: next(calls) == 1 and "seen", every=0) == "seen"


def test_observe_for_returns_the_last_observation_when_nothing_happened() -> None:
    assert observe_for(0, lambda: []) == []


def test_a_free_port_can_be_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_the_directory_server_answers_ranges_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"0123456789")
    http = urllib3.PoolManager(retries=False)
    with serve_directory(tmp_path) as url:
        whole = http.request("GET", f"{url}/sub/data.bin")
        assert (whole.status, whole.data) == (200, b"0123456789")
        tail = http.request("GET", f"{url}/sub/data.bin", headers={"Range": "bytes=4-"})
        assert (tail.status, tail.data) == (206, b"456789")
        assert tail.headers["Content-Range"] == "bytes 4-9/10"
        assert http.request("GET", f"{url}/sub/missing.bin").status == 404


def test_a_fault_still_applies_past_the_streamed_path(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"abc")
    server = RepositoryServer(tmp_path)
    try:
        server.faults.extra_bytes = 2
        r = urllib3.PoolManager(retries=False).request("GET", f"{server.url}/data.bin")
        assert r.data == b"abc\0\0"
    finally:
        server.close()
