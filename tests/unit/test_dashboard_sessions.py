"""Dashboard sessions: opened by a token, ended by logout or age, actions need the CSRF token."""

from __future__ import annotations

from fleet_server.dashboard.pages import _safe_next, device_state
from fleet_server.dashboard.sessions import Sessions, cookie_attributes, csrf_valid
from protocol.api.devices import DeviceView


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_found_by_its_id_and_never_by_its_token() -> None:
    sessions = Sessions(clock=Clock())
    opened = sessions.open("tok-1.secret")
    assert sessions.get(opened.id) == opened
    assert sessions.get("tok-1.secret") is None
    assert sessions.get(None) is None and sessions.get("") is None
    assert opened.id != opened.csrf and "secret" not in opened.id


def test_each_session_has_its_own_id_and_csrf_token() -> None:
    sessions = Sessions(clock=Clock())
    a, b = sessions.open("tok-1.s"), sessions.open("tok-1.s")
    assert a.id != b.id and a.csrf != b.csrf
    assert not csrf_valid(a, b.csrf)


def test_a_session_ends_at_logout() -> None:
    sessions = Sessions(clock=Clock())
    opened = sessions.open("tok-1.s")
    sessions.close(opened.id)
    assert sessions.get(opened.id) is None
    sessions.close(opened.id)  # twice is nothing
    sessions.close(None)


def test_a_session_expires_after_its_ttl() -> None:
    clock = Clock()
    sessions = Sessions(ttl_s=60, clock=clock)
    opened = sessions.open("tok-1.s")
    clock.now += 59
    assert sessions.get(opened.id) == opened
    clock.now += 1
    assert sessions.get(opened.id) is None


def test_too_many_sessions_drop_the_oldest() -> None:
    sessions = Sessions(clock=Clock(), max_sessions=2)
    first, second, third = (sessions.open(f"tok-{n}.s") for n in range(3))
    assert sessions.get(first.id) is None
    assert sessions.get(second.id) == second and sessions.get(third.id) == third


def test_the_csrf_token_must_be_presented_exactly() -> None:
    opened = Sessions(clock=Clock()).open("tok-1.s")
    assert csrf_valid(opened, opened.csrf)
    for wrong in (None, "", opened.csrf[:-1], opened.csrf + "x", opened.id):
        assert not csrf_valid(opened, wrong), wrong


def test_the_cookie_is_httponly_and_strict_and_secure_only_over_tls() -> None:
    plain = cookie_attributes(secure=False)
    assert plain["httponly"] is True and plain["samesite"] == "Strict"
    assert plain["secure"] is False
    assert cookie_attributes(secure=True)["secure"] is True


def test_after_login_only_a_dashboard_path_is_followed() -> None:
    assert _safe_next("/dashboard/rollouts/ro-1") == "/dashboard/rollouts/ro-1"
    for elsewhere in (
        None,
        "",
        "https://evil.example/",
        "//evil.example",
        "/dashboard//evil",
        "/api/v1/tokens",
        "/dashboard\\..\\x",
    ):
        assert _safe_next(elsewhere) == "/dashboard", elsewhere


def _device(**fields: object) -> DeviceView:
    base: dict[str, object] = {
        "id": "d1",
        "hardware_id": "hw",
        "enrolled_at": "2026-01-01T00:00:00Z",
        "online": True,
    }
    return DeviceView.model_validate({**base, **fields})


def test_a_devices_state_puts_its_last_outcome_before_its_phase() -> None:
    assert device_state(_device()) == "online"
    assert device_state(_device(online=False)) == "offline"
    assert device_state(_device(phase="downloading")) == "installing"
    assert device_state(_device(phase="idle")) == "online"
    refused = {"last_outcome": {"result": "refused"}}
    assert device_state(_device(phase="trial", reported=refused)) == "failed"
    assert device_state(_device(reported={"last_outcome": {"result": "rolled_back"}})) == (
        "rolled back"
    )
    assert device_state(_device(reported={"last_outcome": {"result": "committed"}})) == "online"
