"""Local inference for apps in the agent's own process.

:class:`InferenceClient` goes through exactly what the HTTP API does — the
manifest's input validation, then the fallback chain — without JSON or
sockets in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import numpy.typing as npt

from agent.serving.chain import Answer, FallbackChain
from protocol.manifest import Manifest

ChainProvider = FallbackChain | Callable[[], FallbackChain]


def current_chain(provider: ChainProvider) -> FallbackChain:
    """The chain ``provider`` is, or returns now."""
    return provider if isinstance(provider, FallbackChain) else provider()


class InferenceClient:
    """Asks the fallback chain for answers; ``chain`` may be a callable returning the chain.

    ``infer`` is the coroutine to await from the agent's event loop.
    ``infer_blocking`` is for an app thread: it submits the request to ``loop``
    (by default the loop running when the client was made) and waits, or runs
    its own loop when there is none.
    """

    def __init__(
        self, chain: ChainProvider, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._chain = chain
        self._loop = loop or _running_loop()

    @property
    def chain(self) -> FallbackChain:
        return current_chain(self._chain)

    @property
    def manifest(self) -> Manifest | None:
        """The active model's manifest: its inputs, outputs, features and classes."""
        return self.chain.manifest

    async def infer(
        self, inputs: Mapping[str, npt.ArrayLike], *, version: str | None = None
    ) -> Answer:
        """Answer ``{input name: [batch, ...] array}``.

        Raises ``InvalidInput`` (naming the tensor and what was wrong),
        ``UnknownVersion`` or ``ChainNotReady``, like the HTTP API's 4xx/503.
        """
        return await self.chain.infer(inputs, version=version)

    def infer_blocking(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> Answer:
        """:meth:`infer` for code that is not a coroutine; never call it on the loop's thread."""
        loop = self._loop
        if loop is not None and loop.is_running():
            if _running_loop() is loop:
                raise RuntimeError(
                    "infer_blocking() would block the event loop it waits for; await infer()"
                )
            future = asyncio.run_coroutine_threadsafe(self.infer(inputs, version=version), loop)
            return future.result(timeout_s)
        return asyncio.run(asyncio.wait_for(self.infer(inputs, version=version), timeout_s))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
