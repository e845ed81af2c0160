"""The disk tier: reads adapter weights into the engine's host LRU off the engine lock, so a
request for an adapter that is not in memory waits only for its own read while the engine
loop keeps stepping the others (the core skips such requests until their weights arrive).

The core says what to read (`Engine.pending_fetches`: adapters of queued requests, in queue
order); this class reads each once on a small thread pool (`_core.read_adapter_weights`
releases the GIL) and installs the result under the lock. A read that fails (the file was
changed or removed since registration) fails the requests waiting for that adapter.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from alora import _core

# Reads at once: disk and conversion overlap the forward pass; more buys little on 2 cores.
FETCH_WORKERS = 2
# Load latencies kept for `AdapterRuntime.load_events()`.
MAX_EVENTS = 100_000


@dataclass(frozen=True)
class LoadEvent:
    """One adapter load: `tier` "disk" (file -> host memory) or "device" (host -> device
    rows, during a step's pre-work)."""

    adapter: str
    tier: str
    seconds: float
    at: float  # time.perf_counter() when it finished


class AdapterFetcher:
    def __init__(
        self,
        engine: _core.Engine,
        lock: threading.RLock,
        info_of: Callable[[int], _core.AdapterInfo | None],
        on_error: Callable[[int, BaseException], None],
    ) -> None:
        self._engine = engine
        self._lock = lock
        self._info_of = info_of
        self._on_error = on_error
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[int, Future[None]] = {}
        self._changed = threading.Condition()
        self.events: deque[LoadEvent] = deque(maxlen=MAX_EVENTS)

    def start_pending(self) -> bool:
        """Start reads for every adapter the core wants that is not being read. Call under
        the engine lock. Returns whether any read is outstanding."""
        for adapter_id in self._engine.pending_fetches():
            if adapter_id in self._inflight:
                continue
            info = self._info_of(adapter_id)
            if info is None:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="alora-fetch")
            self._inflight[adapter_id] = self._pool.submit(self._read, adapter_id, info)
        return bool(self._inflight)

    def _read(self, adapter_id: int, info: _core.AdapterInfo) -> None:
        t0 = time.perf_counter()
        weights: _core.AdapterWeights | None = None
        error: BaseException | None = None
        try:
            weights = _core.read_adapter_weights(info)
        except BaseException as e:  # reported to the waiting requests, never lost
            error = e
        t1 = time.perf_counter()
        with self._lock:
            self._inflight.pop(adapter_id, None)
            if weights is not None:
                try:
                    self._engine.install_weights(adapter_id, weights)
                    self.events.append(LoadEvent(info.name, "disk", t1 - t0, t1))
                except _core.UnknownAdapterError:
                    pass  # unloaded while it was read
            else:
                assert error is not None
                self._on_error(adapter_id, error)
        with self._changed:
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Block until some read finishes (or `timeout`); call without the engine lock."""
        with self._changed:
            if self._inflight:
                self._changed.wait(timeout)

    def read_now(self) -> None:
        """The manual loop's path: wait for every outstanding read to land."""
        while True:
            with self._lock:
                futures = list(self._inflight.values())
            if not futures:
                return
            for f in futures:
                f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
