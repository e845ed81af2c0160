"""Tiny random models and PEFT adapters, for tests, demos and benchmarks.

Nothing here downloads anything: models are built from configs with random weights, and
adapters are made and saved by PEFT itself, so they are real PEFT artefacts.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from alora.backend import LoraBatch

ARCHS: tuple[str, ...] = ("llama", "granite", "mistral", "qwen2", "qwen3")
ALL_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "granite": GraniteConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A small config of `arch` (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128)."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    kw: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        # Larger than the default 0.02 so that logits are well separated and greedy
        # decoding is not decided by float rounding.
        "initializer_range": 0.1,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    if arch == "granite":
        # Non-trivial multipliers, so a runtime that ignores them fails the equivalence tests.
        kw.update(
            attention_multiplier=0.3,
            embedding_multiplier=2.0,
            residual_multiplier=0.7,
            logits_scaling=2.0,
        )
    if arch == "mistral":
        kw["sliding_window"] = None
    if arch == "qwen2":
        kw["use_sliding_window"] = False
    kw.update(overrides)
    return _CONFIGS[arch](**kw)


def tiny_model(
    arch: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    **overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `arch`, in eval mode, deterministic in `seed`."""
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
    return model.to(device).eval()


def make_lora_config(
    kind: Literal["lora", "alora"] = "alora",
    *,
    r: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    invocation_tokens: Sequence[int] | None = None,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layers_to_transform: Sequence[int] | None = None,
) -> Any:
    """A peft `LoraConfig` with `init_lora_weights=False`, so that B is non-zero."""
    from peft import LoraConfig

    if kind == "alora" and not invocation_tokens:
        raise ValueError("an aLoRA adapter needs invocation_tokens")
    if kind not in ("lora", "alora"):
        raise ValueError(f"kind must be 'lora' or 'alora', not {kind!r}")
    kwargs: dict[str, Any] = {}
    if kind == "alora":
        kwargs["alora_invocation_tokens"] = [int(t) for t in invocation_tokens or ()]
    if layers_to_transform is not None:
        kwargs["layers_to_transform"] = list(layers_to_transform)
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        **kwargs,
    )


def _peft_model(model: PreTrainedModel, config: Any, seed: int) -> Any:
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    return peft_model


def make_peft_adapter(
    model: PreTrainedModel,
    directory: str | Path,
    kind: Literal["lora", "alora"] = "alora",
    *,
    r: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    invocation_tokens: Sequence[int] | None = None,
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layers_to_transform: Sequence[int] | None = None,
) -> Path:
    """Make a random adapter for `model` with PEFT and `save_pretrained` it to `directory`.

    `model` is not modified (PEFT works on a deep copy). Returns the directory.
    """
    config = make_lora_config(
        kind,
        r=r,
        alpha=alpha,
        targets=targets,
        invocation_tokens=invocation_tokens,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=layers_to_transform,
    )
    peft_model = _peft_model(model, config, seed)
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    return directory


def make_peft_state_dict(
    model: PreTrainedModel,
    kind: Literal["lora", "alora"] = "alora",
    *,
    seed: int = 0,
    **config_kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, state dict as from `get_peft_model_state_dict`) of a random adapter."""
    from peft import get_peft_model_state_dict

    config = make_lora_config(kind, **config_kwargs)
    peft_model = _peft_model(model, config, seed)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return config, state


def set_invocation_string(directory: str | Path, invocation_string: str) -> None:
    """Rewrite a saved aLoRA config in the older format: `invocation_string` only."""
    path = Path(directory) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("alora_invocation_tokens", None)
    cfg["invocation_string"] = invocation_string
    path.write_text(json.dumps(cfg))


def activation_start(tokens: Sequence[int], invocation: Sequence[int]) -> int | None:
    """First index of the last occurrence of `invocation` in `tokens` (PEFT's rule), or None."""
    n, m = len(tokens), len(invocation)
    inv = list(invocation)
    for s in range(n - m, -1, -1):
        if list(tokens[s : s + m]) == inv:
            return s
    return None


class PeftReference:
    """From-scratch PEFT forwards of full sequences: the oracle of the equivalence tests.

    Holds one PeftModel per adapter directory (each over its own copy of the base model),
    so references never share injected layers.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._peft: dict[str, Any] = {}

    def _adapter_model(self, adapter_dir: str | Path) -> Any:
        from peft import PeftModel

        key = str(adapter_dir)
        if key not in self._peft:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(self.model), key)
            self._peft[key] = peft_model.eval()
        return self._peft[key]

    @torch.inference_mode()
    def logits(
        self,
        tokens: Sequence[int],
        adapter_dir: str | Path | None = None,
        *,
        prompt_len: int | None = None,
    ) -> torch.Tensor:
        """float32 logits [len(tokens), V] of one sequence.

        For aLoRA the activation start is searched in the first `prompt_len` tokens only (the
        prompt), as the runtime does; generated tokens never move it.
        """
        device = self.model.device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        if adapter_dir is None:
            return self.model(input_ids=ids).logits[0].float()
        peft_model = self._adapter_model(adapter_dir)
        cfg = peft_model.peft_config["default"]
        invocation = getattr(cfg, "alora_invocation_tokens", None)
        if not invocation:
            return peft_model(input_ids=ids).logits[0].float()
        prompt = list(tokens)[: prompt_len if prompt_len is not None else len(tokens)]
        s = activation_start(prompt, invocation)
        offsets = [None if s is None else len(tokens) - s]
        return peft_model(input_ids=ids, alora_offsets=offsets).logits[0].float()


def random_prompt(
    rng: np.random.Generator,
    length: int,
    *,
    vocab: int = 128,
    low: int = 3,
    invocation: Sequence[int] | None = None,
    at: Sequence[int] = (),
) -> list[int]:
    """Random token ids in [low, vocab) with `invocation` written at each index of `at`."""
    tokens = [int(t) for t in rng.integers(low, vocab, size=length)]
    for pos in at:
        assert invocation is not None and pos + len(invocation) <= length
        tokens[pos : pos + len(invocation)] = list(invocation)
    return tokens


_WORDS = [
    "the",
    "a",
    "is",
    "are",
    "was",
    "be",
    "to",
    "of",
    "and",
    "in",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "at",
    "by",
    "this",
    "not",
    "or",
    "but",
    "from",
    "what",
    "which",
    "who",
    "when",
    "where",
    "how",
    "why",
    "yes",
    "no",
    "maybe",
    "certain",
    "uncertain",
    "answer",
    "question",
    "user",
    "assistant",
    "system",
    "hello",
    "world",
    "model",
    "cache",
    "adapter",
    "token",
    "block",
    "prefix",
    "safe",
    "unsafe",
    "can",
    "could",
    "should",
    "would",
    "will",
    "i",
    "you",
    "we",
    "they",
    "he",
    "she",
    "my",
    "your",
    "our",
    "their",
    "good",
    "bad",
    "true",
    "false",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    ".",
    ",",
    "?",
    "!",
]


def tiny_tokenizer(vocab_size: int = 128) -> Any:
    """A word-level fast tokenizer over `vocab_size` ids with a chat template; ids 0/1/2 are
    pad/bos/eos, matching `tiny_config`. Words outside the vocabulary map to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    words = [w for w in _WORDS if w not in specials]
    vocab_list = specials + words
    vocab_list += [f"w{i}" for i in range(len(vocab_list), vocab_size)]
    vocab = {w: i for i, w in enumerate(vocab_list[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


def make_lora_batch(
    seg_tokens: Sequence[Sequence[int]],
    ranks: Sequence[int],
    rows: Sequence[Sequence[int]],
    scales: Sequence[float],
) -> LoraBatch:
    """A `LoraBatch` on the CPU from plain lists: per segment its tokens (indices into the
    step's token axis), its rank, its pool row ids (A and Bt alike) and its scale; the form
    the backend tests and the kernel bench build by hand."""
    starts = np.cumsum([0] + [len(t) for t in seg_tokens])
    rstarts = np.cumsum([0, *ranks])
    return LoraBatch(
        token_idx=torch.tensor([t for seg in seg_tokens for t in seg], dtype=torch.int64),
        seg_start=torch.tensor(starts, dtype=torch.int32),
        seg_rank=torch.tensor(list(ranks), dtype=torch.int32),
        seg_row_start=torch.tensor(rstarts, dtype=torch.int32),
        rows=torch.tensor([r for rs in rows for r in rs], dtype=torch.int32),
        seg_scale=torch.tensor(list(scales), dtype=torch.float32),
        seg_start_host=tuple(int(v) for v in starts),
        seg_rank_host=tuple(ranks),
        seg_row_start_host=tuple(int(v) for v in rstarts),
        seg_scale_host=tuple(scales),
        max_rank=max(ranks),
        max_seg_tokens=max(len(t) for t in seg_tokens),
    )
