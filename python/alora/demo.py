"""`alora demo`: a multi-turn agentic chain on one conversation, served twice.

1. aLoRA: the base model answers each user turn; every intrinsic (an aLoRA adapter) judges
   the conversation so far by appending its invocation tokens, so the runtime reuses the
   base model's KV cache for the whole conversation and computes only the invocation.
2. LoRA: the same chain, with the intrinsics' very same weights loaded as plain LoRA. A
   LoRA adapts every token, so no base KV is valid for it: each call computes the
   conversation with its own weights (the prefix cache still lets it reuse the KV it
   computed itself on an earlier turn, as any prefix-caching engine would).

Per call it prints prompt tokens, tokens reused from the cache, tokens computed and time to
first token, then the totals of both chains and their ratios. Nothing is downloaded: the
default model is `alora.demo_model` (random weights) and the adapters are made by PEFT.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# A handful of plain English words: every one is in the demo tokenizer's vocabulary and
# tokenizes sensibly with any real tokenizer (`--model`).
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

# name -> invocation text of the embedded intrinsics (aLoRA) and the plain LoRA's instruction.
DEMO_INTRINSICS: dict[str, str] = {
    "certainty": "<|system|> how certain is the answer ?",
    "answerability": "<|system|> can the assistant answer the question ?",
    "safety": "<|system|> is the answer safe ?",
}
REWRITE_NAME = "rewrite"
REWRITE_INSTRUCTION = "<|system|> what is the question ?"


@dataclass(frozen=True)
class DemoSizes:
    """Lengths of the chain, in tokens (approximate with a real tokenizer)."""

    turns: int
    user_words: int  # words of each user turn (a question plus a retrieved passage)
    answer_tokens: int  # base model's answer per turn
    judge_tokens: int  # each intrinsic's output
    rewrite_tokens: int  # the plain LoRA's output
    rank: int  # rank of the embedded adapters


# About a minute on this 2-core machine: the conversation grows to ~2k tokens over 6 turns.
DEFAULT_SIZES = DemoSizes(
    turns=6, user_words=330, answer_tokens=12, judge_tokens=4, rewrite_tokens=6, rank=16
)
QUICK_SIZES = DemoSizes(
    turns=2, user_words=60, answer_tokens=6, judge_tokens=3, rewrite_tokens=3, rank=8
)


@dataclass
class Intrinsic:
    name: str  # adapter name when served as aLoRA
    lora_name: str  # the same weights loaded as plain LoRA
    path: Path
    invocation: list[int]


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
        "--model", metavar="PATH", help="local transformers model directory (default: embedded)"
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME=PATH",
        action="append",
        type=parse_adapter_spec,
        default=[],
        help="a PEFT adapter directory to use as an intrinsic (repeatable); aLoRA adapters "
        "are judged through their invocation tokens",
    )
    parser.add_argument("--turns", type=_positive_int, help="conversation turns (default: 6)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: 1 on machines with up to 4 cores, else torch's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of text and adapters")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and 2 short turns (for tests)"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# -------------------------------------------------------------------------------- text


class TextMaker:
    """Turns text into token ids with the model's tokenizer, or without one through a fixed
    word -> id map (so a tokenizer-less local model still runs)."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, seed: int) -> None:
        import numpy as np

        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        words = sorted(set(_TEXT_WORDS) | {w for t in DEMO_INTRINSICS.values() for w in t.split()})
        ids = np.random.default_rng(1234).choice(
            np.arange(3, vocab_size), size=len(words), replace=False
        )
        self._ids = {w: int(i) for w, i in zip(words, ids, strict=True)}

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return [self._ids[w] for w in text.split()]
        return _ids(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def user_turn(self, n_words: int) -> list[int]:
        """A user message: a question and a retrieved passage, in the chat format."""
        q = [str(self.rng.choice(_QUESTION_WORDS))]
        q += [str(w) for w in self.rng.choice(_TEXT_WORDS, size=n_words - 2)]
        text = " ".join([*q, "?"])
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": text}]
            return _ids(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        if tok is None:
            return self.encode(text)
        return self.encode(f"User: {text}\nAssistant:")


def _ids(value: Any) -> list[int]:
    """Token ids out of whatever a tokenizer call returned (list, BatchEncoding, tensor)."""
    if hasattr(value, "keys") and "input_ids" in value.keys():  # noqa: SIM118 (BatchEncoding)
        value = value["input_ids"]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if value and isinstance(value[0], list):
        value = value[0]
    return [int(t) for t in value]


# -------------------------------------------------------------------------------- setup


def _progress(iterable: Iterable[Any] | None = None, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def _build_model(model_path: str | None, quick: bool) -> tuple[Any, Any]:
    if model_path is not None:
        from alora.demo_model import load_model

        return load_model(model_path)
    if quick:
        from alora.testing import tiny_model, tiny_tokenizer

        return tiny_model("granite", max_position_embeddings=1024), tiny_tokenizer(128)
    from alora.demo_model import demo_model, demo_tokenizer

    return demo_model(), demo_tokenizer()


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


def _setup_adapters(
    rt: Any,
    model: Any,
    text: TextMaker,
    workdir: Path,
    given: Sequence[tuple[str, Path]],
    sizes: DemoSizes,
    seed: int,
) -> tuple[list[Intrinsic], list[str]]:
    """Load the intrinsics (aLoRA, plus their LoRA copies) and the plain LoRAs.

    Returns (intrinsics, plain LoRA names)."""
    from alora.testing import make_peft_adapter

    specs: list[tuple[str, Path | None, str | None]] = []  # (name, dir, invocation text)
    if given:
        specs = [(name, path, None) for name, path in given]
    else:
        specs = [(n, None, inv) for n, inv in DEMO_INTRINSICS.items()]
        specs.append((REWRITE_NAME, None, None))
    intrinsics: list[Intrinsic] = []
    plain: list[str] = []
    for i, (name, path, inv_text) in enumerate(_progress(specs, desc="adapters", unit="ad")):
        if path is None:  # embedded: made and saved by PEFT itself
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
) -> tuple[Call, list[int]]:
    res = rt.generate([prompt], adapter, max_new_tokens=max_new_tokens)[0]
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
    )
    return call, list(res.token_ids)


def run_chain(
    rt: Any,
    mode: str,
    user_turns: Sequence[list[int]],
    intrinsics: Sequence[Intrinsic],
    plain: Sequence[str],
    rewrite_ids: list[int],
    sizes: DemoSizes,
    on_call: Callable[[Call], None],
) -> ChainResult:
    """Per turn: the plain LoRA(s) rewrite the user's question, the base model answers, and
    every intrinsic judges the conversation so far (served as `mode`: aLoRA or LoRA)."""
    n_calls = len(user_turns) * (1 + len(plain) + len(intrinsics))
    result = ChainResult(mode)
    conv: list[int] = []
    bar = _progress(total=n_calls, desc=f"chain ({mode})", unit="call", leave=False)
    t0 = time.perf_counter()
    try:
        for turn, user in enumerate(user_turns, 1):
            conv = conv + user
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
            on_call(call)
            bar.update()
            conv = conv + answer
            for intr in intrinsics:
                adapter = intr.name if mode == "alora" else intr.lora_name
                call, _ = _call(
                    rt, conv + intr.invocation, len(conv), turn=turn, role="intrinsic",
                    intrinsic=intr.name, adapter=adapter, served_as=mode,
                    max_new_tokens=sizes.judge_tokens,
                )  # fmt: skip
                result.calls.append(call)
                on_call(call)
                bar.update()
    finally:
        bar.close()
    result.wall_s = time.perf_counter() - t0
    result.conversation = conv
    return result


# -------------------------------------------------------------------------------- output

_HEADER = (
    f"{'turn':>4}  {'call':<13} {'adapter':<20} {'served':<6} {'prompt':>6} {'reused':>6} "
    f"{'computed':>8} {'TTFT ms':>8}"
)


def _row(c: Call) -> str:
    what = c.intrinsic if c.role == "intrinsic" else c.role
    return (
        f"{c.turn:>4}  {what or '':<13} {c.adapter or '-':<20} {c.served_as:<6} "
        f"{c.prompt_tokens:>6} {c.cached_tokens:>6} {c.prefill_computed:>8} "
        f"{c.ttft_s * 1000:>8.1f}"
    )


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
    }


def _print_summary(s: dict[str, Any]) -> None:
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
    print(
        "(LoRA calls reuse only the KV they computed themselves on earlier turns; the base "
        "model's KV is never valid for them.)"
    )


# -------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(args: argparse.Namespace) -> int:
    given: list[tuple[str, Path]] = list(args.adapter)
    names = [n for n, _ in given]
    if len(set(names)) != len(names):
        print("alora demo: error: --adapter names must be distinct", file=sys.stderr)
        return 2
    if given and args.model is None:
        print(
            "alora demo: note: --adapter without --model uses the embedded random model; "
            "the adapters must match its shapes",
            file=sys.stderr,
        )
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.turns is not None:
        sizes = DemoSizes(**{**asdict(sizes), "turns": args.turns})

    _set_threads(args.threads)
    t_start = time.perf_counter()
    with _progress(total=3, desc="building", unit="step") as bar:
        bar.set_postfix_str("model")
        model, tokenizer = _build_model(args.model, args.quick)
        bar.update()
        bar.set_postfix_str("runtime")
        import alora

        rt = alora.AdapterRuntime(model, tokenizer)
        bar.update()
        text = TextMaker(tokenizer, rt.geometry.vocab_size, args.seed)
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
    text: TextMaker,
    tmp: str,
    given: Sequence[tuple[str, Path]],
    sizes: DemoSizes,
) -> tuple[dict[str, ChainResult], list[Intrinsic], list[str]]:
    """Adapters, warm-up and both chains; no chains when there is nothing to compare."""
    import torch

    rewrite_ids = text.encode(REWRITE_INSTRUCTION)
    user_turns = [text.user_turn(sizes.user_words) for _ in range(sizes.turns)]
    intrinsics, plain = _setup_adapters(rt, model, text, Path(tmp), given, sizes, args.seed)
    if not intrinsics:
        print("alora demo: error: no aLoRA adapter to compare with LoRA", file=sys.stderr)
        return {}, intrinsics, plain
    _warm_up(rt, intrinsics, plain, rewrite_ids)

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.model or ('tiny granite' if args.quick else 'embedded granite')} "
        f"({n_params / 1e6:.1f}M params, {rt.geometry.num_layers} layers, "
        f"{rt.dtype}, {rt.device}, {torch.get_num_threads()} threads); intrinsics (aLoRA): "
        f"{', '.join(f'{i.name} [{len(i.invocation)} tok]' for i in intrinsics)}; "
        f"plain LoRA: {', '.join(plain) or '-'}"
    )
    print(
        "per call: prompt tokens; reused = prompt tokens whose KV came from the cache; "
        "computed = prompt tokens run through the model; TTFT = time to first token"
    )
    from tqdm.auto import tqdm

    chains: dict[str, ChainResult] = {}
    for mode, title in (
        ("alora", "intrinsics served as aLoRA (base KV reused)"),
        ("lora", "the same intrinsics served as plain LoRA"),
    ):
        rt.reset_prefix_cache()  # each chain starts cold: no help from the other
        print(f"\n== {title}\n{_HEADER}")
        chains[mode] = run_chain(
            rt, mode, user_turns, intrinsics, plain, rewrite_ids, sizes,
            on_call=lambda c: tqdm.write(_row(c), file=sys.stdout),
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
    _print_summary(summary)
    print(f"(demo took {total:.1f} s)")
    if args.json:
        payload = {
            "config": {
                "model": args.model or ("tiny-granite" if args.quick else "demo-granite"),
                "quick": bool(args.quick),
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
