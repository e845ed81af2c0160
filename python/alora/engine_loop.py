"""One engine loop owns the runtime's stepping. Requests are submitted from any thread;
their outputs go to a per-call channel (a thread queue, or an asyncio queue fed
thread-safely), so concurrent callers never see each other's tokens.

A step is a transaction (DESIGN section 7): under the lock the core plans it; without the
lock the executor runs it and each request is sampled on its own; under the lock it is
committed. If anything before the commit raises, the core rolls the step back
(`cancel_step`) and its requests are queued again intact. A request that fails alone (its
sampling or logits processor raised) finishes with finish_reason "error" and its batch-mates
go on. The lock is held only for the core's short calls, never during the forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alora import _core
from alora.executor import StepExecutor
from alora.fetcher import AdapterFetcher
from alora.lora import AdapterEntry
from alora.outputs import GenerationResult, StepOutput
from alora.plan import StepWork
from alora.sampling import Sampled, SampleRequest, SamplingParams, sample_batch

log = logging.getLogger("alora")

# A request whose steps failed this many times (device errors, interrupts) fails alone
# rather than being retried forever; a step that fails fewer times is simply retried.
MAX_STEP_FAILURES = 3
_GREEDY = SamplingParams()
# How long the loop thread sleeps when every runnable request waits for an adapter read.
_FETCH_WAIT_S = 0.05


class Channel:
    """Where one call's step outputs go."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._sync: queue.SimpleQueue[StepOutput] | None = None
        self._async: asyncio.Queue[StepOutput] | None = None
        if loop is None:
            self._sync = queue.SimpleQueue()
        else:
            self._async = asyncio.Queue()

    def put(self, item: StepOutput) -> None:
        if self._sync is not None:
            self._sync.put(item)
            return
        assert self._loop is not None and self._async is not None
        with contextlib.suppress(RuntimeError):  # the consumer's event loop is closed
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)

    def get(self, timeout: float) -> StepOutput | None:
        assert self._sync is not None
        try:
            return self._sync.get(timeout=timeout)
        except queue.Empty:
            return None

    async def aget(self) -> StepOutput:
        assert self._async is not None
        return await self._async.get()


@dataclass
class Submission:
    """One validated request, ready for the core."""

    ids: Any  # token ids (list or 1-D array); the core checks them
    adapter: str | None
    max_new_tokens: int
    params: SamplingParams
    stop_token_ids: Sequence[int]
    return_logits: bool


@dataclass
class RequestState:
    prompt: Any
    adapter: str | None
    params: SamplingParams
    generator: torch.Generator | None
    return_logits: bool
    channel: Channel | None
    t_start: float
    t_first: float | None = None
    output_ids: list[int] = field(default_factory=list)  # kept only for logits processors
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    failures: int = 0


class EngineLoop:
    def __init__(
        self,
        engine: _core.Engine,
        executor: StepExecutor,
        entries: dict[int, AdapterEntry],
        decode: Callable[[list[int]], str] | None,
    ) -> None:
        self.engine = engine
        self.executor = executor
        self.entries = entries  # shared with the runtime; changed only under `lock`
        self.decode = decode
        self.lock = threading.RLock()
        self._step_lock = threading.Lock()  # one step at a time, whoever runs it
        self.requests: dict[int, RequestState] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        # Outputs of manual requests (no channel) stepped by the loop thread while it ran
        # for others: the next manual step() returns them, so none is lost.
        self._manual_outputs: list[StepOutput] = []
        self.fetcher = AdapterFetcher(engine, self.lock, self._info_of, self._fail_adapter)
        self._idle = False  # the last step found nothing it could run

    def _info_of(self, adapter_id: int) -> _core.AdapterInfo | None:
        entry = self.entries.get(adapter_id)
        return entry.info if entry is not None else None

    def _fail_adapter(self, adapter_id: int, cause: BaseException) -> None:
        """An adapter's weights could not be read: fail the requests waiting for it."""
        entry = self.entries.get(adapter_id)
        if entry is None:
            return
        for rid, st in list(self.requests.items()):
            if st.adapter == entry.info.name:
                self._fail(rid, cause)

    # ------------------------------------------------------------------------ submission

    def submit(self, items: Sequence[Submission], channel: Channel | None) -> list[int]:
        """Queue every item or none: the core validates each; on the first refusal the ones
        already queued are withdrawn before anything could step them."""
        device = self.executor.geometry.device
        gens = [it.params.make_generator(device) for it in items]
        ids: list[int] = []
        with self.lock:
            if self._closed:
                raise _core.StepError("this runtime was detached from its model")
            try:
                for it, gen in zip(items, gens, strict=True):
                    rid = self.engine.add_request(
                        it.ids,
                        adapter=it.adapter,
                        max_new_tokens=it.max_new_tokens,
                        stop_token_ids=it.stop_token_ids,
                    )
                    ids.append(rid)
                    self.requests[rid] = RequestState(
                        prompt=it.ids.copy() if hasattr(it.ids, "copy") else list(it.ids),
                        adapter=it.adapter,
                        params=it.params,
                        generator=gen,
                        return_logits=it.return_logits,
                        channel=channel,
                        t_start=time.perf_counter(),
                    )
            except BaseException:
                for rid in ids:
                    with contextlib.suppress(_core.AloraError):
                        self.engine.abort(rid)
                    self.requests.pop(rid, None)
                raise
        return ids

    def abort(self, request_id: int) -> GenerationResult:
        with self.lock:
            out = self.engine.abort(request_id)
            return self._deliver_end(out, "abort", None)

    # ------------------------------------------------------------------------ the loop

    def _has_channel_work(self) -> bool:
        return any(st.channel is not None for st in self.requests.values())

    def ensure_running(self) -> None:
        with self.lock:
            if self._thread is None and not self._closed and self._has_channel_work():
                self._thread = threading.Thread(target=self._run, name="alora-engine", daemon=True)
                self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        errors = 0
        while True:
            with self.lock:
                # Manual requests alone are left to the caller's step().
                if self._closed or not self._has_channel_work():
                    self._thread = None
                    return
            try:
                self.step(manual=False)
                if self._idle:
                    # Nothing ran: every runnable request waits for an adapter read.
                    self.fetcher.wait(_FETCH_WAIT_S)
                errors = 0
            except BaseException as e:  # the loop must never die silently
                errors += 1
                log.exception("engine loop step failed")
                if errors >= MAX_STEP_FAILURES:
                    self.fail_all(e)
                    errors = 0

    def fail_all(self, cause: BaseException) -> None:
        with self.lock:
            for rid in list(self.requests):
                self._fail(rid, cause)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            for rid in list(self.requests):
                with contextlib.suppress(_core.AloraError):
                    self.abort(rid)
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
        self.fetcher.close()

    # ------------------------------------------------------------------------ one step

    def step(self, *, manual: bool) -> list[StepOutput]:
        """One transaction. `manual`: the caller's own step() (errors propagate after the
        rollback, requests stay queued); else the loop's (failures are counted per request)."""
        if manual:
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                with self.lock:
                    busy = self._has_channel_work()
                if busy:
                    raise _core.StepError(
                        "the engine loop thread is stepping for generate/stream callers; "
                        "step() is the manual loop and cannot run beside it"
                    )
                thread.join(timeout=60)  # it is leaving: nothing of its callers is left
            with self.lock:
                done, self._manual_outputs = self._manual_outputs, []
            if done:
                return done
        # The loop waits for a manual step in progress; a manual step never waits for the loop.
        if not self._step_lock.acquire(blocking=not manual):
            raise _core.StepError("another thread is running a step of this runtime")
        try:
            outputs = self._step(manual)
        finally:
            self._step_lock.release()
        if manual:
            with self.lock:
                outputs += self._manual_outputs
                self._manual_outputs = []
        return outputs

    def _step(self, manual: bool) -> list[StepOutput]:
        with self.lock:
            reading = self.fetcher.start_pending()
            plan = self.engine.schedule()
            if plan is None and reading and manual:
                # The manual loop has no other work to overlap: read, then plan again.
                self.lock.release()
                try:
                    self.fetcher.read_now()
                finally:
                    self.lock.acquire()
                self.fetcher.start_pending()
                plan = self.engine.schedule()
            self._idle = plan is None
            if plan is None:
                return []
            work = StepWork.from_core(plan)
            try:
                needed = {load.adapter_id for load in work.pre.adapter_loads}
                needed |= set(work.lora.adapter_ids)
                entries = {a: self.entries[a] for a in needed}
                reqs = [self._sample_request(rid) for rid in work.sampled_request_ids]
            except BaseException:
                self.engine.cancel_step(work.step_id)
                raise
        try:
            logits = self.executor.run(work, entries)
            sampled = sample_batch(logits, reqs)
            self.before_commit(work)
        except BaseException as exc:
            with self.lock:
                self.engine.cancel_step(work.step_id)
                if not manual:
                    self._count_failure(work, exc)
            if manual:
                raise
            log.warning("step %d rolled back: %r", work.step_id, exc)
            return []
        with self.lock:
            return self._commit(work, logits, sampled, manual)

    def before_commit(self, work: StepWork) -> None:
        """A seam for fault injection in tests: whatever raises here rolls the step back."""

    def _sample_request(self, rid: int) -> SampleRequest:
        st = self.requests.get(rid)
        if st is None:  # aborted since; its sample is ignored
            return SampleRequest(_GREEDY, None, ())
        # A snapshot only for processors: copying every request's ids each step is quadratic.
        ids = tuple(st.output_ids) if st.params.logits_processors else ()
        return SampleRequest(st.params, st.generator, ids)

    def _count_failure(self, work: StepWork, exc: BaseException) -> None:
        for r in work.request_ids:
            st = self.requests.get(int(r))
            if st is None:
                continue
            st.failures += 1
            if st.failures >= MAX_STEP_FAILURES:
                self._fail(int(r), exc)

    def _commit(
        self,
        work: StepWork,
        logits: torch.Tensor,
        sampled: list[Sampled | BaseException],
        manual: bool,
    ) -> list[StepOutput]:
        rids = work.sampled_request_ids
        tokens: list[int] = []
        for rid, s in zip(rids, sampled, strict=True):
            if isinstance(s, BaseException):
                tokens.append(0)  # ignored: the request is gone before the commit
                if rid in self.requests:
                    self._fail(rid, s)
            else:
                tokens.append(s.token)
        try:
            outs = self.engine.commit(work.step_id, tokens)
        except BaseException:
            self.engine.cancel_step(work.step_id)
            raise
        now = time.perf_counter()
        row_of = {rid: i for i, rid in enumerate(rids)}
        results: list[StepOutput] = []
        for out in outs:
            rid = out.request_id
            st = self.requests.get(rid)
            if st is None:
                continue
            s = sampled[row_of[rid]]
            assert isinstance(s, Sampled)
            if st.params.logits_processors:
                st.output_ids.append(s.token)
            if st.t_first is None:
                st.t_first = now
            if st.return_logits:
                st.logits.append(logits[row_of[rid]].detach().to("cpu", torch.float32))
            if s.logprob is not None:
                st.logprobs.append(s.logprob)
                st.top_logprobs.append(s.top_logprobs or [])
            result = self._result(out, st, None, None) if out.finished else None
            so = StepOutput(
                rid,
                out.new_token,
                out.finished,
                out.finish_reason,
                result,
                s.logprob,
                s.top_logprobs,
            )
            if st.channel is not None:
                st.channel.put(so)
            elif not manual:
                self._manual_outputs.append(so)
            results.append(so)
        return results

    # ------------------------------------------------------------------------ endings

    def _fail(self, rid: int, cause: BaseException) -> None:
        with contextlib.suppress(_core.UnknownRequestError):
            out = self.engine.abort(rid)
            self._deliver_end(out, "error", cause)
            return
        self.requests.pop(rid, None)

    def _deliver_end(
        self, out: _core.RequestOutput, reason: str, error: BaseException | None
    ) -> GenerationResult:
        st = self.requests.get(out.request_id)
        result = self._result(out, st, reason, error)
        end = StepOutput(out.request_id, None, True, reason, result)
        if st is not None and st.channel is not None:
            st.channel.put(end)
        elif st is not None and reason == "error":
            self._manual_outputs.append(end)  # a manual request failed in a step
        return result

    def _result(
        self,
        out: _core.RequestOutput,
        st: RequestState | None,
        reason: str | None,
        error: BaseException | None,
    ) -> GenerationResult:
        self.requests.pop(out.request_id, None)
        now = time.perf_counter()
        tokens = list(out.output_tokens)
        text = self.decode(tokens) if self.decode is not None else None
        want_logprobs = st is not None and st.params.logprobs is not None
        return GenerationResult(
            request_id=out.request_id,
            token_ids=tokens,
            finish_reason=reason or out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            cached_tokens=out.cached_tokens,
            computed_tokens=out.computed_tokens,
            lora_tokens=out.lora_tokens,
            preemptions=out.preemptions,
            time_to_first_token=(
                st.t_first - st.t_start if st is not None and st.t_first is not None else None
            ),
            latency=now - st.t_start if st is not None else 0.0,
            adapter=st.adapter if st is not None else None,
            text=text,
            logits=st.logits if st is not None and st.return_logits else None,
            prompt_token_ids=[int(t) for t in st.prompt] if st is not None else [],
            logprobs=st.logprobs if want_logprobs and st is not None else None,
            top_logprobs=st.top_logprobs if want_logprobs and st is not None else None,
            error=error,
        )
