"""The update poll's gate: the fetcher's last answer again, while nothing it read has changed.

Every poll asks the director three things (the hybrid plan, the assignment,
the shadow), each through the fetcher child process
(:class:`~agent.ota.parts.ProcessFetcher`), which pays the interpreter's
start and python-tuf's imports, about half a second of CPU, even when nothing
changed. TUF itself decides "nothing changed" from two requests per
repository: the next root version (not there) and the timestamp metadata,
which pins the snapshot, which pins every targets file (client workflow
5.3-5.6: metadata at the version already trusted is read from the trusted
copy, not downloaded). The gate asks exactly those, in the serving process
with no TUF import, and repeats the last child's answer of that kind only when
all of these hold:

- it was a clean answer of its kind, which metadata alone decides: ``check``
  none, assigned, a fleet rollback; ``shadow`` none, or one the device said
  not to download; ``plan`` read after a refresh, a plan followed or none.
  Never a refusal, an unavailability, a download, a refused plan or one read
  from the metadata trusted before a failed refresh;
- it was asked with the same inputs (the installed release counter, the
  shadows not to download), and no download was asked for since;
- every trust store it depended on (the director's; the image repository's
  when it names a bundle) holds exactly the files it held right after that
  child, and each such repository serves, byte for byte, the timestamp its
  store trusts and no next root (HTTP 404 or 403, as python-tuf reads it);
- the agent's clock is not before the moment the answer was kept (no clock
  rollback) and before the earliest expiry among the metadata in those stores
  (and of the plan itself), so an expiry the child would refuse is never hidden.

Anything else — a probe that fails or times out, a doubt — runs the child
exactly as before; its answer replaces the one kept, or removes it when not
clean. Nothing is stored: after a restart the first poll of each kind runs
the child. Downloads always run the child.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol
from urllib.parse import unquote, urlsplit

from agent.ota.answers import (
    Assigned,
    FetchAnswer,
    NoShadow,
    PlanAnswer,
    PlanRead,
    RollbackAssigned,
    ShadowAnswer,
    ShadowKept,
    Unassigned,
)

if TYPE_CHECKING:
    import ssl

    from agent.config import AgentConfig

log = logging.getLogger(__name__)

Kind = Literal["check", "shadow", "plan"]

# A probe longer than this is a doubt: the child, with its own timeouts, runs instead.
PROBE_TIMEOUT_S: Final = 5.0
# python-tuf's limit for timestamp metadata (UpdaterConfig.timestamp_max_length).
TIMESTAMP_MAX_BYTES: Final = 16384
_HEAD_MAX_BYTES: Final = 16384
# The root a store was provisioned with: kept for `edge-agent verify`, never read by TUF.
_PROVISIONED_ROOT: Final = "provisioned-root.json"


def trust_dirs(config: AgentConfig) -> tuple[Path, Path]:
    """The metadata stores of the image repository and the director."""
    return config.data_dir / "trust" / "image", config.data_dir / "trust" / "director"


class UpdateFetcher(Protocol):
    """Every question the agent asks the director (:class:`~agent.ota.parts.ProcessFetcher`)."""

    async def check(self, installed_counter: int) -> FetchAnswer: ...

    async def download(self, installed_counter: int, expect: str) -> FetchAnswer: ...

    async def shadow(self, installed_counter: int, known: Collection[str]) -> ShadowAnswer: ...

    async def plan(self) -> PlanAnswer: ...


@dataclass(frozen=True)
class Repository:
    """A TUF repository as the fetcher reads it: its metadata URL and the device's trust store."""

    name: str
    metadata_url: str  # ends with "/"
    store: Path


@dataclass(frozen=True)
class StoreState:
    """A trust store as the child left it: its files' digests, root version, earliest expiry."""

    files: tuple[tuple[str, str], ...]
    root_version: int
    expires: float


@dataclass(frozen=True)
class Kept:
    """A clean answer of one kind, what it was asked with and what it depended on."""

    inputs: tuple[object, ...]
    answer: FetchAnswer | ShadowAnswer | PlanAnswer
    stores: tuple[tuple[Repository, StoreState], ...]
    kept_at: float
    fresh_until: float


# (status, body) of a GET; raises OSError or TimeoutError when there is no answer.
Get = Callable[[str, int], Awaitable[tuple[int, bytes]]]


class PollGate:
    """A fetcher that asks ``fetcher`` (a child process) only when something may have changed.

    Same interface as the fetcher it wraps. ``asked`` counts the questions
    passed to ``fetcher``, ``repeated`` those answered from the last child.
    """

    def __init__(
        self,
        fetcher: UpdateFetcher,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fetcher = fetcher
        self.config = config
        self.clock = clock
        image_dir, director_dir = trust_dirs(config)
        self.image = Repository("image", _metadata_url(config.image_repository.url), image_dir)
        self.director: Repository | None = None
        if config.director is not None:
            base = f"{config.director.url.rstrip('/')}/devices/{config.device_id}"
            self.director = Repository("director", _metadata_url(base), director_dir)
        fetch = config.update.fetch
        self._timeout = min(PROBE_TIMEOUT_S, fetch.connect_timeout_s + fetch.read_timeout_s)
        self._ssl: ssl.SSLContext | None = None
        self._kept: dict[Kind, Kept] = {}
        self.asked = 0
        self.repeated = 0

    # -- the fetcher's interface --------------------------------------------------------

    async def check(self, installed_counter: int) -> FetchAnswer:
        inputs = (installed_counter,)
        kept = await self._repeat("check", inputs)
        if kept is not None:
            assert isinstance(kept, Unassigned | Assigned | RollbackAssigned)
            return kept
        self.asked += 1
        answer = await self.fetcher.check(installed_counter)
        self._keep("check", inputs, answer, self._check_depends_on(answer))
        return answer

    async def download(self, installed_counter: int, expect: str) -> FetchAnswer:
        # Something new is being installed: every answer is asked again afterwards.
        self._kept.clear()
        self.asked += 1
        return await self.fetcher.download(installed_counter, expect)

    async def shadow(self, installed_counter: int, known: Collection[str]) -> ShadowAnswer:
        inputs = (installed_counter, tuple(sorted(known)))
        kept = await self._repeat("shadow", inputs)
        if kept is not None:
            assert isinstance(kept, NoShadow | ShadowKept)
            return kept
        self.asked += 1
        answer = await self.fetcher.shadow(installed_counter, known)
        depends: tuple[Repository, ...] | None = None
        if self.director is not None and isinstance(answer, NoShadow):
            depends = (self.director,)
        elif self.director is not None and isinstance(answer, ShadowKept):
            depends = (self.director, self.image)
        self._keep("shadow", inputs, answer, depends)
        return answer

    async def plan(self) -> PlanAnswer:
        kept = await self._repeat("plan", ())
        if kept is not None:
            assert isinstance(kept, PlanRead)
            return kept
        self.asked += 1
        answer = await self.fetcher.plan()
        clean = (
            isinstance(answer, PlanRead)
            and answer.refresh_failed is None
            and answer.refusal is None
            and self.director is not None
        )
        self._keep("plan", (), answer, (self.director,) if clean and self.director else None)
        return answer

    # -- keeping and repeating ----------------------------------------------------------

    def _check_depends_on(self, answer: FetchAnswer) -> tuple[Repository, ...] | None:
        """The repositories a clean ``check`` answer was read from (``None``: not clean)."""
        if self.director is None:  # standalone: the image repository's newest release
            return (self.image,) if isinstance(answer, Assigned) else None
        if isinstance(answer, Unassigned):  # the image repository is not asked then
            return (self.director,)
        if isinstance(answer, Assigned | RollbackAssigned):
            return (self.director, self.image)
        return None

    def _keep(
        self,
        kind: Kind,
        inputs: tuple[object, ...],
        answer: FetchAnswer | ShadowAnswer | PlanAnswer,
        depends: tuple[Repository, ...] | None,
    ) -> None:
        self._kept.pop(kind, None)
        if depends is None:
            return
        now = self.clock()
        try:
            stores = tuple((repo, store_state(repo.store)) for repo in depends)
        except Exception as exc:  # a store python-tuf did not write: nothing is kept
            log.debug("poll gate: not keeping the %s answer: %s", kind, exc)
            return
        fresh_until = min(state.expires for _, state in stores)
        if isinstance(answer, PlanRead) and answer.plan is not None:
            fresh_until = min(fresh_until, answer.plan.expires_at.timestamp())
        self._kept[kind] = Kept(inputs, answer, stores, now, fresh_until)

    async def _repeat(
        self, kind: Kind, inputs: tuple[object, ...]
    ) -> FetchAnswer | ShadowAnswer | PlanAnswer | None:
        """The kept answer of ``kind`` if it would be the child's answer now, else ``None``."""
        kept = self._kept.get(kind)
        if kept is None or kept.inputs != inputs:
            return None
        now = self.clock()
        if not kept.kept_at <= now < kept.fresh_until:
            return None
        try:
            for repo, state in kept.stores:
                if not await self._unchanged(repo, state):
                    return None
        except (OSError, TimeoutError, ValueError) as exc:
            log.debug("poll gate: %s asked of the fetcher: %s", kind, exc)
            return None
        except Exception:  # a doubt all the same: the child answers
            log.warning("poll gate: %s asked of the fetcher after an error", kind, exc_info=True)
            return None
        self.repeated += 1
        return kept.answer

    async def _unchanged(self, repo: Repository, state: StoreState) -> bool:
        """Whether ``repo`` and its trust store are as they were when ``state`` was taken."""
        if store_files(repo.store) != state.files:
            return False
        trusted = (repo.store / "timestamp.json").read_bytes()
        status, served = await self._get(repo.metadata_url + "timestamp.json", TIMESTAMP_MAX_BYTES)
        if status != 200 or served != trusted:
            return False
        # python-tuf's client workflow 5.3.3: no next root is 404 or 403, anything else a doubt.
        status, _ = await self._get(f"{repo.metadata_url}{state.root_version + 1}.root.json", 0)
        return status in (403, 404)

    # -- the probe's requests -----------------------------------------------------------

    async def _get(self, url: str, limit: int) -> tuple[int, bytes]:
        """``url``'s status and body (at most ``limit`` bytes), as the fetcher would ask it."""
        if "://" not in url or url.startswith("file://"):
            path = Path(unquote(urlsplit(url).path)) if url.startswith("file://") else Path(url)
            if not path.is_file():
                return 404, b""
            return 200, path.read_bytes()[: limit + 1]
        return await asyncio.wait_for(self._http_get(url, limit), self._timeout)

    async def _http_get(self, url: str, limit: int) -> tuple[int, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            raise ValueError(f"cannot ask {url}")
        tls = self._tls() if parts.scheme == "https" else None
        port = parts.port or (443 if tls else 80)
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=tls)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            host = parts.netloc.rpartition("@")[2]
            head = [f"GET {target} HTTP/1.0", f"Host: {host}", "Connection: close"]
            if (auth := self._authorization()) is not None:
                head.append(f"Authorization: {auth}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            # HTTP/1.0: no chunked body, the server closes after it.
            cap = _HEAD_MAX_BYTES + limit + 1
            raw = b""
            while len(raw) < cap and not response_complete(raw):
                if not (chunk := await reader.read(cap - len(raw))):
                    break
                raw += chunk
        finally:
            writer.close()
        return parse_response(raw, limit)

    def _authorization(self) -> str | None:
        """HTTP Basic, as the fetcher sends it (the password file read afresh, like the child)."""
        creds = self.config.credentials
        if creds.password_file is None:
            return None
        password = creds.password_file.read_text().strip()
        user = creds.username or self.config.device_id
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            import ssl

            ca_file = self.config.update.fetch.ca_file
            self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        return self._ssl


def _metadata_url(base: str) -> str:
    """Where a repository's metadata lives, as :class:`ImageRepositoryClient` names it."""
    base = base.rstrip("/")
    if "://" not in base or base.startswith("file://"):
        path = Path(unquote(urlsplit(base).path)) if base.startswith("file://") else Path(base)
        base = path.resolve().as_uri()
    return f"{base}/metadata/"


def response_complete(raw: bytes) -> bool:
    """Whether ``raw`` holds a response head and all the body its Content-Length announces
    (a server that keeps the connection open anyway is not waited for)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return value.strip().isdigit() and len(body) >= int(value.strip())
    return False


def parse_response(raw: bytes, limit: int) -> tuple[int, bytes]:
    """Status and body of an HTTP/1.x response; ``ValueError`` when it is not a whole one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no complete HTTP response head")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1 response: {lines[0][:80]!r}")
    status = int(rest[:3])
    if status != 200:
        return status, b""
    if len(body) > limit:
        raise ValueError(f"more than {limit} bytes")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "transfer-encoding":
            raise ValueError("an encoded body")
        if name.strip().lower() == "content-length" and int(value.strip()) != len(body):
            raise ValueError("a body shorter than its Content-Length")
    return status, body


def store_files(store: Path) -> tuple[tuple[str, str], ...]:
    """Every metadata file of a trust store, by name, with its sha256."""
    return tuple(
        (path.name, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(store.glob("*.json"))
    )


def store_state(store: Path) -> StoreState:
    """A trust store as it is now: its files, its root's version and the earliest expiry.

    The expiry is that of every metadata file in it (root, timestamp, snapshot,
    targets, delegated targets), whether or not this answer read it: an early
    expiry can only make the gate ask the child sooner. Raises ``OSError``,
    ``ValueError`` or ``KeyError`` for a store that is not what python-tuf keeps.
    """
    files = store_files(store)
    if "timestamp.json" not in dict(files):
        raise ValueError(f"{store} holds no timestamp")
    expires: list[float] = []
    root_version = 0
    for name, _ in files:
        if name == _PROVISIONED_ROOT:
            continue
        signed = json.loads((store / name).read_bytes())["signed"]
        expires.append(datetime.fromisoformat(signed["expires"]).timestamp())
        if name == "root.json":
            root_version = int(signed["version"])
    if root_version < 1:
        raise ValueError(f"{store} holds no root")
    # Read again: the files the expiry came from are the files kept.
    if store_files(store) != files:
        raise ValueError(f"{store} changed while it was read")
    return StoreState(files, root_version, min(expires))
