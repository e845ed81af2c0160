"""`alora demo --tiny --quick`: the chain's accounting, read back from its JSON, and the
CLI's argument errors. (The demo on the real model: tests/test_real_model.py and CI.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alora.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo") / "demo.json"
    assert main(["demo", "--tiny", "--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _calls(demo: dict[str, Any], mode: str, role: str | None = None) -> list[dict[str, Any]]:
    calls = demo["chains"][mode]["calls"]
    return [c for c in calls if role is None or c["role"] == role]


def test_chain_shape(demo: dict[str, Any]) -> None:
    cfg = demo["config"]
    n_intr, n_plain = len(demo["intrinsics"]), len(demo["plain_lora"])
    assert n_intr >= 3 and n_plain >= 1
    for mode in ("alora", "lora"):
        calls = _calls(demo, mode)
        assert len(calls) == cfg["turns"] * (1 + n_intr + n_plain)
        assert {c["turn"] for c in calls} == set(range(1, cfg["turns"] + 1))
        for c in calls:
            assert c["preemptions"] == 0  # the accounting below assumes no recomputation
            assert c["generated"] >= 1
            # The runtime counts prefill tokens plus every fed decode token.
            assert c["computed_tokens"] == c["prompt_tokens"] - c["cached_tokens"] + (
                c["generated"] - 1
            )
            assert c["prefill_computed"] == c["prompt_tokens"] - c["cached_tokens"]


def test_alora_intrinsics_reuse_the_base_conversation(demo: dict[str, Any]) -> None:
    invocation = {i["name"]: i["invocation_tokens"] for i in demo["intrinsics"]}
    calls = _calls(demo, "alora", "intrinsic")
    assert calls
    for c in calls:
        inv = invocation[c["intrinsic"]]
        assert c["served_as"] == "alora" and c["adapter"] == c["intrinsic"]
        assert c["prompt_tokens"] == c["conversation_tokens"] + len(inv)
        # Everything before the invocation comes from the base model's cache, except the
        # conversation's last token: the base sampled it but never ran it through the model.
        assert c["cached_tokens"] >= c["conversation_tokens"] - 1
        assert c["prefill_computed"] <= len(inv) + 1
        # Only the invocation and the fed decode tokens get LoRA compute.
        assert c["lora_tokens"] == len(inv) + c["generated"] - 1


def test_lora_calls_never_reuse_base_tokens(demo: dict[str, Any]) -> None:
    calls = _calls(demo, "lora", "intrinsic") + _calls(demo, "lora", "rewrite")
    assert calls
    previous: dict[str, int] = {}  # adapter -> conversation length of its previous call
    for c in calls:  # chain order: turn by turn
        assert c["served_as"] == "lora"
        # A LoRA adapts every token: all computed tokens got LoRA compute, and the only KV it
        # may reuse is what it computed itself on an earlier turn (never the base model's).
        assert c["lora_tokens"] == c["computed_tokens"]
        assert c["cached_tokens"] <= previous.get(c["adapter"], 0)
        previous[c["adapter"]] = c["conversation_tokens"]
    assert all(c["cached_tokens"] == 0 for c in calls if c["turn"] == 1)


def test_base_calls_get_no_lora(demo: dict[str, Any]) -> None:
    for mode in ("alora", "lora"):
        base = _calls(demo, mode, "base")
        assert base and all(c["lora_tokens"] == 0 and c["adapter"] is None for c in base)
        # From turn 2 on, the base continues the conversation on its own cache.
        later = [c for c in base if c["turn"] > 1]
        assert later and all(c["cached_tokens"] > 0 for c in later)


def test_totals(demo: dict[str, Any]) -> None:
    s = demo["summary"]
    a, b = s["alora"], s["lora"]
    for mode, totals in (("alora", a), ("lora", b)):
        intr = _calls(demo, mode, "intrinsic")
        assert totals["intrinsic_prefill_computed"] == sum(c["prefill_computed"] for c in intr)
        assert totals["intrinsic_ttft_s"] == pytest.approx(sum(c["ttft_s"] for c in intr))
    assert a["intrinsic_prefill_computed"] < b["intrinsic_prefill_computed"]
    assert a["intrinsic_computed"] < b["intrinsic_computed"]
    assert s["computed_ratio"] == pytest.approx(
        b["intrinsic_prefill_computed"] / a["intrinsic_prefill_computed"]
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("certainty", "expected NAME=PATH"),
        ("=some/dir", "expected NAME=PATH"),
        ("certainty=", "expected NAME=PATH"),
        ("certainty=/nonexistent/adapter", "is not a directory"),
    ],
)
def test_adapter_spec_errors(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--adapter", spec])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and message in err


def test_adapter_dir_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--adapter", f"x={tmp_path}"])
    assert exc.value.code == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_duplicate_adapter_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    assert main(["demo", "--adapter", f"x={tmp_path}", "--adapter", f"x={tmp_path}"]) == 2
    assert "distinct" in capsys.readouterr().err


def test_check_kernels_forwards_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import alora.kernels.check as check

    seen: list[list[str]] = []
    monkeypatch.setattr(check, "main", lambda argv: seen.append(list(argv)) or 3)
    assert main(["check-kernels", "--arch", "sm_90", "--no-cache"]) == 3
    assert seen == [["--arch", "sm_90", "--no-cache"]]


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_real_adapters(tmp_path: Path) -> None:
    """`--adapter NAME=PATH`: an aLoRA adapter becomes the intrinsic (judged through its own
    invocation tokens, and compared with its weights as LoRA); a LoRA one is a plain call."""
    from alora.testing import make_peft_adapter, tiny_model, tiny_tokenizer

    model = tiny_model("granite")  # the shapes of the --quick model
    inv = tiny_tokenizer(128)("<|system|> is it true ?", add_special_tokens=False)["input_ids"]
    judge = make_peft_adapter(model, tmp_path / "judge", "alora", r=4, invocation_tokens=inv)
    rw = make_peft_adapter(model, tmp_path / "rw", "lora", r=4, targets=("q_proj", "v_proj"))
    out = tmp_path / "demo.json"
    argv = ["demo", "--tiny", "--quick", "--turns", "1", "--json", str(out)]
    assert main([*argv, "--adapter", f"judge={judge}", "--adapter", f"rw={rw}"]) == 0
    data = json.loads(out.read_text())
    assert data["intrinsics"] == [
        {"name": "judge", "lora_name": "judge-lora", "invocation_tokens": list(inv)}
    ]
    assert data["plain_lora"] == ["rw"]
    (a,) = _calls(data, "alora", "intrinsic")
    (b,) = _calls(data, "lora", "intrinsic")
    assert a["adapter"] == "judge" and b["adapter"] == "judge-lora"
    assert a["cached_tokens"] >= a["conversation_tokens"] - 1 and b["cached_tokens"] == 0
    assert [c["adapter"] for c in _calls(data, "alora", "rewrite")] == ["rw"]


def test_no_alora_adapter_to_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alora.testing import make_peft_adapter, tiny_model

    rw = make_peft_adapter(tiny_model("granite"), tmp_path / "rw", "lora", r=4)
    assert main(["demo", "--tiny", "--quick", "--turns", "1", "--adapter", f"rw={rw}"]) == 2
    assert "no aLoRA adapter" in capsys.readouterr().err
