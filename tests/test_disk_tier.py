"""The disk and host tiers through the runtime (issue 11): a request for an adapter whose
weights are not in memory waits only for its own read while others run, a tiny host LRU
re-reads adapters without changing any output, and registration reads no weights."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import alora
from alora import AdapterRuntime, _core
from alora.model import introspect
from alora.testing import make_peft_adapter, tiny_model


def test_a_slow_read_delays_only_its_own_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llama")
    path = make_peft_adapter(model, tmp_path / "a", "lora", targets=("q_proj", "v_proj"))
    with AdapterRuntime(model, kv_cache_blocks=64) as ref_rt:
        ref_rt.load_adapter("a", path)
        want = ref_rt.generate([[5, 6, 7, 8]], "a", max_new_tokens=4)[0].token_ids

    real = _core.read_adapter_weights
    gate = threading.Event()

    def slow(info: _core.AdapterInfo) -> _core.AdapterWeights:
        gate.wait(30)
        return real(info)

    monkeypatch.setattr(_core, "read_adapter_weights", slow)
    with AdapterRuntime(model, kv_cache_blocks=64) as rt:
        rt.load_adapter("a", path)
        order: list[tuple[int, bool]] = []  # (prompt index, finished) per delta
        for delta in rt.stream([[5, 6, 7, 8], [9, 10, 11]], ["a", None], max_new_tokens=4):
            order.append((delta.index, delta.finished))
            if delta.index == 1 and delta.finished:
                assert all(i == 1 for i, _ in order), "the adapter's request ran before its read"
                gate.set()  # the read lands only now
            if delta.index == 0 and delta.finished:
                assert delta.result is not None and delta.result.token_ids == want
        assert gate.is_set() and (0, True) in order
        assert rt.stats()["host_loads"] == 1


def test_a_tiny_host_tier_rereads_without_changing_outputs(tmp_path: Path) -> None:
    model = tiny_model("llama")
    paths = {
        f"ad{i}": make_peft_adapter(
            model, tmp_path / f"ad{i}", "lora", r=4 + 2 * i, targets=("q_proj",), seed=i
        )
        for i in range(3)
    }
    unit = introspect(model).kv_bytes_per_block(16)
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    names = [f"ad{i % 3}" for i in range(6)]
    runs = {}
    for label, host in (("roomy", 1 << 30), ("tiny", 1)):
        # Room on the device for one adapter at a time, and (tiny) none kept on the host:
        # every page-in reads the file again.
        with AdapterRuntime(
            model, kv_cache_blocks=64, adapter_memory=unit, host_adapter_memory=host, max_num_seqs=1
        ) as rt:
            for name, path in paths.items():
                rt.load_adapter(name, path)
            assert rt.stats()["host_bytes"] == 0  # registration read no weights
            # One call at a time: each new adapter's read evicts the previous one (no queued
            # request waits for it), so the tiny tier must read every adapter again.
            runs[label] = [
                rt.generate([p], n, max_new_tokens=3)[0].token_ids
                for p, n in zip(prompts, names, strict=True)
            ]
            stats = rt.stats()
            if label == "tiny":
                assert stats["host_evictions"] >= 5 and stats["host_loads"] == 6
                assert stats["host_adapters"] == 1
            tiers = {e.tier for e in rt.load_events()}
            assert tiers == {"disk", "device"}
    assert runs["tiny"] == runs["roomy"]


def test_registration_refuses_a_truncated_file_and_reads_lazily(tmp_path: Path) -> None:
    model = tiny_model("llama")
    path = make_peft_adapter(model, tmp_path / "a", "lora", targets=("q_proj",))
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    with AdapterRuntime(model, kv_cache_blocks=16) as rt:
        weights.write_bytes(data[:-4])
        with pytest.raises(alora.AdapterFormatError):
            rt.load_adapter("a", path)
        weights.write_bytes(data)
        info = rt.load_adapter("a", path)
        assert info.host_bytes > 0 and rt.stats()["host_bytes"] == 0
        # Replaced on disk after registration: the read refuses it, the request fails alone.
        weights.write_bytes(data[:-4] + b"\0\0\0\0")
        os.utime(weights, (1, 1))
        bad, good = rt.generate([[5, 6, 7], [5, 6, 7]], ["a", None], max_new_tokens=2)
        assert bad.finish_reason == "error" and isinstance(bad.error, alora.AdapterFormatError)
        assert good.finish_reason == "length"
