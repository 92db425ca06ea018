"""The contract the agent and the fleet server share: data models and pure functions.

No sockets, no disk paths, no clocks: everything here is data and math. Names
are imported on first use, so a device that only needs the manifest does not
pay for the bundle format's tar and zip support.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BundleFormatError": "protocol.bundle",
    "read_bundle": "protocol.bundle",
    "read_manifest": "protocol.bundle",
    "write_bundle": "protocol.bundle",
    "InputDerivation": "protocol.derivation",
    "derive_features": "protocol.derivation",
    "MANIFEST_SCHEMA_VERSION": "protocol.manifest",
    "Baseline": "protocol.manifest",
    "FallbackPolicy": "protocol.manifest",
    "FeatureSpec": "protocol.manifest",
    "Manifest": "protocol.manifest",
    "TensorSpec": "protocol.manifest",
    "bundle_target_path": "protocol.manifest",
    "FeatureSummary": "protocol.summary",
    "ScoreHistogram": "protocol.summary",
    "merge": "protocol.summary",
    "summarize": "protocol.summary",
    "default_release_counter": "protocol.versioning",
    "parse_semver": "protocol.versioning",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
