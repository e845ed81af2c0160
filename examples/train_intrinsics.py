"""Train the shipped RAG intrinsics on SmolLM2-135M-Instruct with PEFT, on the CPU, and
measure them.

    python examples/train_intrinsics.py train   # both tasks, aLoRA and LoRA (CPU minutes)
    python examples/train_intrinsics.py eval    # held-out accuracy + serving TTFT -> table

Tasks and data: `alora.rag_tasks` (synthetic passages about fictional people, labels known
by construction). Each task is trained twice on the same examples, same seed and same
hyper-parameters: as an aLoRA adapter (invoked by the task's instruction turn, adapting
only from there on) and as a plain LoRA (adapting every token). Both adapt q/k/v/o of the
top `--top-layers` layers only, which keeps training in CPU minutes: the layers below are
the base model's for both kinds, so their output is computed once per example and every
epoch runs only the adapted layers (see `Features`). The adapters are written to
`python/alora/intrinsics/<task>/{alora,lora}` in float16, so the package ships them.

`eval` scores held-out examples (generated with a different seed) by the first answer
token, yes vs no, for the base model prompted with the same instruction, the LoRA and the
aLoRA (full PEFT forwards, independent of the training shortcut), then serves each adapter
with `alora.AdapterRuntime` on a cached multi-turn conversation and reports the median
time to first token. It writes `examples/results/intrinsics.json` and prints the README
table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from alora import rag_tasks
from alora.models import load_model
from alora.rag_tasks import ADAPTER_DIR, TASKS

RESULTS = Path(__file__).parent / "results" / "intrinsics.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _examples(tok: Any, task: str, n: int, seed: int) -> list[tuple[list[int], int, bool]]:
    """(prompt ids ending with the invocation, invocation start, label)."""
    rng = random.Random(f"{task}-{seed}")
    inv = rag_tasks.encode(tok, rag_tasks.invocation_text(tok, task))
    out = []
    for _ in range(n):
        # One example in four has an earlier turn, so the intrinsic learns to judge the
        # last turn of a multi-turn chat (as in `alora demo`).
        turns = [rag_tasks.make_example(rng, task) for _ in range(1 + (rng.random() < 0.25))]
        conv = rag_tasks.encode(
            tok, tok.apply_chat_template(rag_tasks.messages(turns), tokenize=False)
        )
        out.append((conv + inv, len(conv), turns[-1].label(task)))
    return out


def _batch(
    rows: list[tuple[list[int], int, bool]], pad: int, targets: list[list[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded input ids + attention mask; returns the index of each prompt's last
    token (where the first answer token is predicted)."""
    seqs = [list(p) + (targets[i] if targets else []) for i, (p, _, _) in enumerate(rows)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, [len(p) - 1 for p, _, _ in rows]


def _peft(model: Any, kind: str, inv: list[int], rank: int, top_layers: int) -> Any:
    from peft import LoraConfig, get_peft_model

    extra: dict[str, Any] = {"alora_invocation_tokens": inv} if kind == "alora" else {}
    n = model.config.num_hidden_layers
    if 0 < top_layers < n:
        # Only the top layers: backward stops there, so a step costs about half as much.
        extra["layers_to_transform"] = list(range(n - top_layers, n))
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGETS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )
    return get_peft_model(model, cfg)


class Features:
    """Each training sequence (prompt + its label token) as the hidden states entering the
    first adapted layer. The layers below are never adapted, for LoRA and aLoRA alike, so
    these are the base model's and fixed: computed once, with no gradient, and reused by
    every epoch and by both kinds. A step then runs only the adapted top layers, and the
    output head only where the loss is (a third of the cost of a full forward/backward)."""

    def __init__(self, model: Any, tok: Any, rows: list, low: int) -> None:
        yes, no = rag_tasks.label_token_ids(tok)
        self.end = tok.convert_tokens_to_ids("<|im_end|>")
        self.rows = rows
        self.labels = [yes if lab else no for _, _, lab in rows]
        self.hidden: list[torch.Tensor] = []
        backbone = model.model
        with torch.no_grad():
            for i in range(0, len(rows), 16):
                seqs = [
                    [*p, lab]
                    for (p, _, _), lab in zip(
                        rows[i : i + 16], self.labels[i : i + 16], strict=True
                    )
                ]
                h, pos, pe = _embed(backbone, seqs)
                # Right padding: with causal attention no real token sees a pad.
                for layer in backbone.layers[:low]:
                    h = layer(h, position_ids=pos, position_embeddings=pe)
                self.hidden += [h[j, : len(s)].clone() for j, s in enumerate(seqs)]


def _embed(backbone: Any, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
    h = backbone.embed_tokens(ids)
    pos = torch.arange(width)[None].expand(len(seqs), width)
    return h, pos, backbone.rotary_emb(h, pos)


def train_one(
    args: argparse.Namespace, model: Any, tok: Any, task: str, kind: str, feats: Features
) -> dict:
    import contextlib

    torch.manual_seed(args.seed)
    inv = rag_tasks.encode(tok, rag_tasks.invocation_text(tok, task))
    peft_model = _peft(model, kind, inv, args.rank, args.top_layers)
    backbone = peft_model.base_model.model.model
    low = len(backbone.layers) - args.top_layers
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n = len(feats.rows)
    steps = args.epochs * (n // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps)
    )
    peft_model.train()
    rng = random.Random(args.seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        if step % (n // args.batch) == 0:
            order = list(range(n))
            rng.shuffle(order)
        idx = order[(step % (n // args.batch)) * args.batch :][: args.batch]
        hs = [feats.hidden[i] for i in idx]
        width = max(h.shape[0] for h in hs)
        h = torch.zeros((len(hs), width, hs[0].shape[1]))
        for j, x in enumerate(hs):
            h[j, : x.shape[0]] = x
        pos = torch.arange(width)[None].expand(len(hs), width)
        pe = backbone.rotary_emb(h, pos)
        # aLoRA: adapt from the invocation on (offsets count from the padded end, as PEFT's).
        hooks = (
            peft_model.base_model._enable_peft_forward_hooks(
                alora_offsets=[width - feats.rows[i][1] for i in idx]
            )
            if kind == "alora"
            else contextlib.nullcontext()
        )
        with hooks:
            for layer in backbone.layers[low:]:
                h = layer(h, position_ids=pos, position_embeddings=pe)
        # Predict the label at the prompt's last token and the end of turn after it.
        last = [len(feats.rows[i][0]) - 1 for i in idx]
        rows_h = torch.stack([h[j, p : p + 2] for j, p in enumerate(last)])
        logits = peft_model.base_model.model.lm_head(backbone.norm(rows_h))
        target = torch.tensor([[feats.labels[i], feats.end] for i in idx])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 9 or step == steps - 1:
            print(
                f"  {task}/{kind} step {step + 1}/{steps} loss "
                f"{statistics.mean(losses[-10:]):.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    out = args.out / task / kind
    peft_model.save_pretrained(str(out))
    _to_fp16(out)
    peft_model.unload()  # removes the LoRA layers: `model` is the base model again
    return {"seconds": time.perf_counter() - t0, "final_loss": statistics.mean(losses[-10:])}


def _to_fp16(directory: Path) -> None:
    """Halve the committed size: the runtime and PEFT cast adapters to the model's dtype."""
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    state = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    # A README.md model card from PEFT says nothing useful here.
    (directory / "README.md").unlink(missing_ok=True)
    # The base model by its public name, not this machine's cache path.
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


@torch.no_grad()
def _p_yes(model: Any, tok: Any, rows: list[tuple[list[int], int, bool]]) -> list[float]:
    yes, no = rag_tasks.label_token_ids(tok)
    out: list[float] = []
    for i in range(0, len(rows), 16):
        chunk = rows[i : i + 16]
        ids, mask, last = _batch(chunk, tok.pad_token_id or 0)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for j, p in enumerate(last):
            two = logits[j, p, [yes, no]].float().softmax(-1)
            out.append(float(two[0]))
    return out


def _accuracy(p_yes: list[float], rows: list[tuple[list[int], int, bool]]) -> float:
    return sum((p >= 0.5) == lab for p, (_, _, lab) in zip(p_yes, rows, strict=True)) / len(rows)


def evaluate(args: argparse.Namespace, model: Any, tok: Any) -> dict[str, Any]:
    from peft import PeftModel

    acc: dict[str, dict[str, float]] = {}
    for task in args.tasks:
        rows = _examples(tok, task, args.eval_n, seed=args.seed + 1000)
        acc[task] = {"base": _accuracy(_p_yes(model, tok, rows), rows)}
        for kind in ("lora", "alora"):
            pm = PeftModel.from_pretrained(model, str(args.out / task / kind)).eval()
            acc[task][kind] = _accuracy(_p_yes(pm, tok, rows), rows)
            pm.unload()
        acc[task]["positives"] = sum(lab for _, _, lab in rows) / len(rows)
        print(f"  {task}: {acc[task]}", flush=True)
    return acc


def serving_ttft(args: argparse.Namespace, model: Any, tok: Any) -> dict[str, Any]:
    """Median TTFT of one intrinsic call on a cached conversation of `args.turns` RAG
    turns: aLoRA (reuses the base model's KV) vs the LoRA (computes the conversation)."""
    import alora

    rng = random.Random(f"ttft-{args.seed}")
    turns = [rag_tasks.make_turn(rng, answerable=True) for _ in range(args.turns)]
    conv = rag_tasks.encode(tok, tok.apply_chat_template(rag_tasks.messages(turns), tokenize=False))
    rt = alora.AdapterRuntime(model, tok)
    out: dict[str, Any] = {"conversation_tokens": len(conv)}
    try:
        for task in args.tasks:
            inv = rag_tasks.encode(tok, rag_tasks.invocation_text(tok, task))
            for kind in ("alora", "lora"):
                rt.load_adapter(f"{task}-{kind}", str(args.out / task / kind))
            for kind in ("alora", "lora", "base"):
                times, cached = [], []
                for _ in range(args.repeats):
                    rt.reset_prefix_cache()
                    # The base model's turn: its KV is what an aLoRA call may reuse.
                    rt.generate([conv], max_new_tokens=1)
                    adapter = None if kind == "base" else f"{task}-{kind}"
                    r = rt.generate([conv + inv], adapter=adapter, max_new_tokens=1)[0]
                    times.append(float(r.time_to_first_token))
                    cached.append(r.cached_tokens)
                out[f"{task}/{kind}"] = {
                    "ttft_s": statistics.median(times),
                    "cached_tokens": cached[-1],
                    "prompt_tokens": len(conv) + len(inv),
                }
                print(f"  {task}/{kind}: {out[f'{task}/{kind}']}", flush=True)
    finally:
        rt.detach()
    return out


def table(res: dict[str, Any]) -> str:
    acc, ttft = res["accuracy"], res["ttft"]
    n = ttft["conversation_tokens"]
    lines = [
        "| task | accuracy: base prompted | LoRA | aLoRA | TTFT (ms): base, invocation only "
        "| LoRA | aLoRA | LoRA / aLoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in TASKS:
        a = acc[task]
        b, lo, al = (ttft[f"{task}/{k}"]["ttft_s"] * 1000 for k in ("base", "lora", "alora"))
        lines.append(
            f"| {task} | {a['base']:.1%} | {a['lora']:.1%} | {a['alora']:.1%} | {b:.0f} | "
            f"{lo:.0f} | {al:.0f} | {lo / al:.1f}x |"
        )
    return "\n".join(lines) + (
        f"\n\nTTFT of one call after a {n}-token conversation whose base turns are cached; "
        "base = the base model prefilling the same invocation on its own cache (the limit)."
    )


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", choices=("train", "eval"))
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--kinds", nargs="+", choices=("alora", "lora"), default=["alora", "lora"])
    ap.add_argument("--n-train", type=int, default=640, help="training examples per task")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--top-layers", type=int, default=10, help="adapt only the top N layers (0: all)"
    )
    ap.add_argument("--out", type=Path, default=ADAPTER_DIR, help="adapter root directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=200, help="held-out examples per task")
    ap.add_argument("--turns", type=int, default=8, help="conversation turns for TTFT")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--ttft-only", action="store_true", help="eval: re-measure TTFT, keep the accuracy"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    model, tok = load_model("smollm2")
    model.requires_grad_(False)
    if args.command == "train":
        low = model.config.num_hidden_layers - args.top_layers
        for task in args.tasks:
            t0 = time.perf_counter()
            feats = Features(model, tok, _examples(tok, task, args.n_train, args.seed), low)
            print(
                f"{task}: features of {args.n_train} examples in {time.perf_counter() - t0:.0f} s"
            )
            for kind in args.kinds:
                info = train_one(args, model, tok, task, kind, feats)
                print(f"{task}/{kind}: {info}", flush=True)
        return 0
    acc = {} if args.ttft_only else evaluate(args, model, tok)
    ttft = serving_ttft(args, model, tok)
    # Tasks evaluated separately (e.g. in parallel) are merged into one file.
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config.pop("command")
    res.update(
        {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "machine": f"{platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
            "config": config,
            "command": " ".join(["python", "examples/train_intrinsics.py", *sys.argv[1:]]),
        }
    )
    res.setdefault("accuracy", {}).update(acc)
    res.setdefault("ttft", {}).update(ttft)
    res["table"] = table(res) if all(t in res["accuracy"] for t in TASKS) else None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(res["table"] or f"(table once every task is evaluated: {res['accuracy'].keys()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
