"""Smoke tests of benches/bench_memory.py's pure parts: the adapter writer and its cache, the
Zipf sampler, the traces, the statistics, the plot, the target verdicts, and the virtual-clock
driver against a fake runtime. The real runtime is needed only by the last test (skipped
without the extension)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import bench_memory as bm


def _modules(layers: int = 2, hidden: int = 8, inter: int = 16, kv: int = 4) -> list:
    shapes = {
        "q_proj": ("self_attn", hidden, hidden),
        "k_proj": ("self_attn", hidden, kv),
        "v_proj": ("self_attn", hidden, kv),
        "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }
    return [
        bm.LinearSpec(f"model.layers.{layer}.{block}.{leaf}", leaf, i, o)
        for layer in range(layers)
        for leaf, (block, i, o) in shapes.items()
    ]


# ------------------------------------------------------------------------------ adapters


def test_adapter_plans_are_deterministic_and_mixed() -> None:
    plans = [bm.adapter_plan(i, seed=3) for i in range(200)]
    assert plans == [bm.adapter_plan(i, seed=3) for i in range(200)]
    assert plans != [bm.adapter_plan(i, seed=4) for i in range(200)]
    for k in (2, 10, 64, 200):  # exactly half of every even prefix is aLoRA
        assert sum(p.kind == "alora" for p in plans[:k]) == k // 2
    assert {p.rank for p in plans} == {8, 16, 32, 64}
    assert {p.targets for p in plans} == {bm.QV_TARGETS, bm.ALL_TARGETS}
    for p in plans:
        assert (p.invocation is not None) == (p.kind == "alora")
        if p.invocation:
            assert len(p.invocation) == 3
            assert all(bm.INV_LO <= t < bm.TOKEN_LO for t in p.invocation)
        if p.rank_pattern:
            assert p.targets == bm.ALL_TARGETS
            assert set(p.rank_pattern) == set(bm.MLP)
            assert p.module_rank("gate_proj") == p.rank // 2
        assert p.module_rank("q_proj") == p.rank
        assert p.module_rank("k_proj") == (p.rank if p.targets == bm.ALL_TARGETS else 0)
    assert any(p.rank_pattern for p in plans)


def test_written_adapters_are_peft_layout(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    mods = _modules()
    store = bm.ensure_adapters(tmp_path, 6, mods, seed=1)
    assert store.written == 6 and len(store.dirs) == 6
    for plan, d in zip(store.plans, store.dirs, strict=True):
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == plan.rank
        assert cfg["target_modules"] == list(plan.targets)
        assert cfg["rank_pattern"] == plan.rank_pattern
        assert cfg["alora_invocation_tokens"] == (
            None if plan.invocation is None else list(plan.invocation)
        )
        tensors = load_file(str(d / "adapter_model.safetensors"))
        expected = {}
        for m in mods:
            r = plan.module_rank(m.leaf)
            if r:
                expected[f"base_model.model.{m.path}.lora_A.weight"] = (r, m.in_features)
                expected[f"base_model.model.{m.path}.lora_B.weight"] = (m.out_features, r)
        assert {k: v.shape for k, v in tensors.items()} == expected
        assert all(v.dtype == np.float16 and np.abs(v).sum() > 0 for v in tensors.values())
    assert store.bytes == sum((d / "adapter_model.safetensors").stat().st_size for d in store.dirs)


def test_adapter_weights_differ_and_dtype_option(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    mods = _modules(layers=1)
    store = bm.ensure_adapters(tmp_path, 12, mods, ranks=(8,), dtype="float32")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights = [load_file(str(d / "adapter_model.safetensors"))[key] for d in store.dirs]
    assert all(w.dtype == np.float32 and w.shape == (8, 8) for w in weights)
    assert len({w.tobytes() for w in weights}) == 12
    a = weights[0]
    assert 0.1 < float(a.std()) * np.sqrt(8) < 3.0  # A scaled by 1/sqrt(in)


def test_adapter_cache_is_reused_and_extended(tmp_path: Path) -> None:
    mods = _modules(layers=1)
    first = bm.ensure_adapters(tmp_path, 4, mods)
    blob = (first.dirs[2] / "adapter_model.safetensors").read_bytes()
    again = bm.ensure_adapters(tmp_path, 4, mods)
    assert again.written == 0 and again.root == first.root and again.bytes == first.bytes
    more = bm.ensure_adapters(tmp_path, 7, mods)
    assert more.written == 3 and len(more.plans) == 7
    assert (more.dirs[2] / "adapter_model.safetensors").read_bytes() == blob  # untouched
    fewer = bm.ensure_adapters(tmp_path, 5, mods)
    assert fewer.written == 0 and len(fewer.dirs) == 5
    assert json.loads((first.root / "manifest.json").read_text())["count"] == 7
    # Other parameters or another model: another folder.
    assert bm.ensure_adapters(tmp_path, 2, mods, ranks=(8,)).root != first.root
    assert bm.ensure_adapters(tmp_path, 2, _modules(layers=2)).root != first.root
    # A lost file is noticed and the adapters are written again.
    (more.dirs[6] / "adapter_model.safetensors").unlink()
    assert bm.ensure_adapters(tmp_path, 7, mods).written == 7


def test_adapter_units_estimate() -> None:
    mods = _modules(hidden=8, inter=16, kv=4)  # per layer: q 16, k 12, v 12, o 16, MLP 24 each
    plan = bm.AdapterPlan("x", "lora", 8, bm.QV_TARGETS, {}, None)
    assert bm.adapter_units(plan, mods, unit_elems=4) == (8 * 28 + 7) // 8
    full = bm.AdapterPlan("y", "lora", 4, bm.ALL_TARGETS, {"gate_proj": 2}, None)
    elems = 4 * (16 + 12 + 12 + 16 + 24 + 24) + 2 * 24
    assert bm.adapter_units(full, mods, unit_elems=8) == -(-elems // 16)


# ------------------------------------------------------------------------------ traces


def test_zipf_sampler() -> None:
    p = bm.zipf_probs(10, 1.0)
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) < 0)
    assert p[0] / p[1] == pytest.approx(2.0)
    assert np.allclose(bm.zipf_probs(5, 0.0), 0.2)
    rng = np.random.default_rng(0)
    draws = bm.zipf_sample(rng, 10, 1.0, 200_000)
    assert draws.min() >= 0 and draws.max() <= 9
    freq = np.bincount(draws, minlength=10) / draws.size
    assert np.allclose(freq, p, atol=0.005)
    big = bm.zipf_sample(rng, 10_000, 0.5, 1000)
    assert big.max() < 10_000 and len(set(big.tolist())) > 500
    with pytest.raises(ValueError):
        bm.zipf_probs(0, 1.0)


def _invocations(n: int) -> list:
    return [bm.adapter_plan(i).invocation for i in range(n)]


def test_zipf_trace_same_shape_for_every_n() -> None:
    invs = _invocations(1000)
    kw: dict[str, Any] = dict(
        alpha=1.0,
        requests=50,
        rate=4.0,
        prompt_len=(8, 20),
        output_len=(2, 6),
        invocations=invs,
        vocab=128,
    )
    small, big = bm.zipf_trace(n=64, **kw), bm.zipf_trace(n=1000, **kw)
    assert [c.start for c in small] == [c.start for c in big]
    assert [len(c.turns[0].user) for c in small] == [len(c.turns[0].user) for c in big]
    assert [c.turns[0].out_len for c in small] == [c.turns[0].out_len for c in big]
    assert small[0].start == 0.0 and all(b.start >= a.start for a, b in itertools.pairwise(small))
    assert max(c.adapter for c in small) < 64 and max(c.adapter for c in big) < 1000
    for c in big:
        (t,) = c.turns
        assert 8 <= len(t.user) <= 20 and 2 <= t.out_len <= 6
        inv = invs[c.adapter]
        if inv:
            assert list(t.user[-len(inv) :]) == list(inv)
            assert all(x >= bm.TOKEN_LO for x in t.user[: -len(inv)])
        else:
            assert all(bm.TOKEN_LO <= x < 128 for x in t.user)
    # Mean gap matches the rate (loosely).
    assert 0.1 < big[-1].start / (len(big) - 1) < 0.5


def test_shift_trace_phases() -> None:
    shape = bm.ShiftShape(a_convs=5, a_adapters=3, a_turns=4, b_requests=30, b_adapters=20)
    invs = _invocations(shape.adapters)
    convs = bm.shift_trace(shape, unit=0.01, invocations=invs, vocab=128, seed=2)
    assert convs == bm.shift_trace(shape, unit=0.01, invocations=invs, vocab=128, seed=2)
    assert [c.phase for c in convs] == sorted(c.phase for c in convs)
    by = {ph: [c for c in convs if c.phase == ph] for ph in "ABC"}
    for ph in "ABC":  # starts relative to the phase's start, in order
        assert [c.start for c in by[ph]] == sorted(c.start for c in by[ph])
    assert len(by["A"]) == len(by["C"]) == 5 and len(by["B"]) == 30
    for ph in "AC":
        for c in by[ph]:
            assert c.adapter < shape.a_adapters and len(c.turns) == 4
            assert c.turns[0].think == 0.0
            lo, hi = shape.a_think
            assert all(lo * 0.01 <= t.think <= hi * 0.01 for t in c.turns[1:])
            assert shape.a_first_len[0] <= len(c.turns[0].user) <= shape.a_first_len[1]
    assert all(c.start < shape.a_spread * 0.01 for c in by["A"] + by["C"])
    assert by["B"][0].start == 0.0 and by["B"][-1].start < 3 * shape.b_window * 0.01
    assert all(shape.a_adapters <= c.adapter < shape.adapters for c in by["B"])
    assert len({c.adapter for c in by["B"]}) > 10
    assert bm.trace_tokens(convs) <= shape.max_conversation_tokens()
    warn = bm.memory_warnings(
        shape,
        [bm.adapter_plan(i) for i in range(shape.adapters)],
        _modules(),
        unit_elems=8,
        units=40,
        splits=(0.1, 0.5),
        block_size=16,
    )
    assert any("0.1" in w and "KV units" in w for w in warn)


# ------------------------------------------------------------------------------ statistics


def test_percentile_and_summary() -> None:
    assert bm.percentile([], 50) is None
    assert bm.percentile(list(range(1, 101)), 50) == pytest.approx(50.5)
    assert bm.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    recs = [
        bm.TurnRecord(
            0, 0, "A", 0, 0.0, 10, 4, first=0.5, finish=1.0, out_tokens=4, cached_tokens=0
        ),
        bm.TurnRecord(
            0,
            1,
            "A",
            0,
            2.0,
            20,
            4,
            first=2.1,
            finish=3.0,
            out_tokens=4,
            cached_tokens=10,
            preemptions=1,
        ),
        bm.TurnRecord(1, 0, "B", 3, 1.0, 10, 2, first=1.5, finish=2.0, out_tokens=2),
    ]
    s = bm.summarize(recs, compute_s=2.0)
    assert s["out_tokens"] == 10 and s["makespan_s"] == 3.0
    assert s["throughput_tok_s"] == pytest.approx(10 / 3) and s["compute_tok_s"] == 5.0
    assert s["ttft_p50_s"] == pytest.approx(0.5) and s["prefix_hit_rate"] == 0.25
    assert s["preempted_turns"] == 1
    ph = bm.per_phase(recs)
    assert set(ph) == {"A", "B"} and ph["A"]["requests"] == 2
    assert bm.latency_summary([])["p50_s"] is None
    assert bm.latency_summary([0.1, 0.3])["count"] == 2


def test_median_row() -> None:
    def run(thr: float, p99: float, a99: float | None) -> dict[str, Any]:
        return {
            "system": "unified",
            "repeat": 0,
            "throughput_tok_s": thr,
            "ttft_p99_s": p99,
            "prefix_hit_rate": None,
            "steps": int(thr),
            "phases": {"A": {"requests": 3, "ttft_p99_s": a99}},
        }

    m = bm.median_row([run(10.0, 1.0, 0.5), run(30.0, 3.0, None), run(20.0, 9.0, 1.5)])
    assert m["throughput_tok_s"] == 20.0 and m["ttft_p99_s"] == 3.0
    assert m["prefix_hit_rate"] is None and m["steps"] == 10 and m["runs"] == 3
    assert m["phases"]["A"] == {"requests": 3, "ttft_p99_s": 1.0} and "repeat" not in m


def test_series_split_and_plot(tmp_path: Path) -> None:
    ser = bm.Series()
    for i in range(1000):
        kv = i % 50
        ser.add(
            i * 0.01,
            {
                "total_blocks": 100,
                "used_blocks": kv,
                "adapter_blocks": 20,
                "free_blocks": 80 - kv,
                "cached_blocks": kv // 2,
            },
        )
    d = ser.downsample(100)
    assert len(d["t"]) <= 101 and d["t"][-1] == pytest.approx(9.99) and d["t"][0] == 0.0
    assert set(d) == {"t", *bm.STAT_KEYS}
    s = bm.memory_split(d)
    assert np.all(s["kv_in_use"] + s["adapters"] + s["free"] == s["total"])
    assert not s["unaccounted"].any()
    leaky = dict(d, free_blocks=[0] * len(d["t"]))
    assert bm.memory_split(leaky)["unaccounted"].any()
    png = bm.plot_memory_split(
        [("unified", d, {"A": 0.0, "B": 5.0}), ("split-0.5", leaky, {})],
        tmp_path / "m.png",
        unit_bytes=8192,
        title="t",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rss_bytes() -> None:
    if not Path("/proc/self/statm").exists():
        pytest.skip("no /proc")
    before = bm.rss_bytes()
    # 64 MiB, touched: above glibc's largest dynamic mmap threshold (32 MiB), so it is fresh
    # memory even after earlier tests freed big arrays (16 MiB could come from freed heap
    # pages already resident, and RSS would not move).
    block = np.ones(64 << 20, dtype=np.uint8)
    assert bm.rss_bytes() - before > 32 << 20
    del block


class _Log:
    def __init__(self, drain: bool) -> None:
        self.drain, self.events = drain, [SimpleNamespace(adapter="old", tier="disk", seconds=9)]

    def load_events(self) -> list:
        out = list(self.events)
        if self.drain:
            self.events.clear()
        return out


@pytest.mark.parametrize("drain", [False, True])
def test_load_events_cumulative_or_draining(drain: bool) -> None:
    rt = _Log(drain)
    log = bm.LoadEvents(rt)
    assert log.available
    rt.events.append(SimpleNamespace(adapter="a", tier="disk", seconds=0.002))
    rt.events.append({"adapter": "a", "tier": "device", "seconds": 0.001})
    assert log.collect() == [("a", "disk", 0.002), ("a", "device", 0.001)]
    lat = bm.load_latency(log.collect() if not drain else [("a", "disk", 0.002)])
    assert lat["disk"]["count"] == 1 and lat["device"]["count"] == (0 if drain else 1)
    none = bm.LoadEvents(object())
    assert not none.available and none.collect() == []


def _row(system: str, thr: float, p99: float, **kw: Any) -> dict[str, Any]:
    return {"system": system, "throughput_tok_s": thr, "ttft_p99_s": p99, **kw}


def test_targets_and_markdown() -> None:
    reg = [
        {"n": 64, "seconds": 0.1, "rss_delta_bytes": 1e6, "host_bytes": 0},
        {"n": 10000, "seconds": 4.0, "rss_delta_bytes": 30e6, "host_bytes": 0},
        {"n": 10000, "seconds": 12.0, "rss_delta_bytes": 60e6, "host_bytes": 0},
    ]
    zipf = [
        _row("unified", 100.0, 1.0, n=64, alpha=1.0),
        _row("unified", 85.0, 1.0, n=10000, alpha=1.0),
        _row("unified", 100.0, 1.0, n=64, alpha=0.5),
        _row("unified", 70.0, 1.0, n=10000, alpha=0.5),
    ]
    shift = [
        _row("unified", 50.0, 2.0),
        _row("split-0.25", 30.0, 9.0),
        _row("split-0.5", 45.0, 3.0),
        _row("split-0.75", 48.0, 5.0),
    ]
    again = [{"n": 10000, "seconds": 2.5}]
    t = {x["name"]: x for x in bm.evaluate_targets(reg, zipf, shift, again)}
    assert t["registration time (s)"]["value"] == 4.0 and t["registration time (s)"]["met"]
    assert "2.50 s" in t["registration time (s)"]["note"]
    host = next(v for k, v in t.items() if k.startswith("host memory"))
    assert host["value"] == pytest.approx(30.0) and host["met"]
    assert t["throughput n=10000 / n=64 (Zipf alpha 1.0)"]["met"]
    assert t["throughput n=10000 / n=64 (Zipf alpha 0.5)"]["met"] is False
    thr = next(v for k, v in t.items() if "throughput (split-0.75)" in k)
    ttft = next(v for k, v in t.items() if "TTFT p99 (split-0.5)" in k)
    assert thr["value"] == pytest.approx(50 / 48) and thr["met"]
    assert ttft["value"] == pytest.approx(2 / 3) and ttft["met"]
    beats = next(v for k, v in t.items() if k.startswith("unified beats"))
    assert beats["met"] and beats["note"] == "on both"

    def verdict(rows: list) -> dict:
        return next(v for v in bm.evaluate_targets([], [], rows) if v["name"].startswith("unified"))

    # Better throughput, worse tail: beats on one ("and/or"); worse on both: missed.
    one = verdict([_row("unified", 50.0, 4.0), *shift[1:]])
    assert one["met"] and one["note"] == ""
    assert not verdict([_row("unified", 40.0, 4.0), *shift[1:]])["met"]
    # Quick runs: judged at the largest n, with a note.
    quick = bm.evaluate_targets([{**reg[0], "n": 1000}], [], [])
    assert quick[0]["n"] == 1000 and "10000" in quick[0]["note"]
    lines = bm.target_lines(list(t.values()))
    assert any("MISSED" in x for x in lines) and any(": met" in x for x in lines)

    for r in zipf:
        r.update(
            ttft_p50_s=0.5,
            load_latency={"disk": {"count": 2, "p50_s": 1e-3, "p99_s": 2e-3}},
            host_loads=2,
            adapter_loads=3,
        )
    for r in shift:
        r.update(
            compute_tok_s=60.0,
            ttft_p50_s=0.4,
            prefix_hit_rate=0.5,
            preempted_turns=1,
            phases={"A": {"ttft_p99_s": 1.0}},
        )
    d = {
        "unit_bytes": 8192,
        "registration": [{**r, "disk_bytes": 1e6} for r in reg],
        "zipf": zipf,
        "shift": {"runs": shift, "memory_bytes": 3 << 20, "units": 384},
        "targets": list(t.values()),
        "plot": "memory_memory_split.png",
    }
    md = "\n".join(bm.markdown(d))
    assert "| 10000 | 1.0 | unified | 85.0 |" in md and "1.00 / 2.00" in md
    assert "**missed**" in md and "**met**" in md and "memory_memory_split.png" in md


# ------------------------------------------------------------------------------ driver


class FakeRuntime:
    """Serves every request one token per step; prompts are recorded."""

    def __init__(self) -> None:
        self.live: dict[int, dict[str, Any]] = {}
        self.prompts: list[tuple[list[int], str | None]] = []
        self.steps = 0

    def reset_prefix_cache(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        n = len(self.live)
        return {
            "total_blocks": 8,
            "used_blocks": n,
            "adapter_blocks": 1,
            "free_blocks": 7 - n,
            "cached_blocks": 0,
            "adapter_loads": self.steps,
        }

    def add_request(
        self, prompt: list[int], *, adapter: str | None, max_new_tokens: int, stop_token_ids: tuple
    ) -> int:
        rid = len(self.prompts)
        self.prompts.append((list(prompt), adapter))
        self.live[rid] = {"max": max_new_tokens, "out": []}
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def step(self) -> list[Any]:
        self.steps += 1
        outs = []
        for rid, r in list(self.live.items()):
            tok = 100 + rid * 10 + len(r["out"])
            r["out"].append(tok)
            done = len(r["out"]) == r["max"]
            res = None
            if done:
                res = SimpleNamespace(token_ids=list(r["out"]), cached_tokens=1, preemptions=0)
                del self.live[rid]
            outs.append(SimpleNamespace(request_id=rid, new_token=tok, finished=done, result=res))
        return outs


def test_serve_drives_conversations_on_the_virtual_clock() -> None:
    convs = [
        bm.Conversation(0.0, 0, (bm.Turn((20, 21), 2, 0.0), bm.Turn((22,), 3, 5.0)), "A"),
        bm.Conversation(1000.0, None, (bm.Turn((30, 31, 32), 1, 0.0),), "B"),
    ]
    rt = FakeRuntime()
    res = bm.serve(rt, convs, ["ad0"])
    assert [p for p, _ in rt.prompts] == [[20, 21], [20, 21, 100, 101, 22], [30, 31, 32]]
    assert [a for _, a in rt.prompts] == ["ad0", "ad0", None]
    r0, r1, r2 = res.records
    assert (r0.turn, r1.turn, r2.phase) == (0, 1, "B")
    assert r1.release == pytest.approx(r0.finish + 5.0)  # think time after the last token
    assert r2.release == 1000.0 and r2.first > 1000.0  # idle jump to the arrival
    assert [r.out_tokens for r in res.records] == [2, 3, 1]
    assert res.steps == 6 and len(res.series.t) == 6 and res.compute_s > 0
    row = bm.run_row(res, system="fake")
    assert row["finished"] == 3 and row["adapter_loads"] == 6 and row["host_loads"] is None
    assert row["load_events_available"] is False and row["peak"]["used_blocks"] == 1


def test_serve_gates_phases() -> None:
    """With phases, a phase starts `gap` after the previous one's last token; conversation
    starts are relative to it."""
    convs = [
        bm.Conversation(0.0, 0, (bm.Turn((20,), 3, 0.0), bm.Turn((21,), 2, 0.5)), "A"),
        bm.Conversation(0.2, None, (bm.Turn((30,), 2, 0.0),), "A"),
        bm.Conversation(0.0, None, (bm.Turn((40,), 1, 0.0),), "B"),
        bm.Conversation(0.3, None, (bm.Turn((41,), 1, 0.0),), "B"),
        bm.Conversation(0.1, 0, (bm.Turn((50,), 1, 0.0),), "C"),
    ]
    rt = FakeRuntime()
    res = bm.serve(rt, convs, ["ad0"], phases="ABC", gap=1.0)
    recs = {(r.conv, r.turn): r for r in res.records}
    a_end = max(r.finish for r in res.records if r.phase == "A")
    b_end = max(r.finish for r in res.records if r.phase == "B")
    assert res.phase_starts["A"] == 0.0
    assert res.phase_starts["B"] == pytest.approx(a_end + 1.0)
    assert res.phase_starts["C"] == pytest.approx(b_end + 1.0)
    assert recs[(2, 0)].release == pytest.approx(a_end + 1.0)
    assert recs[(3, 0)].release == pytest.approx(a_end + 1.3)
    assert recs[(4, 0)].release == pytest.approx(b_end + 1.1)
    assert min(r.release for r in res.records if r.phase == "B") > a_end
    # Without phases: absolute starts, no phase starts reported.
    assert bm.serve(FakeRuntime(), convs, ["ad0"]).phase_starts == {}


def test_parse_quick() -> None:
    a = bm.parse(["--quick"])
    assert a.ns == [64, 1000] and a.out == "memory_quick" and a.requests < 256
    assert bm.parse([]).ns == [64, 1000, 10000]


def test_written_adapters_load_in_the_runtime(tmp_path: Path) -> None:
    pytest.importorskip("alora._core")
    from alora import AdapterRuntime
    from alora.testing import tiny_model

    model = tiny_model("granite", seed=0)
    mods = bm.linear_specs(model)
    assert len(mods) == 7 * model.config.num_hidden_layers
    store = bm.ensure_adapters(tmp_path, 4, mods)
    rt = AdapterRuntime(model, max_num_seqs=4, max_model_len=64)
    for name, path in zip(store.names, store.dirs, strict=True):
        info = rt.load_adapter(name, path)
        assert info.kind == bm.adapter_plan(int(name[2:])).kind
    plan = store.plans[1]  # an aLoRA
    prompt = [20, 21, 22, *plan.invocation]
    out = rt.generate([prompt], plan.name, max_new_tokens=2, stop_token_ids=())
    assert len(out[0].token_ids) == 2
    rt.detach()
