"""Where an image repository is: a directory (a path or ``file://`` URL) or a web server.

Kept apart from the transport so that deciding costs no HTTP library import.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse


def is_local(base: str) -> bool:
    """Whether ``base`` names a directory (a path or ``file://`` URL)."""
    return "://" not in base or base.startswith("file://")


def local_path(url: str) -> Path:
    """The directory or file a local ``url`` (a path or ``file://`` URL) names."""
    return Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
