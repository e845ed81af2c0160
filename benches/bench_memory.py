"""One device memory budget for KV and adapters, and 10,000 registered adapters (issue 11).

On the tiny random Granite model of `alora.testing` (float32, 1 torch thread):

  disk          n adapters written once in PEFT layout (adapter_config.json +
                adapter_model.safetensors) under a cache folder, reused across runs (manifest):
                ranks 8/16/32/64, half q/v-only and half on all attention and MLP modules (some
                with a rank_pattern), every other adapter an aLoRA; float16 weights on disk
                (as PEFT adapters often are), float32 compute
  registration  `load_adapter(name, path)` of all n, timed; host memory of the registered but
                unused adapters (RSS delta around registration, and stats()["host_bytes"])
  zipf          Poisson arrivals, Zipf popularity (alpha 1.0 and 0.5) over n in 64 1000 10000,
                one device memory budget: throughput, TTFT p50/p99, adapter load latency
                (disk -> host, host -> device), stats over time
  shift         a trace whose mix shifts: A long multi-turn conversations on a few adapters
                (KV-heavy), B many distinct adapters with short prompts (adapter-heavy), C = A
                again; one budget `device_memory=M` against two fixed budgets of the same M
                (`kv_cache_memory=f*M, adapter_memory=(1-f)*M`, f in 0.25 0.5 0.75); the memory
                split over time is plotted

Time is simulated from measured compute, as in bench_trace.py: a virtual clock advances by
the wall time of each `step()`; requests join when the clock passes their arrival (the next
turn of a conversation: its previous turn's last token plus a think time; the next phase of
the shifting trace: the previous phase's last token plus a gap). Arrival rates and think
times are in units of a calibrated decode step (a batch on distinct adapters), so that the
traces load the runtime alike on any machine. The shifting trace runs --repeats times per
system; its figures are medians.

python benches/bench_memory.py            # n in 64 1000 10000 (~3 min on 2 CPU cores, plus
                                          # ~30 s to write the 10,000 adapters the first time)
python benches/bench_memory.py --quick    # n in 64 1000 (< 1 min)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import heapq
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_meta import RESULTS, write_result

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV_TARGETS = ("q_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TOKEN_LO = 16  # prompt tokens lie in [TOKEN_LO, vocab); invocations use [INV_LO, TOKEN_LO)
INV_LO = 3
WRITER_VERSION = 1
SPLITS = (0.25, 0.5, 0.75)
STAT_KEYS = (
    "total_blocks",
    "free_blocks",
    "used_blocks",
    "cached_blocks",
    "adapter_blocks",
    "running",
    "waiting",
    "resident_adapters",
    "host_adapters",
    "host_bytes",
)

# Targets (issue 11).
TARGET_N = 10_000
TARGET_REGISTER_S = 10.0
TARGET_HOST_MB = 50.0
TARGET_N_RATIO = 0.8

# ------------------------------------------------------------------------------ adapters


@dataclass(frozen=True)
class LinearSpec:
    """One adaptable linear of the model: its module path (as in `named_modules`)."""

    path: str  # e.g. model.layers.0.self_attn.q_proj
    leaf: str  # q_proj
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    kind: str  # "lora" | "alora"
    rank: int
    targets: tuple[str, ...]
    rank_pattern: dict[str, int]
    invocation: tuple[int, ...] | None

    def module_rank(self, leaf: str) -> int:
        """The adapter's rank on `leaf` (0: not targeted)."""
        if leaf not in self.targets:
            return 0
        return self.rank_pattern.get(leaf, self.rank)


def adapter_plan(
    i: int,
    *,
    seed: int = 0,
    ranks: Sequence[int] = (8, 16, 32, 64),
    alora_frac: float = 0.5,
    qv_frac: float = 0.5,
    pattern_frac: float = 0.5,
    inv_len: int = 3,
) -> AdapterPlan:
    """Adapter i's shape, a function of (seed, i) only, so that a cache of n adapters is a
    prefix of a cache of more. Exactly `alora_frac` of every prefix is aLoRA (i*frac steps);
    a q/v-only adapter with probability `qv_frac`, else all seven modules, of which a share
    `pattern_frac` has its MLP modules at half rank (a `rank_pattern`)."""
    rng = np.random.default_rng([seed, i])
    alora = math.floor((i + 1) * alora_frac) > math.floor(i * alora_frac)
    rank = int(rng.choice(np.asarray(ranks)))
    qv = bool(rng.random() < qv_frac)
    targets = QV_TARGETS if qv else ALL_TARGETS
    pattern: dict[str, int] = {}
    if not qv and rng.random() < pattern_frac and rank > 1:
        pattern = {m: max(rank // 2, 1) for m in MLP}
    inv = None
    if alora:
        inv = tuple(int(t) for t in rng.integers(INV_LO, TOKEN_LO, size=inv_len))
    return AdapterPlan(f"ad{i:05d}", "alora" if alora else "lora", rank, targets, pattern, inv)


def peft_config(plan: AdapterPlan) -> dict[str, Any]:
    """adapter_config.json of `plan`, as PEFT's `save_pretrained` writes it (the fields the
    loaders read)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": plan.rank,
        "lora_alpha": 2 * plan.rank,
        "lora_dropout": 0.0,
        "target_modules": list(plan.targets),
        "rank_pattern": dict(plan.rank_pattern),
        "alpha_pattern": {},
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": False,
        "layers_to_transform": None,
        "modules_to_save": None,
        "alora_invocation_tokens": None if plan.invocation is None else list(plan.invocation),
    }


class WeightPool:
    """Random weights to slice adapters from: one pool of standard normals per scale, each
    adapter a view at random offsets. So writing 10,000 adapters costs the disk writes, not
    10,000 rounds of random number generation; every adapter still has its own weights."""

    SIZE = 1 << 21

    def __init__(self, seed: int, dtype: str = "float16") -> None:
        self.seed, self.dtype = seed, np.dtype(dtype)
        self._pools: dict[float, np.ndarray] = {}

    def warm(self, scales: Sequence[float]) -> None:
        """Make the pools of `scales` now (before threads share this pool)."""
        for scale in sorted(scales):
            if scale not in self._pools:
                g = np.random.default_rng([self.seed, 4099, round(scale * 1e6)])
                x = g.standard_normal(self.SIZE, dtype=np.float32) * scale
                self._pools[scale] = x.astype(self.dtype)

    def take(self, rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
        self.warm([scale])
        pool = self._pools[scale]
        size = shape[0] * shape[1]
        if size > self.SIZE:
            raise ValueError(f"a {shape} weight is larger than the pool")
        off = int(rng.integers(0, self.SIZE - size + 1))
        return pool[off : off + size].reshape(shape)


def adapter_tensors(
    plan: AdapterPlan, modules: Sequence[LinearSpec], rng: np.random.Generator, pool: WeightPool
) -> dict[str, np.ndarray]:
    """PEFT-named weights of `plan` (both A and B non-zero, so LoRA compute is real): A of
    scale 1/sqrt(in), B of scale 0.01."""
    out: dict[str, np.ndarray] = {}
    for m in modules:
        r = plan.module_rank(m.leaf)
        if r == 0:
            continue
        a = pool.take(rng, (r, m.in_features), 1.0 / math.sqrt(m.in_features))
        out[f"base_model.model.{m.path}.lora_A.weight"] = a
        out[f"base_model.model.{m.path}.lora_B.weight"] = pool.take(rng, (m.out_features, r), 0.01)
    return out


def write_adapter(
    directory: Path,
    plan: AdapterPlan,
    modules: Sequence[LinearSpec],
    pool: WeightPool,
    index: int,
) -> int:
    """Write one adapter directory; returns its safetensors bytes."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([pool.seed, 7919, index])
    tensors = adapter_tensors(plan, modules, rng, pool)
    (directory / "adapter_config.json").write_text(json.dumps(peft_config(plan)))
    path = directory / "adapter_model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.stat().st_size


@dataclass
class AdapterStore:
    """n adapters on disk, their plans and where they are."""

    root: Path
    plans: list[AdapterPlan]
    dirs: list[Path]
    bytes: int  # safetensors bytes of all of them
    written: int  # adapters written by this call (0: all reused)
    write_s: float

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plans]


def store_key(modules: Sequence[LinearSpec], params: dict[str, Any]) -> str:
    blob = json.dumps(
        {"v": WRITER_VERSION, "modules": [asdict(m) for m in modules], "params": params},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_adapters(
    cache: Path,
    n: int,
    modules: Sequence[LinearSpec],
    *,
    seed: int = 0,
    ranks: Sequence[int] = (8, 16, 32, 64),
    alora_frac: float = 0.5,
    qv_frac: float = 0.5,
    pattern_frac: float = 0.5,
    inv_len: int = 3,
    dtype: str = "float16",
    progress: Callable[[int, int], None] | None = None,
) -> AdapterStore:
    """The first n adapters of the cache for these modules and parameters, writing only the
    ones its manifest does not list yet. The cache folder is named by a hash of the model's
    modules and the parameters, so a different model or mix never reuses stale files."""
    params = {
        "seed": seed,
        "ranks": list(ranks),
        "alora_frac": alora_frac,
        "qv_frac": qv_frac,
        "pattern_frac": pattern_frac,
        "inv_len": inv_len,
        "dtype": dtype,
    }
    root = Path(cache) / store_key(modules, params)
    manifest = root / "manifest.json"
    have, sizes = 0, []
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            if m.get("params") == params and m.get("version") == WRITER_VERSION:
                have = int(m["count"])
                sizes = [int(s) for s in m["sizes"]][:have]
        except (ValueError, KeyError, TypeError):
            have, sizes = 0, []
        # A file lost since: rewrite from there (the manifest is written after the files).
        if have and not (root / f"ad{have - 1:05d}" / "adapter_model.safetensors").is_file():
            have, sizes = 0, []
    plan_kw = dict(
        seed=seed,
        ranks=ranks,
        alora_frac=alora_frac,
        qv_frac=qv_frac,
        pattern_frac=pattern_frac,
        inv_len=inv_len,
    )
    plans = [adapter_plan(i, **plan_kw) for i in range(max(n, have))]  # type: ignore[arg-type]
    t0 = time.perf_counter()
    written = 0
    pool = WeightPool(seed, dtype)
    pool.warm([1.0 / math.sqrt(f) for f in {m.in_features for m in modules}] + [0.01])

    def write(i: int) -> int:
        return write_adapter(root / plans[i].name, plans[i], modules, pool, i)

    # Threads: the time goes to file-system calls (mkdir, create, write), which release the
    # GIL and overlap.
    with ThreadPoolExecutor(max_workers=4) as ex:
        for i, size in zip(range(have, n), ex.map(write, range(have, n)), strict=True):
            sizes.append(size)
            written += 1
            if progress is not None and (written % 1000 == 0 or i == n - 1):
                progress(i + 1, n)
    write_s = time.perf_counter() - t0
    if written:
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "version": WRITER_VERSION,
                    "params": params,
                    "modules": [asdict(m) for m in modules],
                    "count": len(sizes),
                    "sizes": sizes,
                }
            )
        )
        tmp.replace(manifest)
    plans = plans[:n]
    return AdapterStore(
        root=root,
        plans=plans,
        dirs=[root / p.name for p in plans],
        bytes=sum(sizes[:n]),
        written=written,
        write_s=write_s,
    )


# ------------------------------------------------------------------------------ traces


@dataclass(frozen=True)
class Turn:
    user: tuple[int, ...]  # tokens the user appends this turn (an aLoRA's invocation last)
    out_len: int
    think: float  # virtual seconds after the previous turn's last token (first turn: 0)


@dataclass(frozen=True)
class Conversation:
    """One request (one turn) or a multi-turn conversation on one adapter. Turn k's prompt
    is turn k-1's prompt, its generated tokens, then turn k's user tokens."""

    start: float  # arrival of the first turn, virtual seconds
    adapter: int | None  # index into the adapter list; None: base model
    turns: tuple[Turn, ...]
    phase: str = ""


def zipf_probs(n: int, alpha: float) -> np.ndarray:
    """Popularity of adapters 0..n-1: p_k proportional to 1/(k+1)^alpha."""
    if n < 1:
        raise ValueError("n must be at least 1")
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    return p / p.sum()


def zipf_sample(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    """`size` adapter indices in [0, n) drawn from `zipf_probs(n, alpha)` (inverse CDF, so
    n = 10,000 costs no more than n = 64)."""
    cdf = np.cumsum(zipf_probs(n, alpha))
    idx = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return np.minimum(idx, n - 1).astype(np.int64)


def _tokens(
    rng: np.random.Generator, length: int, vocab: int, invocation: Sequence[int] | None
) -> tuple[int, ...]:
    toks = rng.integers(TOKEN_LO, vocab, size=length).tolist()
    if invocation:  # the intrinsic's invocation ends the user's text
        k = min(len(invocation), length)
        toks[length - k :] = list(invocation)[len(invocation) - k :]
    return tuple(int(t) for t in toks)


def _between(rng: np.random.Generator, lo_hi: Sequence[int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def zipf_trace(
    *,
    n: int,
    alpha: float,
    requests: int,
    rate: float,
    prompt_len: Sequence[int],
    output_len: Sequence[int],
    invocations: Sequence[Sequence[int] | None],
    vocab: int,
    seed: int = 0,
) -> list[Conversation]:
    """Single-turn requests: Poisson arrivals (`rate` per virtual second) from 0, adapters by
    Zipf popularity over the first n. The lengths and arrivals do not depend on n (their
    own random stream), so n = 64 and n = 10,000 see the same trace shape."""
    shape = np.random.default_rng([seed, 1])
    pick = np.random.default_rng([seed, 2, n, int(alpha * 1000)])
    gaps = shape.exponential(1.0 / rate, size=requests)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    plens = [_between(shape, prompt_len) for _ in range(requests)]
    outs = [_between(shape, output_len) for _ in range(requests)]
    ads = zipf_sample(pick, n, alpha, requests)
    body = np.random.default_rng([seed, 3])
    return [
        Conversation(
            start=float(t),
            adapter=int(ad),
            turns=(Turn(_tokens(body, pl, vocab, invocations[int(ad)]), ol, 0.0),),
            phase="zipf",
        )
        for t, pl, ol, ad in zip(arrivals, plens, outs, ads, strict=True)
    ]


@dataclass(frozen=True)
class ShiftShape:
    """The shifting trace: phases A, B, C, each starting `gap` after the previous one's last
    token (see `serve(phases=...)`), so the mix shifts on any machine speed. Times are in
    units of one calibrated decode step (`unit`), relative to the phase's start."""

    a_convs: int = 10  # phase A: conversations ...
    a_adapters: int = 4  # ... on this many adapters (indices 0..a_adapters-1)
    a_turns: int = 4
    a_first_len: tuple[int, int] = (256, 384)  # first user message (a document)
    a_user_len: tuple[int, int] = (16, 32)  # later user messages
    a_out_len: tuple[int, int] = (16, 32)
    a_think: tuple[float, float] = (2.0, 8.0)
    a_spread: float = 10.0  # conversations start uniformly in [0, a_spread)
    b_requests: int = 192  # phase B: single-turn requests ...
    b_adapters: int = 128  # ... on this many distinct adapters (after A's), uniform popularity
    b_window: float = 20.0  # Poisson arrivals spread over about this long (a burst)
    b_prompt_len: tuple[int, int] = (16, 48)
    b_out_len: tuple[int, int] = (8, 16)
    gap: float = 20.0  # between one phase's last token and the next phase's first arrival
    # phase C: phase A's shape again (new conversations), on A's adapters

    @property
    def adapters(self) -> int:
        return self.a_adapters + self.b_adapters

    def max_conversation_tokens(self) -> int:
        a = self.a_first_len[1] + (self.a_turns - 1) * self.a_user_len[1]
        a += self.a_turns * self.a_out_len[1]
        return max(a, self.b_prompt_len[1] + self.b_out_len[1])


def shift_trace(
    shape: ShiftShape,
    *,
    unit: float,
    invocations: Sequence[Sequence[int] | None],
    vocab: int,
    seed: int = 0,
) -> list[Conversation]:
    """Phases A (conversations on few adapters), B (distinct adapters, short prompts), C
    (like A), in phase order, each by start time relative to its phase's start. `unit`
    converts the shape's times to virtual seconds."""
    rng = np.random.default_rng([seed, 11])
    convs: list[Conversation] = []

    def conversations(phase: str) -> None:
        for _ in range(shape.a_convs):
            ad = int(rng.integers(0, shape.a_adapters))
            inv = invocations[ad]
            turns = []
            for k in range(shape.a_turns):
                length = _between(rng, shape.a_first_len if k == 0 else shape.a_user_len)
                think = 0.0 if k == 0 else float(rng.uniform(*shape.a_think)) * unit
                turns.append(
                    Turn(_tokens(rng, length, vocab, inv), _between(rng, shape.a_out_len), think)
                )
            start = float(rng.uniform(0, shape.a_spread)) * unit
            convs.append(Conversation(start, ad, tuple(turns), phase))

    conversations("A")
    rate = shape.b_requests / (shape.b_window * unit)
    t = 0.0
    for _ in range(shape.b_requests):
        ad = shape.a_adapters + int(rng.integers(0, shape.b_adapters))
        user = _tokens(rng, _between(rng, shape.b_prompt_len), vocab, invocations[ad])
        convs.append(Conversation(t, ad, (Turn(user, _between(rng, shape.b_out_len), 0.0),), "B"))
        t += float(rng.exponential(1.0 / rate))
    conversations("C")
    convs.sort(key=lambda c: ("ABC".index(c.phase), c.start))
    return convs


def adapter_units(plan: AdapterPlan, modules: Sequence[LinearSpec], unit_elems: int) -> int:
    """Estimated pool units `plan` takes on the device: one row of (in + out) elements per
    rank in every layer for each targeted module; a unit holds 2 * unit_elems elements per
    layer (its K and V share). Packing losses not counted."""
    size: dict[str, int] = {}
    for m in modules:
        size.setdefault(m.leaf, m.in_features + m.out_features)
    elems = sum(plan.module_rank(leaf) * s for leaf, s in size.items())
    return math.ceil(elems / (2 * unit_elems))


def memory_warnings(
    shape: ShiftShape,
    plans: Sequence[AdapterPlan],
    modules: Sequence[LinearSpec],
    *,
    unit_elems: int,
    units: int,
    splits: Sequence[float],
    block_size: int,
) -> list[str]:
    """Fixed splits of `units` that cannot hold the shifting trace's longest conversation or
    its largest adapter (such a run would stall, not measure anything)."""
    out = []
    conv_blocks = math.ceil(shape.max_conversation_tokens() / block_size) + 1
    biggest = max(adapter_units(p, modules, unit_elems) for p in plans[: shape.adapters])
    for f in splits:
        kv = int(f * units)
        if kv < conv_blocks:
            out.append(f"split {f:g}: {kv} KV units < {conv_blocks} for the longest conversation")
        if units - kv < biggest:
            out.append(
                f"split {f:g}: {units - kv} adapter units < {biggest} for the largest adapter"
            )
    return out


def trace_tokens(convs: Sequence[Conversation]) -> int:
    """Longest conversation: user tokens plus generated tokens of all its turns."""
    return max(sum(len(t.user) + t.out_len for t in c.turns) for c in convs)


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's and torch.quantile's default); None if empty."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


@dataclass
class TurnRecord:
    conv: int
    turn: int
    phase: str
    adapter: int | None
    release: float  # virtual time the turn was submitted
    prompt_len: int
    out_len: int
    first: float | None = None
    finish: float | None = None
    out_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0


def latency_summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50_s": percentile(values, 50),
        "p99_s": percentile(values, 99),
        "mean_s": float(np.mean(values)) if len(values) else None,
    }


def summarize(records: Sequence[TurnRecord], compute_s: float) -> dict[str, Any]:
    """Throughput over virtual time, TTFT percentiles, prefix-cache reuse of a set of turns."""
    done = [r for r in records if r.finish is not None]
    ttft = [r.first - r.release for r in done if r.first is not None]
    tokens = sum(r.out_tokens for r in done)
    makespan = (max(r.finish for r in done) - min(r.release for r in records)) if done else 0.0
    prompt = sum(r.prompt_len for r in done)
    return {
        "requests": len(records),
        "finished": len(done),
        "out_tokens": tokens,
        "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else None,
        "compute_s": compute_s,
        "compute_tok_s": tokens / compute_s if compute_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": float(np.mean(ttft)) if ttft else None,
        "prefix_hit_rate": sum(r.cached_tokens for r in done) / prompt if prompt else None,
        "preempted_turns": sum(1 for r in done if r.preemptions),
    }


def per_phase(records: Sequence[TurnRecord]) -> dict[str, dict[str, Any]]:
    out = {}
    for ph in sorted({r.phase for r in records}):
        rs = [r for r in records if r.phase == ph]
        s = summarize(rs, 0.0)
        out[ph] = {k: s[k] for k in ("requests", "ttft_p50_s", "ttft_p99_s", "prefix_hit_rate")}
    return out


MEDIAN_KEYS = (
    "throughput_tok_s",
    "compute_tok_s",
    "makespan_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "ttft_mean_s",
    "prefix_hit_rate",
)


def median_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row for repeated runs of one system: the median of each headline metric (and of
    each phase's TTFT p99); everything else from the first run."""
    out = dict(rows[0])
    for k in MEDIAN_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.median(vals)) if vals else None
    phases = {}
    for ph, d in rows[0].get("phases", {}).items():
        vals = [r["phases"][ph]["ttft_p99_s"] for r in rows if r["phases"][ph]["ttft_p99_s"]]
        phases[ph] = dict(d, ttft_p99_s=float(np.median(vals)) if vals else None)
    out["phases"] = phases
    out["runs"] = len(rows)
    out.pop("repeat", None)
    return out


@dataclass
class Series:
    """Runtime stats sampled after every step, against virtual time."""

    t: list[float] = field(default_factory=list)
    cols: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in STAT_KEYS})

    def add(self, clock: float, stats: dict[str, int]) -> None:
        self.t.append(clock)
        for k in STAT_KEYS:
            self.cols[k].append(int(stats.get(k, 0)))

    def downsample(self, max_points: int = 300) -> dict[str, list[float]]:
        """Every k-th sample (the last kept), as JSON-ready columns."""
        n = len(self.t)
        step = max(1, math.ceil(n / max_points))
        idx = list(range(0, n, step))
        if n and idx[-1] != n - 1:
            idx.append(n - 1)
        return {"t": [round(self.t[i], 6) for i in idx]} | {
            k: [v[i] for i in idx] for k, v in self.cols.items()
        }


def memory_split(series: dict[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """Disjoint shares of the pool for a stacked plot: KV in use, adapters, free (cached idle
    KV included: it is reclaimable), and whatever the three leave of the total
    ('unaccounted': must stay 0). `cached` (KV blocks with reusable content) is a line."""
    tot = np.asarray(series["total_blocks"], dtype=np.float64)
    used = np.asarray(series["used_blocks"], dtype=np.float64)
    ad = np.asarray(series["adapter_blocks"], dtype=np.float64)
    free = np.asarray(series["free_blocks"], dtype=np.float64)
    return {
        "kv_in_use": used,
        "adapters": ad,
        "free": free,
        "unaccounted": np.clip(tot - used - ad - free, 0, None),
        "cached": np.asarray(series["cached_blocks"], dtype=np.float64),
        "total": tot,
    }


def plot_memory_split(
    runs: Sequence[tuple[str, dict[str, Sequence[float]], dict[str, float]]],
    png: Path,
    *,
    unit_bytes: int | None = None,
    title: str = "",
) -> Path:
    """A stacked area (KV in use / adapters / free) against virtual time per run: (label,
    sampled stats, phase starts); one panel each, sharing the time axis; phase starts as
    dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs) + 0.6), sharex=True)
    axes = np.atleast_1d(axes)
    colors = {"kv_in_use": "#4c72b0", "adapters": "#dd8452", "free": "#e5e5e5"}
    for ax, (label, series, marks) in zip(axes, runs, strict=True):
        t = np.asarray(series["t"], dtype=np.float64)
        s = memory_split(series)
        layers = [s["kv_in_use"], s["adapters"], s["free"]]
        names = ["KV in use", "adapters", "free (idle cached KV included)"]
        cols = [colors["kv_in_use"], colors["adapters"], colors["free"]]
        if s["unaccounted"].any():
            layers.append(s["unaccounted"])
            names.append("unaccounted")
            cols.append("#c44e52")
        if len(t):
            ax.stackplot(t, *layers, labels=names, colors=cols, step="post")
            ax.step(t, s["cached"], where="post", color="k", lw=0.8, ls=":", label="cached KV")
            ax.set_ylim(0, max(float(s["total"].max()), 1.0))
        for ph, x in (marks or {}).items():
            ax.axvline(x, color="k", ls="--", lw=0.7)
            ax.text(x, ax.get_ylim()[1], f" {ph}", va="top", fontsize=8)
        ylabel = "units"
        if unit_bytes:
            ylabel += f" ({unit_bytes / 1024:g} KiB)"
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=10, loc="left")
    axes[0].legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1].set_xlabel("virtual time (s)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (0 where unavailable)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _field(e: Any, name: str) -> Any:
    return e[name] if isinstance(e, dict) else getattr(e, name)


class LoadEvents:
    """The runtime's adapter load events (`load_events()`: objects with `adapter`, `tier` in
    'disk' | 'device', `seconds`) of one run, whether the call drains the log or returns it
    all; `available` is False when the runtime has no such method."""

    def __init__(self, rt: Any) -> None:
        self._get = getattr(rt, "load_events", None)
        self.available = callable(self._get)
        self._skip = 0
        if self.available:
            first = list(self._get())
            second = list(self._get())
            # Draining: the second call is empty although the first was not.
            self._skip = 0 if (first and not second) else len(second)

    def collect(self) -> list[tuple[str, str, float]]:
        if not self.available:
            return []
        events = list(self._get())[self._skip :]
        return [
            (str(_field(e, "adapter")), str(_field(e, "tier")), float(_field(e, "seconds")))
            for e in events
        ]


def load_latency(events: Sequence[tuple[str, str, float]]) -> dict[str, dict[str, Any]]:
    tiers = ["disk", "device", *sorted({t for _a, t, _s in events} - {"disk", "device"})]
    return {tier: latency_summary([s for _a, t, s in events if t == tier]) for tier in tiers}


# ------------------------------------------------------------------------------ targets


def _target(name: str, value: float | None, limit: float, op: str, **extra: Any) -> dict:
    met = None
    if value is not None:
        met = value < limit if op == "<" else value >= limit if op == ">=" else value <= limit
    return {"name": name, "value": value, "limit": limit, "op": op, "met": met, **extra}


def evaluate_targets(
    registration: Sequence[dict[str, Any]],
    zipf: Sequence[dict[str, Any]],
    shift: Sequence[dict[str, Any]],
    registration_repeat: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Every issue-11 target with its measured value and verdict. A target at n = 10,000 is
    judged at the largest n run, with a note when that is smaller. Registration is judged on
    the first registration of the files; a repeat (metadata in the page cache) is noted."""
    out: list[dict[str, Any]] = []
    if registration:
        big = max(r["n"] for r in registration)
        regs = [r for r in registration if r["n"] == big]
        note = "" if big >= TARGET_N else f"largest n run is {big} (target is at {TARGET_N})"
        again = [r["seconds"] for r in registration_repeat if r["n"] == big]
        reg_note = note
        if again:
            reg_note += (
                ("; " if note else "")
                + "registered again: "
                + ", ".join(f"{x:.2f} s" for x in again)
            )
        out.append(
            _target(
                "registration time (s)",
                min(r["seconds"] for r in regs),
                TARGET_REGISTER_S,
                "<",
                n=big,
                note=reg_note,
            )
        )
        out.append(
            _target(
                "host memory of registered, unused adapters (MB, RSS delta)",
                min(r["rss_delta_bytes"] for r in regs) / 1e6,
                TARGET_HOST_MB,
                "<",
                n=big,
                note=note
                + ("; " if note else "")
                + "host_bytes after registration: "
                + ", ".join(str(r.get("host_bytes")) for r in regs),
            )
        )
    ns = sorted({r["n"] for r in zipf})
    if len(ns) >= 2:
        lo, hi = ns[0], ns[-1]
        for alpha in sorted({r["alpha"] for r in zipf}, reverse=True):
            by = {r["n"]: r for r in zipf if r["alpha"] == alpha}
            if lo in by and hi in by and by[lo]["throughput_tok_s"] and by[hi]["throughput_tok_s"]:
                out.append(
                    _target(
                        f"throughput n={hi} / n={lo} (Zipf alpha {alpha})",
                        by[hi]["throughput_tok_s"] / by[lo]["throughput_tok_s"],
                        TARGET_N_RATIO,
                        ">=",
                        n=hi,
                        note="" if hi >= TARGET_N else f"target is at n={TARGET_N}",
                    )
                )
    uni = next((r for r in shift if r["system"] == "unified"), None)
    splits = [r for r in shift if r["system"] != "unified" and r.get("ttft_p99_s") is not None]
    if uni is not None and splits and uni.get("ttft_p99_s") is not None:
        best_thr = max(splits, key=lambda r: r["throughput_tok_s"] or 0.0)
        best_ttft = min(splits, key=lambda r: r["ttft_p99_s"])
        thr = uni["throughput_tok_s"] / best_thr["throughput_tok_s"]
        ttft = uni["ttft_p99_s"] / best_ttft["ttft_p99_s"]
        out.append(
            _target(
                f"shifting trace: unified / best fixed split throughput ({best_thr['system']})",
                thr,
                1.0,
                ">=",
            )
        )
        out.append(
            _target(
                f"shifting trace: unified / best fixed split TTFT p99 ({best_ttft['system']})",
                ttft,
                1.0,
                "<=",
            )
        )
        out.append(
            {
                "name": "unified beats the best fixed split (throughput and/or TTFT p99)",
                "value": None,
                "limit": None,
                "op": "",
                "met": thr > 1.0 or ttft < 1.0,
                "note": "on both" if thr > 1.0 and ttft < 1.0 else "",
            }
        )
    return out


def target_lines(targets: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for t in targets:
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lim = "" if t["limit"] is None else f" (target {t['op']} {t['limit']:g})"
        val = "" if t["value"] is None else f" = {t['value']:.3f}"
        n = f" @n={t['n']}" if "n" in t else ""
        note = f"  [{t['note']}]" if t.get("note") else ""
        lines.append(f"{t['name']}{n}{val}{lim}: {verdict}{note}")
    return lines


def markdown(d: dict[str, Any]) -> list[str]:
    """The README section of a result (render_results.py's renderer signature)."""

    def f(v: Any, spec: str = ".3f") -> str:
        return "–" if v is None else format(v, spec)

    out = [
        "### One memory budget, 10,000 adapters (`bench_memory.py`)",
        "",
        f"_{d.get('date', '?')}, commit `{d.get('commit', '?')}`,"
        f" {d.get('machine', {}).get('cpu', '?')}; model: tiny Granite"
        f" ({d.get('model_info', {}).get('layers', '?')} layers, hidden"
        f" {d.get('model_info', {}).get('hidden', '?')}); 1 unit ="
        f" {d.get('unit_bytes', 0) / 1024:g} KiB._",
        "",
        "| n | registration (s) | RSS delta (MB) | host_bytes | on disk (MB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in d.get("registration", []):
        out.append(
            f"| {r['n']} | {f(r['seconds'], '.2f')} | {f(r['rss_delta_bytes'] / 1e6, '.1f')}"
            f" | {r.get('host_bytes')} | {f(r.get('disk_bytes', 0) / 1e6, '.1f')} |"
        )
    out += [
        "",
        "Zipf trace (one budget of"
        f" {d.get('zipf_memory_bytes', 0) / 2**20:.1f} MiB): throughput in output tokens per"
        " virtual second; load latency p50/p99 in ms.",
        "",
        "| n | alpha | system | tok/s | TTFT p50 (s) | TTFT p99 (s) | disk→host p50/p99 |"
        " host→device p50/p99 | loads (disk/device) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def lat(r: dict[str, Any], tier: str) -> str:
        x = r.get("load_latency", {}).get(tier, {})
        if not x.get("count"):
            return "–"
        return f"{x['p50_s'] * 1e3:.2f} / {x['p99_s'] * 1e3:.2f}"

    for r in d.get("zipf", []):
        out.append(
            f"| {r['n']} | {r['alpha']} | {r['system']} | {f(r['throughput_tok_s'], '.1f')}"
            f" | {f(r['ttft_p50_s'])} | {f(r['ttft_p99_s'])} | {lat(r, 'disk')}"
            f" | {lat(r, 'device')} | {r.get('host_loads', '–')}/{r.get('adapter_loads', '–')} |"
        )
    sh = d.get("shift", {})
    if sh.get("runs"):
        out += [
            "",
            f"Shifting trace (A: conversations on few adapters, B: many adapters, C: A again),"
            f" total memory {sh.get('memory_bytes', 0) / 2**20:.2f} MiB"
            f" ({sh.get('units')} units):",
            "",
            "| system | tok/s | compute tok/s | TTFT p50 (s) | TTFT p99 (s) | TTFT p99 A/B/C (s)"
            " | prefix hit | preempted turns | adapter loads |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sh["runs"]:
            ph = r.get("phases", {})
            p99 = " / ".join(f(ph.get(k, {}).get("ttft_p99_s")) for k in ("A", "B", "C"))
            out.append(
                f"| {r['system']} | {f(r['throughput_tok_s'], '.1f')}"
                f" | {f(r['compute_tok_s'], '.1f')} | {f(r['ttft_p50_s'])}"
                f" | {f(r['ttft_p99_s'])} | {p99} | {f(r['prefix_hit_rate'], '.2f')}"
                f" | {r['preempted_turns']} | {r.get('adapter_loads', '–')} |"
            )
    out += ["", "| target | measured | limit | verdict |", "|---|---:|---:|---|"]
    for t in d.get("targets", []):
        verdict = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        n = f" @n={t['n']}" if "n" in t else ""
        note = f" ({t['note']})" if t.get("note") else ""
        lim = "" if t["limit"] is None else f"{t['op']} {t['limit']:g}"
        out.append(f"| {t['name']}{n}{note} | {f(t['value'])} | {lim} | {verdict} |")
    if d.get("plot"):
        out += ["", f"![{d['plot']}](benches/results/{d['plot']})"]
    return [*out, ""]


# ------------------------------------------------------------------------------ runtime


def linear_specs(model: Any) -> list[LinearSpec]:
    """The adaptable linears of `model` (those named like PEFT's attention/MLP targets)."""
    import torch

    out = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ALL_TARGETS and isinstance(mod, torch.nn.Linear):
            out.append(LinearSpec(name, leaf, mod.in_features, mod.out_features))
    return out


def runtime_supports(keyword: str) -> bool:
    import inspect

    from alora import AdapterRuntime

    return keyword in inspect.signature(AdapterRuntime.__init__).parameters


def make_runtime(model: Any, a: argparse.Namespace, max_len: int, **memory: Any) -> Any:
    """A runtime on a fresh copy of `model`; `memory`: device_memory, or kv_cache_memory and
    adapter_memory (bytes)."""
    import copy

    from alora import AdapterRuntime

    kw: dict[str, Any] = {
        "block_size": a.block_size,
        "max_num_seqs": a.max_num_seqs,
        "max_batch_tokens": a.max_batch_tokens,
        "max_model_len": max_len,
        **{k: int(v) for k, v in memory.items() if v is not None},
    }
    if a.host_memory is not None:
        kw["host_adapter_memory"] = int(a.host_memory)
    return AdapterRuntime(copy.deepcopy(model).eval(), **kw)


def register(rt: Any, store: AdapterStore, n: int) -> dict[str, Any]:
    """Register the first n adapters of `store`; time and host memory."""
    gc.collect()
    rss0 = rss_bytes()
    host0 = rt.stats().get("host_bytes")
    t0 = time.perf_counter()
    for name, path in zip(store.names[:n], store.dirs[:n], strict=True):
        rt.load_adapter(name, path)
    seconds = time.perf_counter() - t0
    gc.collect()
    rss1 = rss_bytes()
    st = rt.stats()
    return {
        "n": n,
        "seconds": seconds,
        "per_adapter_us": seconds / n * 1e6,
        "rss_delta_bytes": rss1 - rss0,
        "host_bytes_before": host0,
        "host_bytes": st.get("host_bytes"),
        "loaded_adapters": st.get("loaded_adapters"),
        "disk_bytes": sum((d / "adapter_model.safetensors").stat().st_size for d in store.dirs[:n]),
    }


def calibrate(
    rt: Any,
    vocab: int,
    batch: int,
    new_tokens: int,
    seed: int,
    adapters: Sequence[tuple[str, Sequence[int] | None]],
) -> dict[str, float]:
    """Decode of one batch of requests on distinct `adapters` (registered in `rt`; prompts
    prefilled first, untimed): the step time and tokens/s that set the traces' time unit and
    arrival rates. The first round warms up (and loads the adapters)."""
    rng = np.random.default_rng([seed, 99])
    for _rep in range(2):
        rids = []
        for j in range(batch):
            name, inv = adapters[j % len(adapters)]
            rids.append(
                rt.add_request(
                    list(_tokens(rng, 32, vocab, inv)),
                    adapter=name,
                    max_new_tokens=new_tokens,
                    stop_token_ids=(),
                )
            )
        first: set[int] = set()
        while len(first) < len(rids):
            first.update(o.request_id for o in rt.step() if o.new_token is not None)
        t0, tokens, steps = time.perf_counter(), 0, 0
        while rt.has_unfinished():
            tokens += sum(o.new_token is not None for o in rt.step())
            steps += 1
        dt = time.perf_counter() - t0
    rt.reset_prefix_cache()
    return {"step_s": dt / steps, "tok_s": tokens / dt, "batch": batch}


@dataclass
class RunResult:
    records: list[TurnRecord]
    series: Series
    compute_s: float
    steps: int
    stats_before: dict[str, int]
    stats_after: dict[str, int]
    events: list[tuple[str, str, float]]
    events_available: bool
    wall_s: float
    phase_starts: dict[str, float]


def serve(
    rt: Any,
    convs: Sequence[Conversation],
    names: Sequence[str],
    *,
    phases: Sequence[str] | None = None,
    gap: float = 0.0,
    timeout_s: float = 600.0,
) -> RunResult:
    """Drive `convs` through add_request/step on the virtual clock. A conversation's next
    turn is submitted `think` virtual seconds after its previous turn's last token.

    `phases`: conversation starts are relative to their phase's start; the first phase
    starts at 0, each next one `gap` after the last token of the one before. Without it,
    starts are absolute."""
    rt.reset_prefix_cache()
    log = LoadEvents(rt)
    before = dict(rt.stats())
    series = Series()
    records: list[TurnRecord] = []
    history: dict[int, list[int]] = {}
    gen: dict[int, list[int]] = {}  # request id -> tokens generated so far
    rec_of: dict[int, TurnRecord] = {}
    order = list(phases) if phases is not None else [""]
    members: dict[str, list[int]] = {ph: [] for ph in order}
    for i, c in enumerate(convs):
        members[c.phase if phases is not None else ""].append(i)
    left = {ph: sum(len(convs[i].turns) for i in members[ph]) for ph in order}
    queue: list[tuple[float, int, int]] = []
    starts: dict[str, float] = {}
    phase_of = {i: ph for ph in order for i in members[ph]}

    def open_phases(t: float) -> None:
        """Queue every phase that can start: the first one, or any whose predecessors are
        all done (an empty phase passes at once)."""
        while len(starts) < len(order):
            ph = order[len(starts)]
            if starts and left[order[len(starts) - 1]] > 0:
                return
            starts[ph] = t if not starts else t + gap
            for i in members[ph]:
                heapq.heappush(queue, (starts[ph] + convs[i].start, i, 0))

    open_phases(0.0)
    total = sum(len(c.turns) for c in convs)
    clock, compute_s, steps, finished = 0.0, 0.0, 0, 0
    wall0 = time.perf_counter()
    while finished < total:
        while queue and queue[0][0] <= clock:
            release, ci, k = heapq.heappop(queue)
            c = convs[ci]
            turn = c.turns[k]
            prompt = history.get(ci, []) + list(turn.user)
            rid = rt.add_request(
                prompt,
                adapter=None if c.adapter is None else names[c.adapter],
                max_new_tokens=turn.out_len,
                stop_token_ids=(),
            )
            rec = TurnRecord(ci, k, c.phase, c.adapter, release, len(prompt), turn.out_len)
            records.append(rec)
            rec_of[rid] = rec
            gen[rid] = []
            history[ci] = prompt
        if not rt.has_unfinished():
            if not queue:
                raise RuntimeError(f"{total - finished} turns never submitted")
            clock = max(clock, queue[0][0])  # idle until the next arrival
            continue
        if time.perf_counter() - wall0 > timeout_s:
            st = rt.stats()
            raise RuntimeError(
                f"run exceeded {timeout_s} s wall time at virtual {clock:.2f} s with"
                f" {total - finished} turns left; stats: {st}"
            )
        t0 = time.perf_counter()
        outs = rt.step()
        dt = time.perf_counter() - t0
        clock += dt
        compute_s += dt
        steps += 1
        for o in outs:
            rec = rec_of.get(o.request_id)
            if rec is None:
                continue
            if o.new_token is not None:
                gen[o.request_id].append(int(o.new_token))
                if rec.first is None:
                    rec.first = clock
            if o.finished:
                res = o.result
                toks = list(res.token_ids) if res is not None else gen[o.request_id]
                rec.finish = clock
                rec.out_tokens = len(toks)
                if res is not None:
                    rec.cached_tokens = int(res.cached_tokens)
                    rec.preemptions = int(res.preemptions)
                finished += 1
                left[phase_of[rec.conv]] -= 1
                history[rec.conv] = history[rec.conv] + toks
                c = convs[rec.conv]
                if rec.turn + 1 < len(c.turns):
                    nxt = rec.turn + 1
                    heapq.heappush(queue, (clock + c.turns[nxt].think, rec.conv, nxt))
                del gen[o.request_id]
                if left[phase_of[rec.conv]] == 0:
                    open_phases(clock)
        series.add(clock, rt.stats())
    return RunResult(
        records=records,
        series=series,
        compute_s=compute_s,
        steps=steps,
        stats_before=before,
        stats_after=dict(rt.stats()),
        events=log.collect(),
        events_available=log.available,
        wall_s=time.perf_counter() - wall0,
        phase_starts=starts if phases is not None else {},
    )


def run_row(res: RunResult, **labels: Any) -> dict[str, Any]:
    b, e = res.stats_before, res.stats_after

    def delta(k: str) -> int | None:
        return e[k] - b[k] if k in e and k in b else None

    return {
        **labels,
        **summarize(res.records, res.compute_s),
        "steps": res.steps,
        "wall_s": res.wall_s,
        "adapter_loads": delta("adapter_loads"),  # host -> device page-ins
        "adapter_evictions": delta("adapter_evictions"),
        "host_loads": delta("host_loads"),  # disk -> host reads
        "host_evictions": delta("host_evictions"),
        "preemptions": delta("preemptions"),
        "load_latency": load_latency(res.events) if res.events_available else {},
        "load_events_available": res.events_available,
        "peak": {k: max(v) if v else 0 for k, v in res.series.cols.items()},
    }


# ------------------------------------------------------------------------------ main


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 1000, 10000])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--alora-frac", type=float, default=0.5)
    ap.add_argument("--qv-frac", type=float, default=0.5, help="share of q/v-only adapters")
    ap.add_argument("--inv-len", type=int, default=3)
    ap.add_argument(
        "--disk-dtype",
        default="float16",
        choices=["float16", "float32"],
        help="adapter weights on disk (the runtime computes in the model's float32)",
    )
    ap.add_argument(
        "--cache",
        default=os.environ.get(
            "ALORA_BENCH_CACHE", str(Path.home() / ".cache" / "alora-bench" / "memory")
        ),
        help="folder of the adapters written to disk (reused across runs)",
    )
    # Zipf trace
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--load", type=float, default=1.5, help="offered load / calibrated capacity")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 96])
    ap.add_argument("--output-len", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--zipf-units", type=int, default=1024, help="device memory, in KV blocks")
    # Shifting trace
    ap.add_argument("--shift-units", type=int, default=384, help="total memory, in KV blocks")
    ap.add_argument("--splits", type=float, nargs="*", default=list(SPLITS))
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs of the shifting trace per system (median)"
    )
    # Runtime
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument(
        "--host-memory", type=int, default=None, help="host LRU bytes (default: the runtime's)"
    )
    ap.add_argument(
        "--calib-batch", type=int, default=None, help="calibration batch (default: max-num-seqs)"
    )
    ap.add_argument("--run-timeout", type=float, default=600.0, help="wall seconds per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="memory", help="result name under benches/results")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    a.shift = ShiftShape()
    if a.calib_batch is None:
        a.calib_batch = a.max_num_seqs
    if a.quick:
        a.ns = [n for n in a.ns if n <= 1000] or [64, 1000]
        a.requests = 96
        a.shift = ShiftShape(
            a_convs=10, a_turns=3, a_first_len=(256, 384), b_requests=96, b_adapters=64
        )
        a.repeats = 1
        a.shift_units = 320
        a.out = a.out if a.out != "memory" else "memory_quick"
    return a


def _say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    import torch

    from alora.model import introspect
    from alora.testing import tiny_model

    torch.set_num_threads(a.threads)
    shape: ShiftShape = a.shift
    max_len = max(a.prompt_len[1] + a.output_len[1], shape.max_conversation_tokens())
    max_len = (max_len // a.block_size + 2) * a.block_size
    model = tiny_model("granite", seed=0, max_position_embeddings=max(2048, max_len))
    vocab = model.config.vocab_size
    geo = introspect(model)
    unit_bytes = geo.kv_bytes_per_block(a.block_size)
    unit_elems = a.block_size * geo.num_kv_heads * geo.head_dim
    modules = linear_specs(model)
    unified = runtime_supports("device_memory")
    if not unified:
        _say("note: this AdapterRuntime has no device_memory keyword: unified runs skipped")

    # 1. Adapters on disk.
    nmax = max(max(a.ns), shape.adapters)
    store = ensure_adapters(
        Path(a.cache),
        nmax,
        modules,
        seed=a.seed,
        ranks=a.ranks,
        alora_frac=a.alora_frac,
        qv_frac=a.qv_frac,
        inv_len=a.inv_len,
        dtype=a.disk_dtype,
        progress=lambda i, n: _say(f"  wrote {i}/{n} adapters"),
    )
    _say(
        f"adapters: {nmax} in {store.root} ({store.bytes / 1e6:.0f} MB;"
        f" {store.written} written in {store.write_s:.1f} s)"
    )
    invocations = [p.invocation for p in store.plans]

    # 2. Registration, n ascending, every runtime kept until all are measured: the RSS delta
    # of one is not hidden by memory that an earlier one freed.
    zipf_mem = a.zipf_units * unit_bytes
    mem = {"device_memory": zipf_mem} if unified else {}
    registration: list[dict[str, Any]] = []
    registered: dict[int, Any] = {}
    for n in sorted(set(a.ns)):
        rt = make_runtime(model, a, max_len, **mem)
        reg = register(rt, store, n)
        registration.append(reg)
        registered[n] = rt
        _say(
            f"n={n}: registered in {reg['seconds']:.2f} s,"
            f" RSS +{reg['rss_delta_bytes'] / 1e6:.1f} MB, host_bytes {reg['host_bytes']}"
        )

    # Calibration: the time unit of the traces.
    cal_rt = make_runtime(model, a, max_len)
    cal_ads = list(zip(store.names, invocations, strict=True))[: a.calib_batch]
    for name, path in zip(store.names[: len(cal_ads)], store.dirs, strict=False):
        cal_rt.load_adapter(name, path)
    cal = calibrate(cal_rt, vocab, a.calib_batch, 32, a.seed, cal_ads)
    cal_rt.detach()
    del cal_rt
    _say(
        f"calibration: decode step {cal['step_s'] * 1e3:.2f} ms at batch {a.calib_batch}"
        f" ({cal['tok_s']:.0f} tok/s, distinct adapters)"
    )
    mean_out = (a.output_len[0] + a.output_len[1]) / 2
    rate = a.load * cal["tok_s"] / mean_out

    # Warm-up: the first trace served in a process runs slower (allocator and kernel
    # warm-up; measured: n=64 served first gave 0.58x the throughput of n=64 served after
    # n=10,000), which would flatter whichever n comes later. One untimed short trace first.
    warm_rt = make_runtime(model, a, max_len, **mem)
    register(warm_rt, store, min(a.ns))
    warm = zipf_trace(
        n=min(a.ns),
        alpha=a.alphas[0],
        requests=min(128, a.requests),
        rate=rate,
        prompt_len=a.prompt_len,
        output_len=a.output_len,
        invocations=invocations,
        vocab=vocab,
        seed=a.seed + 1,
    )
    serve(warm_rt, warm, store.names, timeout_s=a.run_timeout)
    warm_rt.detach()
    del warm_rt

    # 3, 6. The Zipf trace per n and alpha, one budget, each on a freshly registered runtime.
    zipf_rows: list[dict[str, Any]] = []
    zipf_series: dict[str, Any] = {}
    registration_repeat: list[dict[str, Any]] = []
    for n in a.ns:
        for alpha in a.alphas:
            rt = registered.pop(n, None)
            if rt is None:  # registered again: the files' metadata is in the page cache now
                rt = make_runtime(model, a, max_len, **mem)
                registration_repeat.append(register(rt, store, n))
            trace = zipf_trace(
                n=n,
                alpha=alpha,
                requests=a.requests,
                rate=rate,
                prompt_len=a.prompt_len,
                output_len=a.output_len,
                invocations=invocations,
                vocab=vocab,
                seed=a.seed,
            )
            res = serve(rt, trace, store.names, timeout_s=a.run_timeout)
            row = run_row(res, n=n, alpha=alpha, system="unified" if unified else "default")
            row["distinct_adapters"] = len({c.adapter for c in trace})
            zipf_rows.append(row)
            zipf_series[f"n={n},alpha={alpha}"] = res.series.downsample()
            _say(
                f"  n={n} zipf alpha={alpha}: {fmt(row['throughput_tok_s'], '.1f')} tok/s,"
                f" TTFT p50 {fmt(row['ttft_p50_s'])} p99 {fmt(row['ttft_p99_s'])} s,"
                f" {row['distinct_adapters']} adapters,"
                f" loads {row['host_loads']}/{row['adapter_loads']}"
                f" ({res.wall_s:.1f} s wall)"
            )
            rt.detach()
            del rt
            gc.collect()

    # 4-5. The shifting trace: one budget against fixed splits of the same memory.
    total = a.shift_units * unit_bytes
    for w in memory_warnings(
        shape,
        store.plans,
        modules,
        unit_elems=unit_elems,
        units=a.shift_units,
        splits=a.splits,
        block_size=a.block_size,
    ):
        _say(f"warning: {w}")
    shift_convs = shift_trace(
        shape, unit=cal["step_s"], invocations=invocations, vocab=vocab, seed=a.seed
    )
    configs: list[tuple[str, dict[str, Any]]] = []
    if unified:
        configs.append(("unified", {"device_memory": total}))
    for f in a.splits:
        kv = int(f * total)
        configs.append((f"split-{f:g}", {"kv_cache_memory": kv, "adapter_memory": total - kv}))
    shift_runs: list[dict[str, Any]] = []
    shift_series: dict[str, dict[str, list[float]]] = {}
    for (label, mem), rep in [(c, r) for r in range(a.repeats) for c in configs]:
        rt = make_runtime(model, a, max_len, **mem)
        rt_names = store.names[: shape.adapters]
        for name, path in zip(rt_names, store.dirs[: shape.adapters], strict=True):
            rt.load_adapter(name, path)
        res = serve(
            rt,
            shift_convs,
            rt_names,
            phases="ABC",
            gap=shape.gap * cal["step_s"],
            timeout_s=a.run_timeout,
        )
        row = run_row(res, system=label, **{k: int(v) for k, v in mem.items()})
        row["phases"] = per_phase(res.records)
        row["phase_starts"] = res.phase_starts
        row["repeat"] = rep
        shift_runs.append(row)
        if rep == 0:
            shift_series[label] = res.series.downsample(600)
        _say(
            f"shift {label} #{rep}: {fmt(row['throughput_tok_s'], '.1f')} tok/s"
            f" ({fmt(row['compute_tok_s'], '.1f')} per compute s), TTFT p50"
            f" {fmt(row['ttft_p50_s'])} p99 {fmt(row['ttft_p99_s'])} s, prefix hit"
            f" {fmt(row['prefix_hit_rate'], '.2f')}, preempted turns {row['preempted_turns']},"
            f" loads {row['host_loads']}/{row['adapter_loads']} ({res.wall_s:.1f} s wall)"
        )
        rt.detach()
        del rt
        gc.collect()
    shift_rows = [
        median_row([r for r in shift_runs if r["system"] == label]) for label, _ in configs
    ]

    results_dir = Path(os.environ.get("ALORA_RESULTS_DIR", RESULTS))
    png = results_dir / f"{a.out}_memory_split.png"
    plot_memory_split(
        [(r["system"], shift_series[r["system"]], r["phase_starts"]) for r in shift_rows],
        png,
        unit_bytes=unit_bytes,
        title=f"Memory split over time, shifting trace, {a.shift_units} units in all",
    )

    targets = evaluate_targets(registration, zipf_rows, shift_rows, registration_repeat)
    print("\n" + "\n".join(_summary_table(registration, zipf_rows, shift_rows)))
    for r in registration_repeat:
        print(f"  (n={r['n']} registered again: {r['seconds']:.2f} s)")
    print("\ntargets:")
    for line in target_lines(targets):
        print("  " + line)

    from peft_baselines import model_info

    params = {k: v for k, v in vars(a).items() if k != "shift"}
    payload = {
        "bench": "memory",
        "params": params,
        "shift_shape": asdict(shape),
        "model_info": model_info(model, None) | {"model": "tiny granite (alora.testing)"},
        "unit_bytes": unit_bytes,
        "unified_available": unified,
        "calibration": cal,
        "zipf_rate_per_s": rate,
        "zipf_memory_bytes": zipf_mem,
        "adapters_on_disk": {
            "count": nmax,
            "bytes": store.bytes,
            "written": store.written,
            "write_s": store.write_s,
        },
        "registration": registration,
        "registration_repeat": registration_repeat,
        "zipf": zipf_rows,
        "zipf_series": zipf_series,
        "shift": {
            "memory_bytes": total,
            "units": a.shift_units,
            "runs": shift_rows,
            "repeats": shift_runs,
            "series": shift_series,
        },
        "targets": targets,
        "plot": png.name,
        "notes": [
            "Simulated time: a virtual clock advanced by measured step wall time; a"
            " conversation's next turn arrives its think time after its previous turn ends.",
            "Arrival rates and think times are in units of a calibrated base-model decode step"
            f" (batch {a.calib_batch}); Zipf load = {a.load}x the calibrated token capacity.",
            "throughput = output tokens / (last finish - first arrival), virtual time;"
            " compute tok/s = output tokens / summed step time.",
            "disk -> host latency reads files just written, so from the OS page cache.",
            "1 torch thread; the machine is shared with other jobs, so figures are noisy.",
        ],
    }
    path = write_result(a.out, payload, out_dir=results_dir)
    md = results_dir / f"{a.out}.md"
    md.write_text("\n".join(markdown(json.loads(path.read_text()))))
    print(f"wrote {path}, {md} and {png}")
    return 0


def _summary_table(
    registration: Sequence[dict[str, Any]],
    zipf: Sequence[dict[str, Any]],
    shift: Sequence[dict[str, Any]],
) -> list[str]:
    lines = [f"{'n':>6} {'register s':>10} {'RSS MB':>7} {'host_bytes':>10}"]
    for r in registration:
        lines.append(
            f"{r['n']:6d} {r['seconds']:10.2f} {r['rss_delta_bytes'] / 1e6:7.1f}"
            f" {r.get('host_bytes')!s:>10}"
        )

    def ms(r: dict[str, Any], tier: str, q: str) -> str:
        x = r.get("load_latency", {}).get(tier, {})
        return fmt(x[q] * 1e3, ".2f") if x.get("count") else "-"

    lines += [
        "",
        f"{'n':>6} {'alpha':>5} {'tok/s':>7} {'TTFT50':>7} {'TTFT99':>7} {'disk ms p50/p99':>16}"
        f" {'dev ms p50/p99':>15} {'loads d/h':>9}",
    ]
    for r in zipf:
        lines.append(
            f"{r['n']:6d} {r['alpha']:5.2f} {fmt(r['throughput_tok_s'], '.1f'):>7}"
            f" {fmt(r['ttft_p50_s']):>7} {fmt(r['ttft_p99_s']):>7}"
            f" {ms(r, 'disk', 'p50_s') + '/' + ms(r, 'disk', 'p99_s'):>16}"
            f" {ms(r, 'device', 'p50_s') + '/' + ms(r, 'device', 'p99_s'):>15}"
            f" {str(r['host_loads']) + '/' + str(r['adapter_loads']):>9}"
        )
    lines += [
        "",
        f"{'system':>11} {'tok/s':>7} {'cmp tok/s':>9} {'TTFT50':>7} {'TTFT99':>7}"
        f" {'p99 A/B/C':>20} {'hit':>5} {'preempt':>7}",
    ]
    for r in shift:
        ph = r.get("phases", {})
        p99 = "/".join(fmt(ph.get(k, {}).get("ttft_p99_s"), ".2f") for k in "ABC")
        lines.append(
            f"{r['system']:>11} {fmt(r['throughput_tok_s'], '.1f'):>7}"
            f" {fmt(r['compute_tok_s'], '.1f'):>9} {fmt(r['ttft_p50_s']):>7}"
            f" {fmt(r['ttft_p99_s']):>7} {p99:>20} {fmt(r['prefix_hit_rate'], '.2f'):>5}"
            f" {r['preempted_turns']:>7}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
