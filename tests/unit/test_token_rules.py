"""The rules of operators' tokens, without a database: roles, the bearer's form, revocation."""

from __future__ import annotations

import pytest

from fleet_server.devices.store import secret_hash
from fleet_server.tokens.rules import (
    InvalidToken,
    LastAdminToken,
    Principal,
    RoleTooLow,
    StoredToken,
    TokenError,
    TokenRevoked,
    admit,
    check_revoke,
    check_role,
    parse_bearer,
    role_allows,
)
from protocol.api.tokens import ROLES

TOKEN = StoredToken("0123456789abcdef", "ci", "operator", secret_hash("s3cret"), revoked=False)


@pytest.mark.parametrize(
    ("have", "allowed"),
    [
        ("viewer", {"viewer"}),
        ("operator", {"viewer", "operator"}),
        ("admin", {"viewer", "operator", "admin"}),
        ("root", set()),
        ("", set()),
    ],
)
def test_a_role_may_do_what_it_and_the_roles_below_it_may(have: str, allowed: set[str]) -> None:
    assert {need for need in ROLES if role_allows(have, need)} == allowed


def test_a_caller_below_the_role_needed_is_refused_naming_both() -> None:
    viewer = Principal("0123456789abcdef", "dashboard", "viewer")
    viewer.require("viewer")
    with pytest.raises(RoleTooLow, match=r"needs the operator role.*'dashboard' is viewer"):
        viewer.require("operator")
    Principal("0123456789abcdef", "root", "admin").require("operator")


def test_the_actor_names_the_token_and_is_bounded() -> None:
    assert Principal("abc", "ci", "admin").actor == "token:abc:ci"
    assert len(Principal("abc", "n" * 200, "admin").actor) == 128


def test_only_the_three_roles_can_be_given() -> None:
    for role in ROLES:
        check_role(role)
    with pytest.raises(TokenError, match="viewer, operator, admin"):
        check_role("root")


@pytest.mark.parametrize(
    ("bearer", "parsed"),
    [
        ("0123456789abcdef.s3cret", ("0123456789abcdef", "s3cret")),
        ("a.b", ("a", "b")),
        ("id_-1.sec-ret_", ("id_-1", "sec-ret_")),
        ("i" * 32 + "." + "s" * 128, ("i" * 32, "s" * 128)),
    ],
)
def test_a_bearer_is_id_dot_secret(bearer: str, parsed: tuple[str, str]) -> None:
    assert parse_bearer(bearer) == parsed


@pytest.mark.parametrize(
    "bearer",
    [
        "",
        "nodot",
        ".secret",
        "id.",
        "id.sec.ret",
        "id.secret\n",
        "i d.secret",
        "id.s\u00e9cret",
        "i" * 33 + ".secret",
        "id." + "s" * 129,
        "'; DROP TABLE api_tokens; --.x",
    ],
)
def test_a_malformed_bearer_is_refused_before_any_lookup(bearer: str) -> None:
    with pytest.raises(InvalidToken, match=r"malformed; expected ID\.SECRET"):
        parse_bearer(bearer)


def test_the_right_secret_of_a_live_token_admits_its_holder() -> None:
    assert admit(secret_hash("s3cret"), TOKEN) == Principal("0123456789abcdef", "ci", "operator")


def test_a_wrong_secret_or_an_unknown_token_is_unknown() -> None:
    with pytest.raises(InvalidToken, match="unknown"):
        admit(secret_hash("guess"), TOKEN)
    with pytest.raises(InvalidToken, match="unknown"):
        admit(secret_hash("s3cret"), None)


def test_a_revoked_token_is_refused_even_with_its_secret() -> None:
    revoked = StoredToken(TOKEN.id, TOKEN.name, TOKEN.role, TOKEN.secret_hash, revoked=True)
    with pytest.raises(InvalidToken, match="was revoked"):
        admit(secret_hash("s3cret"), revoked)
    with pytest.raises(InvalidToken, match="unknown"):
        admit(secret_hash("guess"), revoked)


def test_the_last_live_admin_token_cannot_be_revoked() -> None:
    with pytest.raises(LastAdminToken, match="last admin token; create another first"):
        check_revoke("a1", "admin", revoked=False, live_admins=1)
    check_revoke("a1", "admin", revoked=False, live_admins=2)


def test_tokens_below_admin_are_revoked_whatever_the_admins() -> None:
    check_revoke("o1", "operator", revoked=False, live_admins=0)
    check_revoke("v1", "viewer", revoked=False, live_admins=1)


def test_a_token_is_revoked_once() -> None:
    for role, admins in (("viewer", 5), ("admin", 0), ("admin", 3)):
        with pytest.raises(TokenRevoked, match="already revoked"):
            check_revoke("t1", role, revoked=True, live_admins=admins)
