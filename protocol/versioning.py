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


def default_release_counter(version: str) -> int:
    """Map a version to a counter that grows with it: ``1.4.2`` -> ``1_004_002``.

    Each component must stay below 1000 for the mapping to be monotonic; a
    version outside that needs an explicit counter.
    """
    semver = parse_semver(version)
    parts = (semver.major, semver.minor, semver.patch)
    if any(p >= _COMPONENT_LIMIT for p in parts):
        raise ValueError(
            f"version {version} has a component of {_COMPONENT_LIMIT} or more; "
            "give the release counter explicitly"
        )
    return semver.major * 1_000_000 + semver.minor * 1_000 + semver.patch
