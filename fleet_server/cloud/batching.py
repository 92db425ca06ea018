"""Dynamic batching: requests for one model, from any device, run in one interpreter call.

As Triton's dynamic batcher: a batch opens with the first waiting request
and closes when it holds ``max_batch_size`` rows or ``max_wait_s`` after it
opened, whichever comes first; its inputs are concatenated row-wise, the
model runs once off the event loop (``asyncio.to_thread``), and each request
gets back exactly its own rows of every output. A request that would not fit
in the open batch starts the next one. Requests are validated before they are
queued (:class:`~protocol.validation.InputContract`), so one bad request
cannot fail a batch; if the model itself fails, every request of that batch
gets the error. At most ``max_queue`` requests wait; :meth:`Batcher.submit`
refuses the next with :class:`QueueFull`.

Requests queued for a model that was replaced meanwhile run on the model they
were validated against: a batch never mixes two models.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fleet_server.cloud.models import CloudModel

Tensors = dict[str, npt.NDArray[Any]]


class QueueFull(Exception):
    """The model's queue holds ``depth`` requests already."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"{depth} requests are waiting")
        self.depth = depth


@dataclass
class _Pending:
    model: CloudModel
    inputs: Tensors
    rows: int
    future: asyncio.Future[Tensors] = field(repr=False)


BatchObserver = Callable[[str, int], None]


def split_rows(outputs: Tensors, rows: list[int]) -> list[Tensors]:
    """Each request's own rows of a batch's ``outputs``, in order (``rows`` per request)."""
    bounds = np.cumsum([0, *rows])
    return [
        {name: array[bounds[i] : bounds[i + 1]] for name, array in outputs.items()}
        for i in range(len(rows))
    ]


def join_rows(requests: list[Tensors]) -> Tensors:
    """The requests' inputs concatenated row-wise, by input name."""
    first = requests[0]
    if len(requests) == 1:
        return first
    return {name: np.concatenate([r[name] for r in requests]) for name in first}


class Batcher:
    """One model name's queue and the task that runs its batches.

    ``on_batch(model_name, rows)`` is told the rows of every batch run. The
    wait budget is measured on the event loop's clock.
    """

    def __init__(
        self,
        name: str,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the task; requests still waiting get ``CancelledError``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._queue:
            self._queue.popleft().future.cancel()

    def submit(self, model: CloudModel, inputs: Tensors) -> asyncio.Future[Tensors]:
        """Queue validated ``inputs`` for ``model``; the future holds this request's outputs."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(len(self._queue))
        rows = int(next(iter(inputs.values())).shape[0])
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(model, inputs, rows, future))
        self._arrived.set()
        return future

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            await self._execute(batch)

    async def _gather(self) -> list[_Pending]:
        """Take requests for one batch: up to the size, the wait budget, one model."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        while rows < self.max_batch_size:
            if self._queue:
                nxt = self._queue[0]
                if nxt.model is not batch[0].model or rows + nxt.rows > self.max_batch_size:
                    break
                batch.append(self._queue.popleft())
                rows += nxt.rows
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await self._arrived.wait()
            except TimeoutError:
                break
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # a caller may have gone
        if not live:
            return
        model = live[0].model
        rows = [p.rows for p in live]
        if self._on_batch is not None:
            self._on_batch(self.name, sum(rows))
        try:
            joined = join_rows([p.inputs for p in live])
            outputs = await asyncio.to_thread(model.model.run, joined)
        except Exception as exc:  # the model failed: every request of the batch hears why
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, own in zip(live, split_rows(outputs, rows), strict=True):
            if not p.future.done():
                p.future.set_result(own)
