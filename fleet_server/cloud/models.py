"""The cloud models: released, signed and verified exactly as a device's.

Each refresh (:meth:`ModelSource.refresh`, blocking: run it in a thread):

1. python-tuf's ``ngclient`` refreshes the image repository's metadata from
   the trusted root (signatures, thresholds, versions, expiry: TUF client
   workflow 5.3-5.6), keeping the verified copies in ``metadata_dir``;
2. per bundle name, the target released for this endpoint's hardware id with
   the highest release counter is chosen (:func:`protocol.signed_bundle.newest_by_name`);
3. a chosen bundle not already served is downloaded through python-tuf (its
   signed length and every signed hash), read (every member against the
   manifest's sha256), its manifest compared with the signed fields, its model
   loaded, its tensors compared with the manifest's, and its answers to the
   bundle's golden vectors checked within the manifest's tolerance (as a
   device's self-test does).

A bundle that fails any step is refused, logged and counted by reason, and
the model it would have replaced keeps serving; a repository that cannot be
refreshed leaves every model as it was.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from fleet_server.release.verify import DirectoryFetcher
from model_runtime import LoadedModel, ModelLoadError, ModelRunError
from protocol.bundle import BundleFormatError, read_bundle
from protocol.golden import golden_disagreement, unpack_golden
from protocol.manifest import Manifest
from protocol.signed_bundle import (
    SignedFields,
    SignedFieldsError,
    manifest_disagreement,
    newest_by_name,
    signed_fields,
)
from protocol.validation import InputContract

RefusalReason = Literal[
    "metadata",
    "signed_fields",
    "download",
    "bundle",
    "manifest_mismatch",
    "load",
    "contract",
    "golden",
]
MODEL_REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = (
    "metadata",
    "signed_fields",
    "download",
    "bundle",
    "manifest_mismatch",
    "load",
    "contract",
    "golden",
)


# The root the trust store was provisioned with, kept beside the (possibly newer) root.json.
PROVISIONED_ROOT = "provisioned-root.json"


class ModelRefused(Exception):
    """A release the endpoint will not serve; ``reason`` is a short stable code."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason


@dataclass(frozen=True)
class SignedTarget(SignedFields):
    """An image-repository target: its signed bundle fields, path, length and hashes."""

    path: str = ""
    length: int = 0
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CloudModel:
    """A verified, loaded model the endpoint serves, with the contract requests are checked by."""

    target: SignedTarget
    manifest: Manifest
    model: LoadedModel
    contract: InputContract

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


@dataclass(frozen=True)
class RefreshReport:
    """What one refresh did: models newly served, releases refused (by name), models withdrawn."""

    loaded: list[CloudModel]
    refused: list[tuple[str, ModelRefused]]
    withdrawn: list[CloudModel]


Loader = Callable[[bytes], LoadedModel]


class ModelSource:
    """Reads the image repository and keeps the newest verified model of each name.

    ``loader`` turns a model file's bytes into a runnable model (the TFLite
    runtime). ``models`` is replaced as a whole on each change, so a reader
    on the event loop always sees a consistent mapping.
    """

    def __init__(
        self,
        *,
        repository: str,
        trusted_root: Path,
        metadata_dir: Path,
        hardware_id: str,
        loader: Loader,
    ) -> None:
        base = repository.rstrip("/")
        self._fetcher: FetcherInterface | None = None
        if not base.startswith(("http://", "https://")):
            base = Path(base.removeprefix("file://")).resolve().as_uri()
            self._fetcher = DirectoryFetcher()
        self._metadata_url = f"{base}/metadata/"
        self._targets_url = f"{base}/targets/"
        self.trusted_root = trusted_root
        self.metadata_dir = metadata_dir
        self.hardware_id = hardware_id
        self._loader = loader
        self.models: dict[str, CloudModel] = {}
        self._update: Updater | None = None
        # Target paths refused for what their signed bytes hold: not downloaded again.
        self._condemned: dict[str, ModelRefused] = {}

    def refresh(self) -> RefreshReport:
        """Verify the repository and load what changed; refusals are reported, never raised."""
        refused: list[tuple[str, ModelRefused]] = []
        try:
            chosen = self._chosen_targets(refused)
        except ModelRefused as exc:
            return RefreshReport([], [("*", exc)], [])
        loaded: list[CloudModel] = []
        # A name no longer released for this hardware is no longer served.
        models = {name: m for name, m in self.models.items() if name in chosen}
        withdrawn = [m for name, m in self.models.items() if name not in chosen]
        for name, target in sorted(chosen.items()):
            held = models.get(name)
            if held is not None and held.target.path == target.path:
                continue
            if target.path in self._condemned:
                continue
            try:
                model = self._load(target)
            except ModelRefused as exc:
                refused.append((name, exc))
                if exc.reason != "download":  # the bytes were the signed ones: do not retry
                    self._condemned[target.path] = exc
                continue
            models[name] = model
            loaded.append(model)
        self.models = models
        return RefreshReport(loaded, refused, withdrawn)

    def _updater(self) -> Updater:
        """An updater on the trust store, provisioned from ``trusted_root`` the first time.

        The store keeps the root it was provisioned with; a different
        ``trusted_root`` given later is refused, never silently ignored (the
        store's newer roots were verified from the first one, not from it).
        """
        root = self.metadata_dir / "root.json"
        provisioned = self.metadata_dir / PROVISIONED_ROOT
        given = self.trusted_root.read_bytes()
        if provisioned.exists() and provisioned.read_bytes() != given:
            raise ModelRefused(
                "metadata",
                f"the trusted root {self.trusted_root} is not the one the trust store "
                f"{self.metadata_dir} was provisioned with ({provisioned}); use that root, "
                "or a new metadata directory to start over from this one",
            )
        if not root.exists():
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            provisioned.write_bytes(given)
            root.write_bytes(given)
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=self._metadata_url,
            target_dir=str(self.metadata_dir / "targets"),
            target_base_url=self._targets_url,
            fetcher=self._fetcher,
            bootstrap=None,  # the trusted root is the one in metadata_dir
        )

    def _chosen_targets(self, refused: list[tuple[str, ModelRefused]]) -> dict[str, SignedTarget]:
        try:
            self._update = self._updater()
            self._update.refresh()
            targets: Metadata[Targets] = Metadata.from_file(str(self.metadata_dir / "targets.json"))
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise ModelRefused(
                "metadata", f"the image repository's metadata does not verify: {exc}"
            ) from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelRefused("metadata", f"cannot read the image repository: {exc}") from None
        signed: list[SignedTarget] = []
        for path, info in targets.signed.targets.items():
            try:
                fields = signed_fields(path, info.custom)
            except SignedFieldsError as exc:
                if path not in self._condemned:
                    self._condemned[path] = ModelRefused("signed_fields", str(exc))
                    refused.append((path, self._condemned[path]))
                continue
            signed.append(
                SignedTarget(
                    name=fields.name,
                    version=fields.version,
                    release_counter=fields.release_counter,
                    hardware_ids=fields.hardware_ids,
                    path=path,
                    length=info.length,
                    hashes=dict(info.hashes),
                )
            )
        return newest_by_name(signed, self.hardware_id)

    def _load(self, target: SignedTarget) -> CloudModel:
        what = f"{target.name} {target.version} ({target.path})"
        assert self._update is not None  # set by the refresh that chose the target
        try:
            info = self._update.get_targetinfo(target.path)
            if info is None:
                raise ModelRefused("download", f"{what}: no longer signed")
            path = self._update.find_cached_target(info) or self._update.download_target(info)
            raw = Path(path).read_bytes()
        except tuf_exc.LengthOrHashMismatchError as exc:
            raise ModelRefused(
                "download",
                f"{what}: what arrived differs from the signed length and hashes ({exc})",
            ) from None
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError) as exc:
            raise ModelRefused("download", f"{what}: cannot download it: {exc}") from None
        try:
            manifest, members = read_bundle(io.BytesIO(raw))
        except BundleFormatError as exc:
            raise ModelRefused("bundle", f"{what}: {exc}") from None
        if (problem := manifest_disagreement(manifest, target)) is not None:
            raise ModelRefused("manifest_mismatch", f"{what}: {problem}")
        try:
            model = self._loader(members[manifest.model_file])
        except (ModelLoadError, ModelRunError) as exc:
            raise ModelRefused("load", f"{what}: the model does not load: {exc}") from None
        if (problem := manifest.tensor_disagreement(model.inputs, model.outputs)) is not None:
            raise ModelRefused("contract", f"{what}: {problem}")
        try:
            inputs, expected = unpack_golden(members[manifest.golden.file])
            _, problem = golden_disagreement(
                model.run(inputs), expected, manifest.golden.atol, manifest.golden.rtol
            )
        except (ValueError, ModelRunError) as exc:
            problem = f"the model fails on its golden vectors: {exc}"
        if problem is not None:
            raise ModelRefused("golden", f"{what}: {problem}")
        return CloudModel(target, manifest, model, InputContract(manifest))
