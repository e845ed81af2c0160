"""`alora check-kernels [--arch sm_80,sm_89,sm_90] [--no-cache]`: compile every kernel (every
dtype instantiation) for each architecture with NVRTC and print registers, stack, spill stores
and loads and static shared memory, from ptxas's verbose log. Needs no GPU.

Exit status: 0 when everything compiled with no spills and no stack, 1 when some kernel spills
or uses a stack frame, 2 when compilation failed or a kernel is missing from the log.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_ARCHS = ("sm_80", "sm_89", "sm_90")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alora check-kernels",
        description="Compile the LoRA CUDA kernels with NVRTC and report their resource usage.",
    )
    parser.add_argument(
        "--arch",
        default=",".join(DEFAULT_ARCHS),
        help="comma-separated target architectures (default: %(default)s)",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompile, ignoring the cache")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not archs:
        parser.error("--arch needs at least one architecture")

    from alora.kernels import KERNEL_NAMES
    from alora.kernels.compile import KernelCompileError, compile_cubin, nvrtc_version

    try:
        major, minor = nvrtc_version()
    except ImportError as e:
        print(f"check-kernels needs cuda-python (pip install 'alora[cuda]'): {e}", file=sys.stderr)
        return 2
    print(f"NVRTC {major}.{minor}")
    header = ("kernel", "arch", "regs", "stack", "spill st", "spill ld", "smem")
    rows: list[tuple[str, ...]] = []
    status = 0
    for arch in archs:
        try:
            res = compile_cubin(arch, use_cache=not args.no_cache).resources()
        except (KernelCompileError, ValueError) as e:
            print(f"{arch}: {e}", file=sys.stderr)
            status = 2
            continue
        for name in KERNEL_NAMES:
            r = res.get(name)
            if r is None:
                print(f"{arch}: {name} missing from the ptxas log", file=sys.stderr)
                status = 2
                continue
            bad = r.spill_stores or r.spill_loads or r.stack_bytes or r.registers <= 0
            if bad and status == 0:
                status = 1
            rows.append(
                (
                    name + (" !" if bad else ""),
                    arch,
                    str(r.registers),
                    str(r.stack_bytes),
                    str(r.spill_stores),
                    str(r.spill_loads),
                    str(r.smem_bytes),
                )
            )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])
        print("  ".join(cells))
    print("(smem: static shared memory only; the launchers add dynamic shared memory per launch)")
    if status == 1:
        print("FAIL: kernels marked ! spill or use a stack frame", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
