"""`alora serve`: load a model and adapters, start the runtime, serve it with uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("alora.serve")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
          "mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3}  # fmt: skip


def parse_bytes(text: str) -> int:
    """`4GiB`, `512m`, `1e9` or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument(
        "--model",
        help="local transformers model directory (default: the "
        "project's default model, or the tiny random model without one)",
    )
    m.add_argument(
        "--tiny",
        action="store_true",
        help="serve a tiny random Llama with a word-level tokenizer (for tests)",
    )
    m.add_argument(
        "--served-model-name",
        help="the `model` name of the base model (default: --model, or 'base')",
    )
    m.add_argument(
        "--adapter",
        action="append",
        type=_adapter_arg,
        default=[],
        metavar="NAME=PATH",
        help="PEFT LoRA/aLoRA adapter to load (repeatable). With the default model and no "
        "--adapter, the shipped intrinsics are served: answerability, support (aLoRA) and "
        "answerability-lora, support-lora",
    )
    m.add_argument(
        "--no-default-adapters",
        action="store_true",
        help="serve the default model without its shipped intrinsics",
    )
    m.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    m.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if any)")
    e = parser.add_argument_group("engine")
    e.add_argument(
        "--device-memory",
        type=parse_bytes,
        help="device memory that KV blocks and adapters share, e.g. 4GiB",
    )
    e.add_argument("--kv-cache-memory", type=parse_bytes, help="cap on the KV cache, e.g. 2GiB")
    e.add_argument("--adapter-memory", type=parse_bytes, help="cap on adapters on the device")
    e.add_argument(
        "--host-adapter-memory",
        type=parse_bytes,
        help="host memory for adapter weights read from disk (default 1GiB)",
    )
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=os.environ.get("ALORA_API_KEY"),
        help="require `Authorization: Bearer KEY` on every endpoint but /health "
        "(default: $ALORA_API_KEY)",
    )
    s.add_argument(
        "--max-pending",
        type=int,
        default=None,
        help="sequences admitted at once; more get 503 (default: 4 x max-num-seqs)",
    )
    s.add_argument(
        "--allow-adapter-loading",
        action="store_true",
        help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    s.add_argument("--adapter-root", help="directory that loadable adapter paths must lie in")
    s.add_argument("--max-body-bytes", type=parse_bytes, default=4 << 20)
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds to let in-flight requests finish on SIGTERM before aborting",
    )
    s.add_argument("--log-level", default="info")


def runtime_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """AdapterRuntime keywords from the engine flags (sizes only where given)."""
    kwargs: dict[str, Any] = {"max_num_seqs": args.max_num_seqs}
    for flag in ("device_memory", "kv_cache_memory", "adapter_memory", "host_adapter_memory"):
        if getattr(args, flag) is not None:
            kwargs[flag] = getattr(args, flag)
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    return kwargs


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, default served name) from the arguments: `alora.models.load_model`
    (the project's default model, a local directory, or the tiny one) where it exists."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    else:
        dtype = getattr(torch, args.dtype)
    if importlib.util.find_spec("alora.models") is not None:
        from alora.models import load_model, model_label

        model, tok = load_model(args.model, tiny=args.tiny, dtype=dtype, device=device)
        return model, tok, model_label(args.model, args.tiny)
    if args.tiny or args.model is None:
        from alora.testing import tiny_model, tiny_tokenizer

        return tiny_model("llama", seed=0), tiny_tokenizer(), "tiny"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(args.model), args.model


def _adapters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The adapters to load: --adapter, else the intrinsics trained for the default model."""
    default_model = args.model in (None, "smollm2") and not args.tiny
    if args.adapter or not default_model or getattr(args, "no_default_adapters", False):
        return list(args.adapter)
    from alora.rag_tasks import ADAPTER_DIR

    return [
        (f"{task}{suffix}", str(ADAPTER_DIR / task / kind))
        for task in ("answerability", "support")
        for kind, suffix in (("alora", ""), ("lora", "-lora"))
        if (ADAPTER_DIR / task / kind / "adapter_config.json").is_file()
    ]


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The runtime and the app (adapters loaded, nothing served yet)."""
    import torch

    from alora import AdapterRuntime
    from alora.serving.app import ServerConfig, create_app

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, default_name = load(args)
    rt = AdapterRuntime(model, tokenizer, **runtime_kwargs(args))
    for name, path in _adapters(args):
        rt.load_adapter(name, path)
    name = args.served_model_name or default_name
    config = ServerConfig(
        model_name=name,
        aliases=tuple(a for a in {args.model, "base"} if a and a != name),
        api_key=args.api_key or None,
        max_pending=args.max_pending or 4 * args.max_num_seqs,
        allow_adapter_loading=args.allow_adapter_loading,
        adapter_root=args.adapter_root,
        max_body_bytes=args.max_body_bytes,
    )
    if args.allow_adapter_loading and not args.adapter_root:
        raise SystemExit("--allow-adapter-loading needs --adapter-root DIR")
    return rt, create_app(rt, config)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )
    _, app = build(args)
    # Uvicorn handles SIGINT/SIGTERM: it stops accepting, gives in-flight requests
    # --shutdown-timeout seconds, cancels the rest (which aborts them in the engine), then
    # runs the app's shutdown, which closes the runtime. It then re-raises the signal under
    # the handler that was there before it; a no-op one lets SIGTERM end in exit status 0,
    # which is what process supervisors expect of a clean shutdown.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
        access_log=False,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alora serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
