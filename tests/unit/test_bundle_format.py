"""The bundle file format: deterministic, and every member bound to the manifest."""

from __future__ import annotations

import io
import tarfile

import pytest

from protocol.bundle import BundleFormatError, file_entry, read_bundle, read_manifest, write_bundle
from protocol.derivation import InputDerivation
from protocol.golden import pack_golden, unpack_golden
from protocol.manifest import (
    Baseline,
    FallbackPolicy,
    FeatureBaseline,
    FeatureSpec,
    GoldenVectors,
    Manifest,
    TensorSpec,
)
from protocol.summary import FeatureSummary
from protocol.versioning import default_release_counter, parse_semver

MODEL = b"TFL3" + bytes(range(200))
GOLDEN = pack_golden({"x": [[1.0, 2.0]]}, {"y": [[0.3, 0.7]]})


def manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = dict(
        name="pump-health",
        version="1.2.3",
        release_counter=1_002_003,
        hardware_ids=["rpi4-arm64"],
        files={"model.tflite": file_entry(MODEL), "golden.npz": file_entry(GOLDEN)},
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 2], shape_signature=[-1, 2])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[1, 2], shape_signature=[-1, 2])],
        derivations=[InputDerivation(input="x", method="elements")],
        features=[FeatureSpec(name="a"), FeatureSpec(name="b", valid_min=0, valid_max=9)],
        baseline=Baseline(
            id="sha256:00",
            rows=10,
            features=[
                FeatureBaseline(
                    edges=[0.5], summary=FeatureSummary(n=10, nan=0, out_of_range=0, counts=[5, 5])
                )
                for _ in range(2)
            ],
        ),
        golden=GoldenVectors(count=1),
        fallback=FallbackPolicy(safe_default={"y": [0.5, 0.5]}, confidence_output="y"),
    )
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def bundle_bytes(m: Manifest | None = None) -> bytes:
    out = io.BytesIO()
    write_bundle(out, m or manifest(), {"model.tflite": MODEL, "golden.npz": GOLDEN})
    return out.getvalue()


def test_round_trip_and_determinism() -> None:
    data = bundle_bytes()
    assert data == bundle_bytes()
    m, members = read_bundle(io.BytesIO(data))
    assert m == manifest()
    assert members["model.tflite"] == MODEL
    inputs, outputs = unpack_golden(members["golden.npz"])
    assert inputs["x"].tolist() == [[1.0, 2.0]] and outputs["y"].tolist() == [[0.3, 0.7]]


def test_altered_member_is_refused() -> None:
    data = bytearray(bundle_bytes())
    data[data.index(MODEL) + 10] ^= 1
    with pytest.raises(BundleFormatError, match=r"model\.tflite does not match"):
        read_bundle(io.BytesIO(bytes(data)))


def test_extra_member_is_refused() -> None:
    out = io.BytesIO(bundle_bytes())
    with tarfile.open(fileobj=out, mode="a") as tar:
        info = tarfile.TarInfo("payload.sh")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"rm "))
    out.seek(0)
    with pytest.raises(BundleFormatError, match="not listed in the manifest"):
        read_bundle(out)


def test_garbage_is_not_a_bundle() -> None:
    with pytest.raises(BundleFormatError, match="not a bundle"):
        read_manifest(io.BytesIO(b"hello" * 100))


def test_truncated_bundle_is_refused() -> None:
    with pytest.raises(BundleFormatError):
        read_bundle(io.BytesIO(bundle_bytes()[:1500]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Pump Health"}, "name must be"),
        ({"version": "1.2"}, "not a semantic version"),
        ({"hardware_ids": []}, "at least 1"),
        ({"hardware_ids": ["a b"]}, "hardware id"),
        ({"release_counter": 0}, "greater than or equal to 1"),
        ({"fallback": FallbackPolicy(safe_default={"z": [1.0]})}, "every output"),
        ({"features": [FeatureSpec(name="a")]}, "differ in length"),
    ],
)
def test_invalid_manifests_are_refused_with_the_field(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        manifest(**change)


def test_unknown_schema_version_is_refused() -> None:
    raw = bundle_bytes().replace(b'"schema_version": 1', b'"schema_version": 9')
    with pytest.raises(BundleFormatError, match="schema_version"):
        read_manifest(io.BytesIO(raw))


def test_release_counter_follows_the_version() -> None:
    assert default_release_counter("1.2.3") < default_release_counter("1.10.0")
    assert default_release_counter("2.0.0") == 2_000_000_999
    with pytest.raises(ValueError, match="explicitly"):
        default_release_counter("1.1000.0")
    assert str(parse_semver("1.0.0-rc.1")) == "1.0.0-rc.1"


def test_pre_releases_order_below_their_release_in_semver_precedence() -> None:
    versions = [
        "1.1.9",
        "1.2.0-alpha",
        "1.2.0-alpha.1",
        "1.2.0-beta",
        "1.2.0-beta.2",
        "1.2.0-rc",
        "1.2.0-rc.0",
        "1.2.0-rc1",
        "1.2.0-rc.2",
        "1.2.0-rc.298",
        "1.2.0",
        "1.2.1-alpha",
        "1.2.1",
    ]
    counters = [default_release_counter(v) for v in versions]
    assert counters == sorted(set(counters))
    assert default_release_counter("1.2.0-rc1") == 1_002_000_602
    assert default_release_counter("1.2.0") == 1_002_000_999


@pytest.mark.parametrize("version", ["1.2.0-dev", "1.2.0-rc.299", "1.2.0-rc.1.hotfix"])
def test_a_pre_release_without_a_default_counter_asks_for_an_explicit_one(version: str) -> None:
    with pytest.raises(ValueError, match="give the release counter explicitly"):
        default_release_counter(version)
