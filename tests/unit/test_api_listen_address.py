"""The local API binds an address given as digits without asking the resolver."""

from __future__ import annotations

import socket

import pytest

from agent.api.http import _numeric_address


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", (socket.AF_INET, ("127.0.0.1", 8500))),
        ("0.0.0.0", (socket.AF_INET, ("0.0.0.0", 8500))),
        ("::1", (socket.AF_INET6, ("::1", 8500, 0, 0))),
        ("::", (socket.AF_INET6, ("::", 8500, 0, 0))),
    ],
)
def test_addresses_in_digits_are_bound_as_given(host: str, expected: object) -> None:
    assert _numeric_address(host, 8500) == expected


@pytest.mark.parametrize("host", ["localhost", "", "pump-18.local", "fe80::1%eth0", "1.2.3"])
def test_names_and_partial_addresses_go_to_the_resolver(host: str) -> None:
    assert _numeric_address(host, 8500) is None
