"""Type stubs for the Rust extension `alora._core` (crate `crates/alora-py`).

Kept in sync with the module by `tests/test_stubs.py`.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

__version__: str

# ---- exception tree (all raised by the engine; subclasses of AloraError) ----
class AloraError(Exception): ...
class AdapterError(AloraError): ...
class AdapterFormatError(AdapterError): ...
class UnsupportedDtypeError(AdapterFormatError): ...
class AdapterShapeError(AdapterError): ...
class ConfigError(AloraError, ValueError): ...
class CapacityError(AloraError): ...
class UnknownAdapterError(AdapterError, KeyError): ...
class DuplicateAdapterError(AdapterError): ...
class AdapterBusyError(AdapterError): ...
class InvalidRequestError(AloraError, ValueError): ...
class UnknownRequestError(AloraError, KeyError): ...
class StepError(AloraError): ...

def kernel_sources() -> dict[str, str]:
    """CUDA sources from `cuda/`, embedded in the extension at build time: file name -> text."""

def activation_start(tokens: Sequence[int], invocation: Sequence[int]) -> int | None:
    """First index of the last occurrence of `invocation` in `tokens`, or None."""

def base_prefix_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained base-key hashes (64-bit) of the full blocks of `tokens`: compare with
    `Engine.cached_base_hashes()` to count a request's leading blocks a replica has cached."""

def untokenized_invocation(
    *, path: str | None = None, config_json: str | None = None
) -> str | None:
    """The `invocation_string` of an aLoRA config without `alora_invocation_tokens` (to be
    tokenized by the caller), from a directory's adapter_config.json or a JSON text; the
    config is validated completely (errors name the file and field)."""

def read_adapter_weights(info: AdapterInfo) -> AdapterWeights:
    """Read and validate an adapter's weights from its file (the GIL is released; no engine
    needed, so a thread can prefetch). AdapterFormatError when the file changed since it was
    registered or holds non-finite values. In-memory adapters return their weights."""

def cpu_add_lora(
    y: np.ndarray,
    x: np.ndarray,
    a_arena: np.ndarray,
    a: tuple[int, int, int],
    bt_arena: np.ndarray,
    bt: tuple[int, int, int],
    segments: np.ndarray,
    seg_scale: np.ndarray,
) -> None:
    """The CPU LoRA kernel (float32, in place): `y[tok] += scale * (x[tok] . A rows) @ Bt
    rows` per segment. `y` / `x`: `[tokens, out]` / `[tokens, in]`, C-contiguous, any shape
    (read flat); `a` / `bt`:
    `(offset, stride, width)` of each pool's rows in its arena (row c at `offset + c *
    stride`); `segments`: int64 `[n_tokens, n_rows, token_idx.., seg_start.., seg_row_start..,
    rows.., bt_rows..]`, `seg_scale`: float32 per segment (see `LoraBatch.cpu_segments`). The
    GIL is released. ValueError, with nothing written, on bad arguments."""

class AdapterWeights:
    """An adapter's weights in host memory (float32), as read by `read_adapter_weights`."""

    @property
    def adapter_id(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    def weights(
        self, layer: int, module: str
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]] | None:
        """(A [r, in], B [out, r]): float32 read-only views of Rust memory; None if not adapted."""
    def scale(self, layer: int, module: str) -> float:
        """The scale at (layer, module), 0.0 where not adapted."""

class AdapterInfo:
    """A registered adapter's metadata (its weights stay on disk until first use; see
    `read_adapter_weights`)."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> Literal["lora", "alora"]: ...
    @property
    def rank(self) -> int:
        """Largest rank over its modules."""
    @property
    def module_ranks(self) -> list[int]:
        """Per engine module (spec order): the largest rank over layers, 0 = not targeted."""
    @property
    def segment_scale(self) -> float:
        """Largest |scale| over its adapted (layer, module)s (1.0 if none): the scale its LoRA
        segments run at; each module's scale is folded into its Bt rows as a ratio to it."""
    @property
    def host_bytes(self) -> int:
        """Host memory its weights take once read (float32)."""
    @property
    def use_rslora(self) -> bool: ...
    @property
    def invocation_tokens(self) -> list[int] | None: ...
    @property
    def target_modules(self) -> list[str]:
        """Names (from the model spec) of the modules that have weights in at least one layer."""
    @property
    def config_json(self) -> str: ...
    def module_rank(self, layer: int, module: str) -> int:
        """Rank of the adapter at (layer, module), 0 when not adapted there."""
    def scale(self, layer: int, module: str) -> float:
        """lora_alpha / r (or / sqrt(r) with rsLoRA) at (layer, module), patterns applied."""

class StepPlan:
    """One forward pass, as flat arrays (DESIGN.md section 4). Tokens are the step's token axis."""

    @property
    def step_id(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_seqs(self) -> int: ...
    request_ids: NDArray[np.uint64]  # [S]
    input_ids: NDArray[np.int64]  # [T]
    positions: NDArray[np.int64]  # [T]
    slot_mapping: NDArray[np.int64]  # [T] block * block_size + offset
    query_start: NDArray[np.int64]  # [S + 1]
    context_lens: NDArray[np.int64]  # [S] tokens in the KV after this step
    block_tables: NDArray[np.int32]  # [S, max_blocks], padded with -1
    sample_indices: NDArray[np.int64]  # [N] token index whose logits are sampled
    sample_seqs: NDArray[np.int64]  # [N] sequence index (into request_ids) of each sample
    token_adapter_slot: NDArray[np.int32]  # [T] index into segment arrays, -1 = base
    sorted_token_idx: NDArray[np.int64]  # [T_active] token indices grouped by adapter
    segment_start: NDArray[np.int32]  # [A + 1] offsets into sorted_token_idx
    segment_adapter: NDArray[np.uint64]  # [A] adapter id of each segment
    adapter_rank: NDArray[np.int32]  # [A * M] rank per (segment, module), 0 = not targeted
    adapter_row_start: NDArray[np.int32]  # [A * M + 1] offsets into the row lists
    adapter_rows: NDArray[np.int32]  # A row ids per (segment, module)
    adapter_bt_rows: NDArray[np.int32]  # Bt row ids, same offsets
    copy_src: NDArray[np.int64]  # [C] source block of a prefix copy-on-write
    copy_dst: NDArray[np.int64]  # [C] destination block
    copy_len: NDArray[np.int64]  # [C] leading token slots to copy
    adapter_loads: list[
        tuple[int, NDArray[np.int32], NDArray[np.int32], NDArray[np.int32], AdapterWeights]
    ]
    """(adapter id, row_start [M + 1], A rows, Bt rows, host weights): page-ins to write
    before the forward pass."""

class RequestOutput:
    @property
    def request_id(self) -> int: ...
    @property
    def new_token(self) -> int | None: ...
    @property
    def finished(self) -> bool: ...
    @property
    def finish_reason(self) -> Literal["stop", "length", "abort"] | None: ...
    @property
    def output_tokens(self) -> list[int]: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache (full blocks and copied slots)."""
    @property
    def computed_tokens(self) -> int:
        """Tokens run through the model for this request so far (recomputation included)."""
    @property
    def lora_tokens(self) -> int:
        """Computed tokens that got LoRA compute (0 for base requests)."""
    @property
    def preemptions(self) -> int: ...

class Engine:
    def __init__(
        self,
        *,
        num_layers: int,
        modules: Sequence[tuple[str, str, int, int]],
        block_size: int,
        num_blocks: int,
        kv_dim: int,
        max_batch_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        enable_prefix_cache: bool = True,
        vocab_size: int | None = None,
        kv_block_cap: int | None = None,
        adapter_block_cap: int | None = None,
        host_cache_bytes: int = 1 << 30,
    ) -> None:
        """`modules`: (name, path within a decoder layer, in_features, out_features), e.g.
        ("q_proj", "self_attn.q_proj", 4096, 4096). `num_blocks` memory units hold KV blocks
        and adapter rows alike (`kv_dim` = kv_heads * head_dim sets where rows fit); the caps
        bound what each kind may hold. With `vocab_size`, every token id (prompts, stop ids,
        invocation tokens) must lie in [0, vocab_size)."""
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def row_granularity(self) -> int:
        """Elements per row id step: row id c starts at element c * g of a layer's flat arena."""
    @property
    def unit_elems(self) -> int:
        """block_size * kv_dim: one unit's share of one layer's K (or V) side."""
    def load_adapter(
        self, name: str, path: str, invocation_tokens: Sequence[int] | None = None
    ) -> AdapterInfo:
        """Load a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    def load_adapter_from_tensors(
        self,
        name: str,
        config_json: str,
        tensors: dict[str, NDArray[np.float32]],
        invocation_tokens: Sequence[int] | None = None,
    ) -> AdapterInfo: ...
    def unload_adapter(self, name: str) -> None: ...
    def adapter(self, name: str) -> AdapterInfo: ...
    def adapters(self) -> list[AdapterInfo]: ...
    def add_request(
        self,
        prompt: Sequence[int] | NDArray[np.integer],
        *,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> int:
        """Queue a request; returns its id. Validates everything before changing state: a bad
        value (a non-integer, a token id outside the vocabulary, max_new_tokens < 1) raises
        InvalidRequestError naming the argument. max_new_tokens defaults to 16."""
    def schedule(self) -> StepPlan | None:
        """Plan the next forward pass, or None when nothing can run now: no request is
        unfinished, or every runnable one waits for an adapter read (`pending_fetches`)."""
    def adapter_units(self, name: str) -> int:
        """Memory units the adapter occupies when resident on the device."""
    def pending_fetches(self) -> list[int]:
        """Adapter ids that queued requests need read from disk, in queue order."""
    def install_weights(self, adapter_id: int, weights: AdapterWeights) -> None:
        """Put weights from `read_adapter_weights` into the host tier (UnknownAdapterError if
        the adapter was unloaded meanwhile)."""
    def commit(
        self, step_id: int, sampled: Sequence[int] | NDArray[np.int64]
    ) -> list[RequestOutput]:
        """Apply the tokens sampled for `plan.sample_seqs` (same order); one output per sampled
        request, with `finished` set on those that ended."""
    def cancel_step(self, step_id: int) -> None:
        """Roll back the step in flight: its admissions are undone (requests queued again,
        intact), adapters it paged in are not resident, copy sources are unpinned, running
        requests keep exactly the KV they had computed. Nothing it planned is published."""
    def abort(self, request_id: int) -> RequestOutput:
        """Abort a waiting or running request (also while a step is in flight)."""
    def request_output(self, request_id: int) -> RequestOutput: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """Counters: total_blocks (memory units), free_blocks (neither referenced by KV nor
        held by adapters), used_blocks (referenced by KV), cached_blocks, adapter_blocks,
        kv_block_cap, adapter_block_cap, running, waiting, loaded_adapters (registered),
        resident_adapters, pinned_adapters, host_adapters, host_bytes, host_loads,
        host_evictions, prefix_query_tokens, prefix_hit_tokens, preemptions, adapter_loads,
        adapter_evictions, steps."""
    def cached_base_hashes(self) -> list[int]:
        """64-bit chained hashes of every full block cached with the base key (the prefix
        summary a router compares with `base_prefix_hashes`)."""
    def reset_prefix_cache(self) -> None: ...
