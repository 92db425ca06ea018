"""Semantic versions and release counters.

A bundle carries both a human version (``1.4.2``) and a release counter, the
monotonic integer that the device's rollback protection compares (Uptane's
"release counter"). By default the counter is derived from the version so that
a higher version always means a higher counter; a release engineer may set it
explicitly, e.g. to re-release an older model above the current counter.
"""

from __future__ import annotations

import re
from typing import NamedTuple

SEMVER_PATTERN = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
# Names that end up in target paths and topics: short, lowercase, no separators.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HARDWARE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")

_COMPONENT_LIMIT = 1000


class SemVer(NamedTuple):
    """A parsed semantic version (build metadata is not accepted)."""

    major: int
    minor: int
    patch: int
    prerelease: str | None = None

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{self.prerelease}" if self.prerelease else core


def parse_semver(text: str) -> SemVer:
    """Parse ``MAJOR.MINOR.PATCH[-PRERELEASE]``; raise ``ValueError`` otherwise."""
    match = SEMVER_PATTERN.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a semantic version such as 1.2.3")
    major, minor, patch, pre = match.groups()
    return SemVer(int(major), int(minor), int(patch), pre)


# Each MAJOR.MINOR.PATCH owns COUNTER_SLOTS consecutive counters: the release
# itself takes the top one and its pre-releases the ones below, so that a
# pre-release orders below its release (semver precedence) and above the
# previous release.
COUNTER_SLOTS = 1000
RELEASE_SLOT = COUNTER_SLOTS - 1
_STAGE_BASE = {"alpha": 0, "beta": 300, "rc": 600}
_STAGE_WIDTH = 300
_PRERELEASE_PATTERN = re.compile(r"^(alpha|beta|rc)(?:\.?(0|[1-9]\d*))?$")


def prerelease_slot(prerelease: str | None) -> int:
    """The slot of a pre-release within its version's counters (a release: ``RELEASE_SLOT``).

    ``alpha``, ``beta`` and ``rc``, alone or numbered (``rc.2`` or ``rc2``), in
    semver order: ``alpha`` < ``alpha.1`` < ``beta`` < ``rc`` < ``rc.1`` < ``rc.2``.
    Raise ``ValueError`` for anything else, which needs an explicit counter.
    """
    if prerelease is None:
        return RELEASE_SLOT
    match = _PRERELEASE_PATTERN.match(prerelease)
    number = int(match.group(2)) + 1 if match and match.group(2) is not None else 0
    if match is None or number >= _STAGE_WIDTH:
        raise ValueError(
            f"the pre-release {prerelease!r} has no default release counter (use alpha, beta "
            f"or rc, optionally numbered below {_STAGE_WIDTH - 1}, e.g. rc.1); "
            "give the release counter explicitly"
        )
    return _STAGE_BASE[match.group(1)] + number


def default_release_counter(version: str) -> int:
    """Map a version to a counter that grows with it in semver precedence.

    ``(MAJOR*10^6 + MINOR*10^3 + PATCH) * 1000 + SLOT``, where SLOT is 999 for
    a release and below it for pre-releases: ``1.4.2`` -> ``1_004_002_999``,
    ``1.4.2-rc.1`` -> ``1_004_002_602``. Each component must stay below 1000
    for the mapping to be monotonic; a version outside that needs an explicit
    counter.
    """
    semver = parse_semver(version)
    parts = (semver.major, semver.minor, semver.patch)
    if any(p >= _COMPONENT_LIMIT for p in parts):
        raise ValueError(
            f"version {version} has a component of {_COMPONENT_LIMIT} or more; "
            "give the release counter explicitly"
        )
    core = semver.major * 1_000_000 + semver.minor * 1_000 + semver.patch
    return core * COUNTER_SLOTS + prerelease_slot(semver.prerelease)
