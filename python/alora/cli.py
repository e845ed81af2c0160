"""The `alora` command line: `alora demo`, `alora serve` and `alora check-kernels`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    from alora import demo

    parser = argparse.ArgumentParser(
        prog="alora",
        description="aLoRA Runtime: serve many LoRA and aLoRA adapters on one base model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_parser = sub.add_parser(
        "demo",
        help="multi-turn agentic chain: aLoRA intrinsics vs the same adapters as LoRA",
        description=_capitalized((demo.__doc__ or "").split(":", 1)[-1].strip()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    from alora.serving import cli as serve_cli

    serve_parser = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, adapters as models)",
        description=serve_cli.__doc__,
    )
    serve_cli.add_arguments(serve_parser)
    # Listed for --help only: main() forwards its arguments untouched (see below).
    sub.add_parser(
        "check-kernels",
        help="compile the CUDA kernels with NVRTC and report registers and spills",
        add_help=False,
    )
    return parser


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "check-kernels":
        # Its own parser owns its flags (and --help); imported lazily, as it pulls in NVRTC.
        from alora.kernels.check import main as check_main

        return int(check_main(args_list[1:]) or 0)
    args = _parser().parse_args(args_list)
    if args.command == "demo":
        from alora.demo import run

        return run(args)
    if args.command == "serve":
        from alora.serving.cli import run as serve

        return serve(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
