"""A step is a transaction: faults injected at every stage of a step (page-in, prefix copy,
forward, each decoder layer, sampling, before the commit) roll it back, and the runtime then
answers exactly as a fresh one. Each defect found by the adversarial review (issue 8) has a
test here that fails on the old code."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import INV1, INV2, ArchSetup
from hypothesis import given
from hypothesis import strategies as st

import alora
from alora import AdapterRuntime
from alora.kv_cache import PagedKVCache
from alora.lora import AdapterPools
from alora.testing import PeftReference, make_peft_adapter, tiny_model

CONV = [20 + (i * 7) % 90 for i in range(37)]  # a conversation that ends mid-block
CALL = [*CONV, *INV1, 50]  # an aLoRA call on it: reuses the base KV, copies a partial block


class Injected(Exception):
    pass


class FakeOOM(RuntimeError):
    """What a device out-of-memory looks like to the runtime (a RuntimeError)."""


FAULTS: list[Callable[[], BaseException]] = [
    lambda: Injected("boom"),
    lambda: FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: KeyboardInterrupt(),
]


@pytest.fixture
def setup(arch_setup: Callable[[str], ArchSetup]) -> ArchSetup:
    return arch_setup("llama")


def _runtime(setup: ArchSetup, **kw: Any) -> AdapterRuntime:
    opts: dict[str, Any] = dict(kv_cache_blocks=48, adapter_rows=16)
    opts.update(kw)
    return setup.runtime(**opts)


def _idle(rt: AdapterRuntime) -> None:
    s = rt.stats()
    assert (s["used_blocks"], s["running"], s["waiting"], s["pinned_adapters"]) == (0, 0, 0, 0)


def _workload(rt: AdapterRuntime) -> list[list[int]]:
    """A base turn, then an aLoRA call and a LoRA call on it (page-ins, prefix copies)."""
    base = rt.generate([CONV], max_new_tokens=3, stop_token_ids=())[0].token_ids
    calls = rt.generate(
        [CALL, [*CONV, 60, 61], [*CALL[:20], *INV2, 70]],
        ["alora_all", "lora_mlp", "alora_qv"],
        max_new_tokens=3,
        stop_token_ids=(),
    )
    return [base, *(r.token_ids for r in calls)]


@pytest.fixture(scope="module")
def expected(arch_setup: Callable[[str], ArchSetup]) -> list[list[int]]:
    rt = _runtime(arch_setup("llama"))
    try:
        return _workload(rt)
    finally:
        rt.detach()


def _manual_run(rt: AdapterRuntime, prompts: list[list[int]], adapters: list[Any]) -> list[int]:
    return [
        rt.add_request(p, adapter=a, max_new_tokens=3, stop_token_ids=())
        for p, a in zip(prompts, adapters, strict=True)
    ]


def _drain(rt: AdapterRuntime) -> dict[int, list[int]]:
    done: dict[int, list[int]] = {}
    while rt.has_unfinished():
        for out in rt.step():
            if out.finished and out.result is not None:
                done[out.request_id] = out.result.token_ids
    return done


STAGES = ["page_in", "copy", "forward", "kernel", "layer0", "layer1", "sampling", "commit"]


def _inject(
    stage: str, fault: BaseException, rt: AdapterRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make the next step fail at `stage` once, after doing part of its work (writing
    garbage where the stage writes), as a real interruption would."""
    fired = {"n": 0}

    def once() -> bool:
        fired["n"] += 1
        return fired["n"] == 1

    if stage == "page_in":
        real_load = AdapterPools.load

        def load(
            self: AdapterPools, entry: Any, row_start: Any, rows: Any, bt_rows: Any, w: Any
        ) -> None:
            real_load(self, entry, row_start, rows, bt_rows, w)
            if once():
                # Rows half written, then the interrupt: garbage over half the A rows.
                half = np.asarray(rows[: len(rows) // 2], dtype=np.int64)
                g = self.granularity
                idx = torch.from_numpy(half * g)
                self.cache.kv.view(self.cache.num_layers, -1)[:, idx] = 7.0
                raise fault

        monkeypatch.setattr(AdapterPools, "load", load)
    elif stage == "copy":
        real_copy = PagedKVCache.copy_prefixes

        def copy(self: PagedKVCache, src: Any, dst: Any, lengths: Any) -> None:
            if once():
                for d in dst.tolist():
                    self.kv[:, :, d * self.block_size : (d + 1) * self.block_size] = 9.0
                raise fault
            real_copy(self, src, dst, lengths)

        monkeypatch.setattr(PagedKVCache, "copy_prefixes", copy)
    elif stage == "forward":
        real = rt.backend

        class Failing:
            name = "failing"

            def add_lora(self, *args: Any) -> None:
                if once():
                    raise fault
                real.add_lora(*args)

        monkeypatch.setattr(rt, "backend", Failing())
    elif stage == "kernel":
        # The hooks' bound kernel call (`CpuBackend.bind`): garbage in the linear's output,
        # then the fault, half way through a module's LoRA add.
        real = rt.backend
        assert callable(getattr(real, "bind", None))

        class FailingBound:
            name = "failing-bound"

            def bind(self, a_pool: Any, bt_pool: Any, batch: Any) -> Any:
                call = real.bind(a_pool, bt_pool, batch)  # type: ignore[attr-defined]
                if call is None:
                    return None

                def failing(y: torch.Tensor, x: torch.Tensor) -> bool:
                    if once():
                        y.fill_(5.0)
                        raise fault
                    return call(y, x)

                return failing

            def add_lora(self, *args: Any) -> None:
                real.add_lora(*args)

        monkeypatch.setattr(rt, "backend", FailingBound())
    elif stage.startswith("layer"):
        layer = rt.model.model.layers[int(stage[-1])]

        def hook(*args: Any) -> None:
            if once():
                raise fault

        handle = layer.register_forward_hook(hook)
        monkeypatch.setattr(rt, "_test_handle", handle, raising=False)
    elif stage == "sampling":
        import alora.engine_loop as el

        real_sample = el.sample_batch

        def sample(*args: Any) -> Any:
            if once():
                raise fault
            return real_sample(*args)

        monkeypatch.setattr(el, "sample_batch", sample)
    elif stage == "commit":
        loop = rt.engine_loop

        def before_commit(work: Any) -> None:
            if once():
                raise fault

        monkeypatch.setattr(loop, "before_commit", before_commit)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("fault", FAULTS, ids=["exception", "oom", "interrupt"])
def test_fault_at_every_stage_rolls_the_step_back(
    setup: ArchSetup,
    expected: list[list[int]],
    stage: str,
    fault: Callable[[], BaseException],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = _runtime(setup)
    try:
        base = rt.generate([CONV], max_new_tokens=3, stop_token_ids=())[0].token_ids
        assert base == expected[0]
        prompts = [CALL, [*CONV, 60, 61], [*CALL[:20], *INV2, 70]]
        adapters = ["alora_all", "lora_mlp", "alora_qv"]
        rids = _manual_run(rt, prompts, adapters)
        with monkeypatch.context() as m:
            _inject(stage, fault(), rt, m)
            with pytest.raises(BaseException) as info:
                rt.step()
            assert type(info.value) is type(fault())
            # Rolled back: nothing in use but the queued requests, nothing pinned.
            s = rt.stats()
            assert (s["running"], s["waiting"], s["used_blocks"], s["pinned_adapters"]) == (
                0,
                3,
                0,
                0,
            )
            done = _drain(rt)
        assert [done[r] for r in rids] == expected[1:]
        _idle(rt)
        # And the repeated calls, now served from the cache, are still exact.
        assert _workload(rt) == expected
        _idle(rt)
    finally:
        rt.detach()


def test_loop_retries_an_interrupted_step_then_answers_exactly(
    setup: ArchSetup, expected: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(setup)
    try:
        _inject("copy", KeyboardInterrupt(), rt, monkeypatch)
        assert _workload(rt) == expected
        _idle(rt)
    finally:
        rt.detach()


def test_one_request_failing_in_sampling_fails_alone(
    setup: ArchSetup, expected: list[list[int]]
) -> None:
    class Exploding:
        def __call__(self, output_ids: Any, logits: torch.Tensor) -> torch.Tensor:
            if len(output_ids) == 1:
                raise Injected("processor")
            return logits

    rt = _runtime(setup)
    try:
        rt.generate([CONV], max_new_tokens=3, stop_token_ids=())
        bad = rt.stream(
            [CALL],
            "alora_all",
            max_new_tokens=3,
            stop_token_ids=(),
            logits_processors=[Exploding()],
        )
        good = rt.generate([[*CONV, 60, 61]], "lora_mlp", max_new_tokens=3, stop_token_ids=())
        deltas = list(bad)
        assert deltas[-1].finish_reason == "error"
        assert isinstance(deltas[-1].result.error, Injected)  # type: ignore[union-attr]
        assert good[0].token_ids == expected[2]
        _idle(rt)
        assert _workload(rt) == expected
    finally:
        rt.detach()


def test_logits_processor_masks_and_logprobs_match_log_softmax(setup: ArchSetup) -> None:
    allowed = [31, 47, 52]

    def only_allowed(output_ids: Any, logits: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(logits, float("-inf"))
        mask[allowed] = 0.0
        return logits + mask

    rt = _runtime(setup)
    try:
        (res,) = rt.generate(
            [CONV],
            max_new_tokens=4,
            stop_token_ids=(),
            logits_processors=[only_allowed],
            logprobs=3,
            return_logits=True,
        )
        assert set(res.token_ids) <= set(allowed)
        assert res.logprobs is not None and res.top_logprobs is not None and res.logits is not None
        for tok, lp, top, logits in zip(
            res.token_ids, res.logprobs, res.top_logprobs, res.logits, strict=True
        ):
            ref = torch.log_softmax(only_allowed((), logits.clone()), -1)
            assert lp == pytest.approx(float(ref[tok]), abs=1e-5)
            assert [t for t, _ in top] == ref.topk(3).indices.tolist()
    finally:
        rt.detach()


# ------------------------------------------------------------------ validation before enqueue


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(seed=2**64, temperature=1.0), "seed"),
        (dict(seed=-(2**63) - 1, temperature=1.0), "seed"),
        (dict(temperature=1e-45), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(stop_token_ids=[2**70]), "stop_token_ids"),
        (dict(stop_token_ids=[53.9]), "stop_token_ids"),
        (dict(stop_token_ids=[10_000]), "stop_token_ids"),
        (dict(logprobs=21), "logprobs"),
        (dict(top_k=True), "top_k"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_queued(
    setup: ArchSetup, expected: list[list[int]], kwargs: dict, needle: str
) -> None:
    rt = _runtime(setup)
    try:
        before = rt.stats()
        with pytest.raises(alora.InvalidRequestError, match=needle):
            rt.generate([CONV, CONV], **kwargs)
        with pytest.raises(alora.InvalidRequestError, match=needle):
            rt.add_request(CONV, **kwargs)
        assert rt.stats() == before
        assert _workload(rt) == expected
    finally:
        rt.detach()


def test_huge_counts_and_bad_ids_are_typed_errors(setup: ArchSetup) -> None:
    rt = _runtime(setup)
    try:
        with pytest.raises(alora.CapacityError):
            rt.generate([CONV], max_new_tokens=2**64)  # up to max_model_len: pool too small
        with pytest.raises(alora.InvalidRequestError, match="request_id"):
            rt.abort(-1)
        with pytest.raises(alora.InvalidRequestError, match=r"prompt\[1\]"):
            rt.generate([[20, 10_000]])
        with pytest.raises(alora.InvalidRequestError, match=r"prompt\[0\]"):
            rt.generate([[True, 20]])
        _idle(rt)
    finally:
        rt.detach()


def test_seeded_sampling_does_not_depend_on_batch_position(setup: ArchSetup) -> None:
    rt = _runtime(setup)
    try:
        kw = dict(max_new_tokens=6, stop_token_ids=(), temperature=1.0, seed=1234)
        alone = rt.generate([CONV[:10]], **kw)[0].token_ids
        batch = rt.generate([[30, 31, 32], CONV[:10], CONV[:10]], **kw)
        assert batch[1].token_ids == alone and batch[2].token_ids == alone
    finally:
        rt.detach()


def test_full_pool_prompt_extending_a_cached_partial_block(setup: ArchSetup) -> None:
    rt = _runtime(setup, kv_cache_blocks=8)  # block_size 4: 32 slots
    try:
        first = CONV[:14]
        rt.generate([first], max_new_tokens=1, stop_token_ids=())
        long = [*first, *CONV[14:31]]  # 31 prompt tokens + 1 generated = the whole pool
        res = rt.generate([long, [40, 41]], max_new_tokens=2, stop_token_ids=())
        assert [len(r.token_ids) for r in res] == [2, 2]
        _idle(rt)
    finally:
        rt.detach()


# ------------------------------------------------------------------ adapters: numerics, files


def test_fp16_alpha_pattern_stays_finite_and_matches_peft(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=0).to(torch.float16)
    path = make_peft_adapter(
        model.float(),
        tmp_path / "a",
        "lora",
        r=4,
        alpha=16,
        targets=("q_proj", "v_proj"),
        alpha_pattern={"q_proj": 1e-4},
        seed=5,
    )
    model = model.to(torch.float16)
    prompt = CONV[:12]
    with AdapterRuntime(model, kv_cache_blocks=16, adapter_rows=16, block_size=4) as rt:
        rt.load_adapter("a", path)
        (res,) = rt.generate([prompt], "a", max_new_tokens=3, return_logits=True)
    got = torch.stack(res.logits)  # type: ignore[arg-type]
    assert torch.isfinite(got).all()
    ref = PeftReference(model.float()).logits(
        prompt + res.token_ids[:-1], path, prompt_len=len(prompt)
    )
    torch.testing.assert_close(got, ref[len(prompt) - 1 :], atol=0.05, rtol=0.02)


def _write_adapter(setup: ArchSetup, tmp_path: Path) -> Path:
    src = setup.dirs["alora_qv"]
    assert src is not None
    dst = tmp_path / "copy"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("config", "error", "needle"),
    [
        (b"[]", alora.AdapterFormatError, "JSON object"),
        (b'"x"', alora.AdapterFormatError, "JSON object"),
        (b"null", alora.AdapterFormatError, "JSON object"),
        (b"", alora.AdapterFormatError, "empty"),
        (b'{"r": 8, \xff}', alora.AdapterFormatError, "UTF-8"),
        (
            b'{"r": 8, "lora_alpha": NaN, "target_modules": ["q_proj"]}',
            alora.ConfigError,
            "lora_alpha",
        ),
        (
            b'{"r": 8, "lora_alpha": 1e39, "target_modules": ["q_proj", "v_proj"]}',
            alora.ConfigError,
            "lora_alpha",
        ),
    ],
)
def test_hostile_config_files_name_the_file_and_field(
    setup: ArchSetup, tmp_path: Path, config: bytes, error: type, needle: str
) -> None:
    path = _write_adapter(setup, tmp_path)
    (path / "adapter_config.json").write_bytes(config)
    rt = _runtime(setup)
    try:
        with pytest.raises(error, match=needle) as info:
            rt.load_adapter("x", path)
        if error is alora.AdapterFormatError:
            assert "adapter_config.json" in str(info.value)
        assert "x" not in rt.adapters
    finally:
        rt.detach()


def test_non_finite_weights_and_out_of_vocab_invocations_are_refused(
    setup: ArchSetup, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    path = _write_adapter(setup, tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    rt = _runtime(setup)
    try:
        # Registration reads only the header; the values are checked when first read, and
        # the requests waiting for them fail alone with the typed error.
        rt.load_adapter("nan", path)
        ids = [5, 6, 7, 8]
        bad, good = rt.generate([ids, ids], ["nan", None], max_new_tokens=2)
        assert bad.finish_reason == "error"
        assert isinstance(bad.error, alora.AdapterFormatError)
        assert "non-finite" in str(bad.error)
        assert good.finish_reason == "length" and len(good.token_ids) == 2
        rt.unload_adapter("nan")
        cfg = json.loads((setup.dirs["alora_qv"] / "adapter_config.json").read_text())  # type: ignore[operator]
        cfg["alora_invocation_tokens"] = [5, 100_000]
        with pytest.raises(alora.ConfigError, match="alora_invocation_tokens"):
            rt.load_adapter("oov", setup.dirs["alora_qv"], invocation_tokens=[5, 100_000])
        assert set(rt.adapters) == set(setup.adapter_names)
    finally:
        rt.detach()


def test_weights_file_that_shrinks_is_a_format_error_not_a_crash(
    setup: ArchSetup, tmp_path: Path
) -> None:
    path = _write_adapter(setup, tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    rt = _runtime(setup)
    try:
        for keep in (0, 9, len(data) // 2, len(data) - 3):
            weights.write_bytes(data[:keep])
            with pytest.raises(alora.AdapterFormatError):
                rt.load_adapter(f"cut{keep}", path)
        # Shrinking while another thread loads: an error or a success, never a signal.
        weights.write_bytes(data)
        stop = threading.Event()

        def shrink() -> None:
            while not stop.is_set():
                weights.write_bytes(data[: len(data) // 3])
                weights.write_bytes(data)

        t = threading.Thread(target=shrink)
        t.start()
        try:
            for i in range(20):
                with contextlib.suppress(alora.AdapterFormatError):
                    rt.load_adapter(f"race{i}", path)
        finally:
            stop.set()
            t.join()
    finally:
        rt.detach()


# ------------------------------------------------------------------ streams and threads


def test_aborting_ones_own_stream_and_interleaved_streams(setup: ArchSetup) -> None:
    rt = _runtime(setup)
    try:
        solo = [
            rt.generate([p], max_new_tokens=5, stop_token_ids=())[0].token_ids
            for p in (CONV[:9], CONV[5:17])
        ]
        s1 = rt.stream([CONV[:9]], max_new_tokens=5, stop_token_ids=())
        s2 = rt.stream([CONV[5:17]], max_new_tokens=5, stop_token_ids=())
        got: list[list[int]] = [[], []]
        for a, b in zip(s1, s2, strict=False):
            for i, d in enumerate((a, b)):
                if d.token_id is not None:
                    got[i].append(d.token_id)
        for rest, i in ((s1, 0), (s2, 1)):
            got[i] += [d.token_id for d in rest if d.token_id is not None]
        assert got == solo
        # Abort one's own request: the stream ends with "abort", no error.
        stream = rt.stream([CONV], max_new_tokens=50, stop_token_ids=())
        first = next(stream)
        rt.abort(first.request_id)
        rest = list(stream)
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        _idle(rt)
    finally:
        rt.detach()


def test_threaded_stress_every_request_gets_its_own_tokens(setup: ArchSetup) -> None:
    rt = _runtime(setup, kv_cache_blocks=64, max_num_seqs=6, max_batch_tokens=32)
    jobs = [
        ([*CONV[i : i + 9], *(INV1 if i % 3 == 0 else [])], ["alora_all", None, "lora_mlp"][i % 3])
        for i in range(18)
    ]
    try:
        solo = {
            i: rt.generate([p], a, max_new_tokens=4, stop_token_ids=())[0].token_ids
            for i, (p, a) in enumerate(jobs)
        }
        rt.reset_prefix_cache()
        got: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for i in range(k, len(jobs), 3):
                    p, a = jobs[i]
                    if i % 4 == 1:  # a stream, closed early: its request is aborted
                        s = rt.stream([p], a, max_new_tokens=4, stop_token_ids=())
                        next(s)
                        s.close()
                        continue
                    if i % 4 == 2:
                        toks = [
                            d.token_id
                            for d in rt.stream([p], a, max_new_tokens=4, stop_token_ids=())
                            if d.token_id is not None
                        ]
                        got[i] = toks
                        continue
                    got[i] = rt.generate([p], a, max_new_tokens=4, stop_token_ids=())[0].token_ids
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors
        assert got == {i: solo[i] for i in got}
        assert len(got) == len([i for i in range(len(jobs)) if i % 4 != 1])
        rt.engine_loop.ensure_running()  # no-op: nothing left
        _idle(rt)
    finally:
        rt.detach()


def test_stream_async_and_cancellation(setup: ArchSetup) -> None:
    import asyncio

    rt = _runtime(setup)
    try:
        solo = rt.generate([CONV[:9]], max_new_tokens=4, stop_token_ids=())[0].token_ids

        async def main() -> list[int]:
            toks = [
                d.token_id
                async for d in rt.stream_async([CONV[:9]], max_new_tokens=4, stop_token_ids=())
                if d.token_id is not None
            ]

            started = asyncio.Event()

            def slow(output_ids: Any, logits: torch.Tensor) -> torch.Tensor:
                time.sleep(0.005)  # keep the request running while the client goes away
                return logits

            async def consume() -> None:
                async for _ in rt.stream_async(
                    [CONV[:9]], max_new_tokens=100, stop_token_ids=(), logits_processors=[slow]
                ):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()  # as a server does when the client disconnects
            with pytest.raises(asyncio.CancelledError):
                await task
            s = rt.stats()
            assert (s["running"], s["waiting"], s["used_blocks"]) == (0, 0, 0)
            return toks

        assert asyncio.run(main()) == solo
        _idle(rt)
    finally:
        rt.detach()


# ------------------------------------------------------------------ property: any argument


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(min_value=-5, max_value=200), max_size=3),
)


@given(
    max_new_tokens=_values,
    temperature=_values,
    top_p=_values,
    top_k=_values,
    seed=_values,
    stop_token_ids=_values,
    logprobs=_values,
)
def test_any_argument_values_give_a_typed_error_or_a_correct_result(
    arch_setup: Callable[[str], ArchSetup],
    max_new_tokens: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    seed: Any,
    stop_token_ids: Any,
    logprobs: Any,
) -> None:
    rt = _shared_runtime(arch_setup("llama"))
    kw = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=stop_token_ids,
        logprobs=logprobs,
    )
    before = rt.stats()
    try:
        (res,) = rt.generate([CONV[:6]], "alora_qv", **kw)
    except alora.AloraError:
        after = rt.stats()
        assert after == before
        return
    assert res.finish_reason in ("stop", "length")
    assert 1 <= len(res.token_ids) <= max(1, min(int(max_new_tokens), 10**6))
    if stop_token_ids:
        assert all(t not in stop_token_ids for t in res.token_ids[:-1])
    if temperature == 0:
        ref = rt.generate(
            [CONV[:6]], "alora_qv", max_new_tokens=len(res.token_ids), stop_token_ids=()
        )
        assert res.token_ids == ref[0].token_ids
    _idle(rt)


_SHARED: dict[int, AdapterRuntime] = {}


def _shared_runtime(setup: ArchSetup) -> AdapterRuntime:
    if id(setup) not in _SHARED:
        _SHARED[id(setup)] = _runtime(setup, max_model_len=64)
    return _SHARED[id(setup)]


@pytest.fixture(scope="module", autouse=True)
def _close_shared() -> Iterator[None]:
    yield
    for rt in _SHARED.values():
        rt.detach()
    _SHARED.clear()


_token_like = st.one_of(
    st.integers(min_value=-3, max_value=300),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=2),
    st.none(),
)


@given(
    prompt=st.one_of(
        st.lists(st.integers(min_value=10, max_value=120), min_size=1, max_size=8),
        st.lists(_token_like, max_size=6),
        st.text(max_size=4),
        st.none(),
        st.integers(),
    ),
    adapter=st.one_of(st.none(), st.sampled_from(["alora_all", "lora_mlp", "nope", ""])),
    stop=st.one_of(st.none(), st.lists(_token_like, max_size=3)),
)
def test_add_request_any_prompt_gives_a_typed_error_or_the_generate_result(
    arch_setup: Callable[[str], ArchSetup], prompt: Any, adapter: Any, stop: Any
) -> None:
    rt = _shared_runtime(arch_setup("llama"))
    before = rt.stats()
    try:
        rid = rt.add_request(prompt, adapter=adapter, max_new_tokens=2, stop_token_ids=stop)
    except alora.AloraError:
        assert rt.stats() == before
        return
    done = _drain_results(rt)
    ref = rt.generate([prompt], adapter, max_new_tokens=2, stop_token_ids=stop)[0]
    assert done[rid].token_ids == ref.token_ids
    _idle(rt)


@given(value=_values)
def test_abort_and_unload_of_anything_are_typed(
    arch_setup: Callable[[str], ArchSetup], value: Any
) -> None:
    rt = _shared_runtime(arch_setup("llama"))
    before = rt.stats()
    with pytest.raises(alora.AloraError):
        rt.abort(value)
    with pytest.raises(alora.AloraError):
        rt.unload_adapter(value)
    with pytest.raises(alora.AloraError):
        rt.load_adapter(value, "/nonexistent/adapter")
    assert rt.stats() == before


def _drain_results(rt: AdapterRuntime) -> dict[int, Any]:
    done: dict[int, Any] = {}
    while rt.has_unfinished():
        for out in rt.step():
            if out.finished:
                done[out.request_id] = out.result
    return done
