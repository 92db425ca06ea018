"""When a device's maintenance window is open, in the device's own time zone.

A window (:class:`~protocol.api.rollouts.MaintenanceWindow`) is wall-clock
time: ``Mon-Fri 02:00-05:00`` is open while a clock on the wall where the
device stands shows a weekday between 02:00 and 05:00 (a window whose end is
not after its start runs past midnight, and counts as the day it opened). The
zone is the device's own (``Device.timezone``, an IANA name given at its
registration or enrolment) when it has one, the window's otherwise.
Across daylight-saving changes the wall clock rules: on the night the clocks
skip 02:00–03:00 that window opens at 03:00 and lasts two hours; on the night
they repeat 02:00–03:00 it lasts four.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from protocol.api.rollouts import MaintenanceWindow, known_zone

# A window opens on at least one day a week: the next opening is within 8 days.
_DAYS_AHEAD = 8


def zone_of(window: MaintenanceWindow, device_tz: str | None) -> ZoneInfo:
    """The zone a device's window is read in: its own if it has a known one."""
    if device_tz and known_zone(device_tz):
        return ZoneInfo(device_tz)
    return window.tz


def in_window(window: MaintenanceWindow, now_utc: datetime, device_tz: str | None = None) -> bool:
    """Whether the window is open at ``now_utc`` (timezone-aware) for a device in ``device_tz``."""
    return _open_on_wall(window, _aware(now_utc).astimezone(zone_of(window, device_tz)))


def next_open(window: MaintenanceWindow, now_utc: datetime, tz: str | None = None) -> datetime:
    """The first instant from ``now_utc`` on when the window is open, in UTC."""
    now = _aware(now_utc).astimezone(UTC)
    zone = zone_of(window, tz)
    if _open_on_wall(window, now.astimezone(zone)):
        return now
    today = now.astimezone(zone).date()
    days = window.weekdays
    openings = [
        opening
        for offset in range(_DAYS_AHEAD)
        if (day := today + timedelta(days=offset)).weekday() in days
        for opening in _openings(window, day, zone)
        if opening >= now
    ]
    if not openings:  # a window always opens within the week
        raise AssertionError(f"{window} does not open within {_DAYS_AHEAD} days of {now}")
    return min(openings)


def _openings(window: MaintenanceWindow, day: date, zone: ZoneInfo) -> list[datetime]:
    """The instants the window opening on ``day`` opens: one, or two if the hour repeats."""
    found = []
    for fold in (0, 1):
        wall = datetime.combine(day, window.start, tzinfo=zone).replace(fold=fold)
        instant = wall.astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) != wall.replace(tzinfo=None):
            # The start falls in a skipped hour: it opens when the clocks jump past it.
            instant = _clocks_jump(wall, zone)
        if _open_on_wall(window, instant.astimezone(zone)):
            found.append(instant)
    return found


def _clocks_jump(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant the clocks jump over the non-existent local time ``wall``."""
    before = wall.replace(fold=1).astimezone(UTC)  # read with the offset after: an earlier instant
    after = wall.replace(fold=0).astimezone(UTC)  # read with the offset before: a later one
    naive = wall.replace(tzinfo=None)
    low, high = int(before.timestamp()), int(after.timestamp())
    while high - low > 1:  # the local time goes from before ``wall`` to after it in (low, high]
        middle = (low + high) // 2
        local = datetime.fromtimestamp(middle, UTC).astimezone(zone).replace(tzinfo=None)
        low, high = (low, middle) if local >= naive else (middle, high)
    return datetime.fromtimestamp(high, UTC)


def _open_on_wall(window: MaintenanceWindow, local: datetime) -> bool:
    clock = local.time().replace(tzinfo=None)
    day = local.weekday()
    if window.start < window.end:
        return day in window.weekdays and window.start <= clock < window.end
    opened_today = day in window.weekdays and clock >= window.start
    opened_yesterday = (day - 1) % 7 in window.weekdays and clock < window.end
    return opened_today or opened_yesterday


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment} has no time zone; pass an aware datetime (UTC)")
    return moment
