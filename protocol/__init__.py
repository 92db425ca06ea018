"""The contract the agent and the fleet server share: data models and pure functions.

No sockets, no disk paths, no clocks: everything here is data and math.
"""

from protocol.bundle import BundleFormatError, read_bundle, read_manifest, write_bundle
from protocol.derivation import InputDerivation, derive_features
from protocol.manifest import (
    MANIFEST_SCHEMA_VERSION,
    Baseline,
    FallbackPolicy,
    FeatureSpec,
    Manifest,
    TensorSpec,
    bundle_target_path,
)
from protocol.summary import FeatureSummary, ScoreHistogram, merge, summarize
from protocol.versioning import default_release_counter, parse_semver

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "Baseline",
    "BundleFormatError",
    "FallbackPolicy",
    "FeatureSpec",
    "FeatureSummary",
    "InputDerivation",
    "Manifest",
    "ScoreHistogram",
    "TensorSpec",
    "bundle_target_path",
    "default_release_counter",
    "derive_features",
    "merge",
    "parse_semver",
    "read_bundle",
    "read_manifest",
    "summarize",
    "write_bundle",
]
