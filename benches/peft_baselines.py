"""Shared code of the end-to-end benches: model loading, random adapters that both our
runtime and PEFT can load, PEFT models with many adapters, and timed Hugging Face generation
(the PEFT and base-model baselines).

Timing rule for every baseline: the clock starts when the user-visible call starts (cache
copies included) and the first token is the moment `generate` hands it to its streamer.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from alora.demo_model import DEMO_CONFIG, load_model
from alora.testing import make_lora_config, tiny_model

# ------------------------------------------------------------------------------ models


def bench_model(path: str | None, layers: int | None = None) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer): the demo model (optionally with `layers` decoder layers, to size a
    run for the CPU) or a local transformers directory."""
    if path is None and layers is not None:
        cfg = {**DEMO_CONFIG, "num_hidden_layers": layers}
        return tiny_model("granite", seed=0, **cfg), None
    if path is not None and layers is not None:
        print("note: --layers applies to the demo model only; ignored for --model", file=sys.stderr)
    return load_model(path)


def model_info(model: PreTrainedModel, path: str | None) -> dict[str, Any]:
    cfg = model.config
    return {
        "model": path or "demo",
        "arch": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
    }


def fresh_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An independent copy, so that each system owns its model (a runtime attaches hooks)."""
    return copy.deepcopy(model).eval()


# ------------------------------------------------------------------------------ adapters


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    kind: str  # "lora" | "alora"
    rank: int
    targets: tuple[str, ...]
    invocation: tuple[int, ...] | None
    seed: int

    def config(self, kind: str | None = None) -> Any:
        k = kind or self.kind
        return make_lora_config(
            k,  # type: ignore[arg-type]
            r=self.rank,
            targets=self.targets,
            invocation_tokens=self.invocation if k == "alora" else None,
        )


def random_state_dict(model: PreTrainedModel, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """A PEFT-format state dict (keys as from `get_peft_model_state_dict`) of random weights.

    Built directly rather than through `get_peft_model` on a model copy, so that hundreds of
    adapters take seconds, not minutes. Both A and B are non-zero so LoRA compute is real."""
    gen = torch.Generator().manual_seed(spec.seed)
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in spec.targets or not isinstance(mod, torch.nn.Linear):
            continue
        a = torch.randn(spec.rank, mod.in_features, generator=gen) / mod.in_features**0.5
        b = torch.randn(mod.out_features, spec.rank, generator=gen) * 0.01
        out[f"base_model.model.{name}.lora_A.weight"] = a
        out[f"base_model.model.{name}.lora_B.weight"] = b
    return out


def build_peft_model(
    model: PreTrainedModel,
    adapters: Sequence[tuple[str, Any, dict[str, torch.Tensor]]],
    *,
    copy_model: bool = True,
) -> Any:
    """A PeftModel over (a copy of) `model` holding every (name, LoraConfig, state dict).

    The first adapter goes through `get_peft_model`; the others are added to each targeted
    LoraLayer with `update_layer`, which is what `add_adapter` does per module, without its
    whole-model walks per call (quadratic in the adapter count: hours for 512 adapters). The
    model is the same as `add_adapter` + `set_peft_model_state_dict` build (checked in
    `_check_fast_build`)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    base = fresh_copy(model) if copy_model else model
    first_name, first_cfg, first_sd = adapters[0]
    pm = get_peft_model(base, first_cfg, adapter_name=first_name)
    set_peft_model_state_dict(pm, first_sd, adapter_name=first_name)
    layers = [
        (name.removeprefix("base_model.model."), mod)
        for name, mod in pm.named_modules()
        if isinstance(mod, LoraLayer)
    ]
    for adapter, cfg, sd in adapters[1:]:
        pm.peft_config[adapter] = cfg
        for path, mod in layers:
            leaf = path.rsplit(".", 1)[-1]
            if leaf not in cfg.target_modules:
                continue
            mod.update_layer(adapter, cfg.r, cfg.lora_alpha, cfg, target_name=leaf)
            prefix = f"base_model.model.{path}"
            mod.lora_A[adapter].weight.data.copy_(sd[f"{prefix}.lora_A.weight"])
            mod.lora_B[adapter].weight.data.copy_(sd[f"{prefix}.lora_B.weight"])
    pm.requires_grad_(False)
    return pm.eval()


def _check_fast_build(model: PreTrainedModel, adapters: Sequence[tuple[str, Any, Any]]) -> float:
    """Max |logit difference| between `build_peft_model` and PEFT's add_adapter route."""
    from peft import get_peft_model, set_peft_model_state_dict

    fast = build_peft_model(model, adapters)
    slow = get_peft_model(fresh_copy(model), adapters[0][1], adapter_name=adapters[0][0])
    for name, cfg, sd in adapters:
        if name != adapters[0][0]:
            slow.add_adapter(name, cfg)
        set_peft_model_state_dict(slow, sd, adapter_name=name)
    slow.eval()
    ids = torch.randint(16, model.config.vocab_size, (len(adapters), 24))
    names = [a[0] for a in adapters]
    with torch.inference_mode():
        a = fast(input_ids=ids, adapter_names=names).logits
        b = slow(input_ids=ids, adapter_names=names).logits
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------ generation


class _TimingStreamer(BaseStreamer):
    """Records the time of every generation step (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class HFGen:
    tokens: torch.Tensor  # [B, new] generated ids
    ttft: float  # seconds from the call to the first token
    latency: float  # seconds from the call to the end
    step_times: list[float] = field(default_factory=list)  # seconds since the call, per token
    cache: Any = None


@torch.inference_mode()
def hf_generate(
    model: Any,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    past_key_values: Any = None,
    copy_cache: bool = False,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> HFGen:
    """Greedy `generate` of exactly `max_new_tokens` tokens (EOS ignored, so every system
    produces the same number of tokens), timed per token.

    `copy_cache`: deep-copy `past_key_values` first, as PEFT documents for aLoRA cache reuse
    (the copy is inside the timed region: the user pays for it)."""
    t0 = time.perf_counter()
    cache = copy.deepcopy(past_key_values) if copy_cache else past_key_values
    if cache is None:
        cache = DynamicCache()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    streamer = _TimingStreamer()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )
    t1 = time.perf_counter()
    steps = [t - t0 for t in streamer.times]
    return HFGen(
        tokens=out.sequences[:, input_ids.shape[1] :],
        ttft=steps[0] if steps else t1 - t0,
        latency=t1 - t0,
        step_times=steps,
        cache=out.past_key_values,
    )


def left_pad(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a left-padded batch, as HF generation expects."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def computed_hf(prompt_len: int, cached: int, new_tokens: int) -> int:
    """Tokens an HF forward runs for one sequence: the uncached prompt plus every decode input."""
    return prompt_len - cached + max(new_tokens - 1, 0)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(torch.quantile(t, q / 100.0))


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)
