"""Micro-batching for the reading service: requests that arrive together are read in one forward pass.

    batcher = MicroBatcher(run, executor=one_thread, max_batch=64, max_wait=0.002)
    result = await batcher.submit(item)        # from any number of concurrent requests

``run(items) -> results`` (one result per item, in order) runs in ``executor``
(the service gives every model the same single inference thread), never on the
event loop.  When items wait, the batcher takes up to ``max_batch`` of them.
Callers may ``expect(n)`` items before they have them ready (the service does so
while it decodes the images of a request); the batcher then waits, at most
``max_wait`` seconds, for the expected items to arrive, and not at all when none
is expected or the batch is full.  While a batch runs, new items queue and form
the next one, so under load the batches grow by themselves.  A failure of ``run``
is given to every item of its batch; a caller that went away (a closed
connection) is skipped, and its item is dropped before it is read.
"""

from __future__ import annotations

import asyncio
import collections

from .. import checks


class MicroBatcher:
    """Collects items from concurrent callers and hands them to ``run`` in batches (see the module docstring)."""

    def __init__(self, run, executor, max_batch: int = 64, max_wait: float = 0.002):
        self.run = run
        self.executor = executor
        self.max_batch = checks.positive_int(max_batch, "max_batch")
        self.max_wait = checks.number(max_wait, "max_wait", allow_zero=True)
        self._pending: collections.deque = collections.deque()
        self._arrived: asyncio.Future | None = None
        self._full: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._expected = 0  # items announced by expect() and not yet submitted or withdrawn
        self.batches = 0   # batches run so far
        self.items = 0     # items read so far

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return len(self._pending)

    def expect(self, n: int = 1) -> None:
        """``n`` items will be submitted soon (or withdrawn): a batch about to run waits for them."""
        self._expected += n

    def withdraw(self, n: int = 1) -> None:
        """``n`` expected items will not come (their request failed)."""
        self._expected = max(0, self._expected - n)
        self._wake_if_ready()

    def _wake_if_ready(self) -> None:
        if self._full is not None and not self._full.done() and (
                len(self._pending) >= self.max_batch or self._expected == 0):
            self._full.set_result(None)

    async def submit(self, item, expected: bool = False):
        """The result of ``run`` for ``item``, read in a batch with whatever else arrives meanwhile.

        ``expected``: the item was announced by ``expect`` (it is no longer waited for).
        """
        return await self.put(item, expected)

    def put(self, item, expected: bool = False) -> asyncio.Future:
        """Queue ``item`` now (call from the event loop's thread): the future of its result.

        Items put one after the other without an ``await`` in between are in the same batch
        (up to ``max_batch``); cancelling the future drops the item if it was not read yet.
        """
        loop = asyncio.get_running_loop()
        if expected:
            self._expected = max(0, self._expected - 1)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())
        future = loop.create_future()
        self._pending.append((item, future))
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        self._wake_if_ready()
        return future

    async def close(self) -> None:
        """Stop the collecting task (waiting callers are cancelled)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            self._pending.popleft()[1].cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._arrived = loop.create_future()
                await self._arrived
                self._arrived = None
            if self._expected > 0 and len(self._pending) < self.max_batch and self.max_wait > 0:
                self._full = loop.create_future()
                timer = loop.call_later(self.max_wait, _settle, self._full)
                await self._full
                timer.cancel()
                self._full = None
            batch = []
            while self._pending and len(batch) < self.max_batch:
                item, future = self._pending.popleft()
                if not future.done():  # a cancelled caller is not read
                    batch.append((item, future))
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 -- every caller of the batch gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


__all__ = ["MicroBatcher"]
