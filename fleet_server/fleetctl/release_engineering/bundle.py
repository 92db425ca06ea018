"""``fleetctl bundle``: build a bundle from a model and its baseline, and show one."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

from fleet_server.fleetctl.commands import add_command, add_group
from fleet_server.fleetctl.errors import CommandError
from fleet_server.fleetctl.render import emit
from fleet_server.release.bundle_builder import (
    BundleSpec,
    build_bundle,
    load_feature_file,
    parse_safe_default,
)
from protocol.bundle import read_bundle
from protocol.manifest import Manifest, ResourceBudget


def cmd_bundle_build(args: argparse.Namespace) -> None:
    model_path = Path(args.model)
    try:
        model = model_path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read the model {model_path}: {exc.strerror}") from None
    features = classes = None
    if args.features:
        features, classes = load_feature_file(Path(args.features))
    safe_default = None
    if args.safe_default:
        source = Path(args.safe_default)
        text = source.read_text() if source.exists() else args.safe_default
        safe_default = parse_safe_default(text)
    spec = BundleSpec(
        name=args.name,
        version=args.version,
        hardware_ids=args.hardware,
        release_counter=args.release_counter,
        min_agent_version=args.min_agent_version,
        description=args.description,
        feature_specs=features,
        classes=args.classes.split(",") if args.classes else classes,
        confidence_threshold=args.confidence_threshold,
        temperature=args.temperature,
        safe_default=safe_default,
        budget=ResourceBudget(max_latency_ms=args.max_latency_ms, max_memory_mb=args.max_memory_mb),
    )
    calibration = Path(args.calibration) if args.calibration else None
    built = build_bundle(model, Path(args.baseline), spec, calibration=calibration)
    out = _bundle_destination(args.out, f"{built.manifest.name}-{built.manifest.version}.bundle")
    try:
        built.write(out)
    except OSError as exc:
        raise CommandError(f"cannot write the bundle {out}: {exc.strerror}") from None
    m = built.manifest
    emit(
        args,
        {
            "bundle": str(out),
            "name": m.name,
            "version": m.version,
            "release_counter": m.release_counter,
            "sha256": _sha256(out),
            "calibration_rows": (
                m.baseline.calibration.reference_rows if m.baseline.calibration else None
            ),
        },
        f"Built {out}: {m.name} {m.version} (release counter {m.release_counter}) for "
        f"{', '.join(m.hardware_ids)}; {len(m.features)} features, {m.golden.count} golden vectors"
        + _calibration_note(m),
    )


def _bundle_destination(out_arg: str, file_name: str) -> Path:
    """Where ``--out`` puts the bundle: a folder (trailing slash or existing) gets FILE_NAME.

    A folder is created with its parents; a file path gets its parent folders too,
    so ``--out bundles/`` never becomes a file named ``bundles``.
    """
    out = Path(out_arg)
    is_folder = out_arg.endswith(("/", os.sep)) or out.is_dir()
    folder = out if is_folder else out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CommandError(f"cannot write into {folder}: it exists and is not a folder") from None
    except OSError as exc:
        raise CommandError(f"cannot create the folder {folder}: {exc.strerror}") from None
    return folder / file_name if is_folder else out


def _calibration_note(m: Manifest) -> str:
    c = m.baseline.calibration
    if c is None:
        return "; no calibration (accuracy cannot be estimated without labels)"
    return f"; calibrated on {c.reference_rows} labelled rows ({c.reference_accuracy:.1%} right)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cmd_bundle_inspect(args: argparse.Namespace) -> None:
    path = Path(args.bundle)
    try:
        with path.open("rb") as f:
            manifest, _ = read_bundle(f)
    except FileNotFoundError:
        raise CommandError(f"bundle {path} does not exist") from None
    emit(args, manifest.model_dump(mode="json"), describe_manifest(manifest))


def describe_manifest(m: Manifest) -> str:
    """A human description of a manifest."""

    def tensor(t: Any) -> str:
        return f"{t.name} {t.dtype}{t.shape_signature}"

    lines = [
        f"{m.name} {m.version}  (release counter {m.release_counter}, schema {m.schema_version})",
        f"  hardware:       {', '.join(m.hardware_ids)}",
        f"  min agent:      {m.min_agent_version}",
        f"  model:          {m.model_file}  {m.files[m.model_file].length} bytes  "
        f"sha256 {m.files[m.model_file].sha256[:16]}…",
        f"  inputs:         {'; '.join(tensor(t) for t in m.inputs)}",
        f"  outputs:        {'; '.join(tensor(t) for t in m.outputs)}",
    ]
    if m.classes:
        lines.append(f"  classes:        {', '.join(m.classes)}")
    lines.append(
        f"  summary:        {', '.join(f'{d.input}: {d.method}' for d in m.derivations)}; "
        f"baseline {m.baseline.rows} rows, bins {m.baseline.id[:19]}…"
    )
    lines.append(f"  calibration:    {_calibration_note(m).removeprefix('; ')}")
    lines.append(
        f"  self-test:      {m.golden.count} golden vectors (atol {m.golden.atol}, "
        f"rtol {m.golden.rtol}); budget {m.budget.max_latency_ms} ms, {m.budget.max_memory_mb} MB"
    )
    lines.append(
        f"  fallback:       escalate below {m.fallback.confidence_threshold} on "
        f"{m.fallback.confidence_output or '-'} (temperature {m.fallback.temperature:g}); "
        "safe default "
        + "; ".join(
            f"{k}={[round(v, 3) for v in vals]}" for k, vals in m.fallback.safe_default.items()
        )
    )
    lines.append("  features:")
    width = max(len(f.name) for f in m.features)
    for spec, base in zip(m.features, m.baseline.features, strict=True):
        s = base.summary
        valid = ""
        if spec.valid_min is not None or spec.valid_max is not None:
            valid = f"  valid [{spec.valid_min}, {spec.valid_max}]"
        lines.append(
            f"    {spec.name:<{width}}  mean {s.mean:>10.4g}  sd {s.variance**0.5:>9.4g}  "
            f"range [{s.min:.4g}, {s.max:.4g}]  {len(s.counts)} bins{valid}"
            + (f" {spec.unit}" if spec.unit else "")
        )
    return "\n".join(lines)


def add_commands(groups: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``bundle build|inspect``."""
    bundle = add_group(groups, "bundle", "model bundles")
    p = add_command(
        bundle,
        "build",
        cmd_bundle_build,
        parents,
        "build a bundle from a .tflite model and baseline data",
        "fleetctl bundle build firmware_images/models/v1.tflite --name pump-health "
        "--version 1.0.0 --hardware rpi4-arm64 --baseline firmware_images/models/baseline.npy "
        "--out bundles/",
        "fleetctl bundle build firmware_images/models/v2.tflite --name pump-health "
        "--version 1.1.0 --hardware rpi4-arm64 --baseline firmware_images/models/baseline.npy "
        "--features firmware_images/models/features.json "
        "--calibration firmware_images/models/heldout.npz --temperature 0.9649 --out bundles/",
    )
    p.add_argument("model", help="the .tflite model file")
    p.add_argument("--name", required=True, help="the model's name, e.g. pump-health")
    p.add_argument("--version", required=True, help="the bundle's semantic version, e.g. 1.1.0")
    p.add_argument("--hardware", action="append", required=True, help="hardware id (repeatable)")
    p.add_argument("--baseline", required=True, help=".npy, .npz or .csv baseline data")
    p.add_argument("--out", required=True, help="bundle file or directory")
    p.add_argument(
        "--calibration",
        help=".npz of labelled reference rows (inputs and 'labels') the model was not trained "
        "on, for estimating accuracy without labels in the field",
    )
    p.add_argument("--features", help="JSON: feature names, units, valid ranges, classes")
    p.add_argument("--classes", help="comma-separated class labels of the score output")
    p.add_argument(
        "--release-counter",
        type=int,
        help="the counter devices compare to refuse rollbacks (default: derived from the version)",
    )
    p.add_argument(
        "--min-agent-version",
        default="0.1.0",
        help="oldest agent that may install it (default %(default)s)",
    )
    p.add_argument("--description", default="", help="a free-form description for people")
    p.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.6,
        help="top score below which a request goes to the next fallback stage (default "
        "%(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="calibration temperature of the score output, softmax(log(p) / T), fitted on "
        "labelled rows (default %(default)s: scores as given; the sample models' are in "
        "firmware_images/models/models.json)",
    )
    p.add_argument(
        "--safe-default",
        help='JSON or a JSON file: {"output": [values]}, the answer when every stage fails',
    )
    p.add_argument(
        "--max-latency-ms",
        type=float,
        default=100.0,
        help="self-test latency budget in milliseconds (default %(default)s)",
    )
    p.add_argument(
        "--max-memory-mb",
        type=float,
        default=64.0,
        help="self-test memory budget in MB (default %(default)s)",
    )
    p = add_command(
        bundle,
        "inspect",
        cmd_bundle_inspect,
        parents,
        "show a bundle's manifest",
        "fleetctl bundle inspect bundles/pump-health-1.1.0.bundle",
        "fleetctl bundle inspect bundles/pump-health-1.1.0.bundle --json",
    )
    p.add_argument("bundle", help="the .bundle file")
