"""NVRTC compilation of the `cuda/` kernels to cubin, with a disk cache and ptxas statistics.

Compilation needs no GPU: the target architecture is always explicit (`sm_XY`), so the CPU
test suite and `alora check-kernels` compile for architectures this machine does not have.
cuda-python is imported inside the functions that need it, so `import alora` works without it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from alora import kernels as _kernels
from alora.kernels import KERNEL_FILE

# Bump to invalidate every cached cubin when the compile recipe changes in a way the key
# does not see (it already covers source text, options and NVRTC version).
_CACHE_FORMAT = 1
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


class KernelCompileError(RuntimeError):
    """NVRTC rejected the kernel sources; the message carries the compiler log."""


@dataclass(frozen=True)
class KernelResources:
    """Per-kernel figures from the ptxas verbose log."""

    name: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    smem_bytes: int  # static shared memory; the kernels' dynamic shared memory comes on top


@dataclass(frozen=True)
class CompiledModule:
    arch: str
    cubin: bytes
    log: str  # the ptxas verbose log of the compile that produced the cubin

    def resources(self) -> dict[str, KernelResources]:
        return parse_ptxas_log(self.log)


def translation_unit(srcs: dict[str, str] | None = None, main: str = KERNEL_FILE) -> str:
    """`main` with its quoted includes of other `cuda/` files inlined (each file once), so NVRTC
    needs no include path and the text is exactly what the Rust benches compile."""
    srcs = _kernels.sources() if srcs is None else srcs
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name not in srcs:
            raise KernelCompileError(f"kernel source {name!r} not found (have {sorted(srcs)})")
        seen.add(name)

        def include(m: re.Match[str]) -> str:
            inc = m.group(1)
            return "" if inc in seen else f"// begin {inc}\n{expand(inc)}\n// end {inc}"

        return _INCLUDE_RE.sub(include, srcs[name])

    return expand(main)


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"nvrtcVersion failed: {err!r}")
    return int(major), int(minor)


def _check_arch(arch: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[af]?", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return arch


def _option_args(arch: str) -> dict[str, object]:
    # ptxas -v costs nothing at run time and gives registers/spills for `check-kernels`.
    return {"arch": arch, "std": "c++17", "ptxas_options": ["-v"], "name": KERNEL_FILE}


def cache_dir() -> Path:
    env = os.environ.get("ALORA_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "alora" / "kernels"


def cache_key(source: str, arch: str, nvrtc: tuple[int, int]) -> str:
    h = hashlib.sha256()
    for part in (str(_CACHE_FORMAT), source, repr(sorted(_option_args(arch).items())), repr(nvrtc)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers see the old file or the new one, never a torn one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compile_cubin(
    arch: str, *, srcs: dict[str, str] | None = None, use_cache: bool = True
) -> CompiledModule:
    """Compile every kernel for `arch` (e.g. "sm_90"); cached on disk under `cache_dir()`."""
    _check_arch(arch)
    source = translation_unit(srcs)
    version = nvrtc_version()
    key = cache_key(source, arch, version)
    base = cache_dir() / f"{key}-{arch}"
    cubin_path, log_path = base.with_suffix(".cubin"), base.with_suffix(".log")
    if use_cache:
        try:
            return CompiledModule(arch, cubin_path.read_bytes(), log_path.read_text())
        except OSError:
            pass  # miss (or a half-populated entry): recompile and rewrite both files

    from cuda.core import Program, ProgramOptions

    log = io.StringIO()
    try:
        program = Program(source, "c++", ProgramOptions(**_option_args(arch)))  # type: ignore[arg-type]
        obj = program.compile("cubin", logs=log)
    except Exception as e:  # NVRTC errors surface as several exception types
        raise KernelCompileError(
            f"NVRTC failed to compile {KERNEL_FILE} for {arch}: {e}\n{log.getvalue()}"
        ) from e
    cubin = bytes(obj.code)
    text = log.getvalue().replace("\0", "")
    if use_cache:
        try:
            _atomic_write(log_path, text.encode())
            _atomic_write(cubin_path, cubin)  # written last: its presence marks a complete entry
        except OSError:
            pass  # a read-only cache must not break compilation
    return CompiledModule(arch, cubin, text)


_ENTRY_RE = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'")
_FRAME_RE = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
    r"(?P<ld>\d+) bytes spill loads"
)
_USED_RE = re.compile(r"Used (?P<regs>\d+) registers(?P<rest>.*)")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Kernel name -> resources, from `ptxas -v` output. Raises if an entry is incomplete, so a
    log format change cannot silently read as "no spills"."""
    out: dict[str, KernelResources] = {}
    blocks = _ENTRY_RE.split(log.replace("\0", ""))
    # split() with two groups yields [head, name, arch, body, name, arch, body, ...]
    for i in range(1, len(blocks) - 2, 3):
        name, body = blocks[i], blocks[i + 2]
        frame, used = _FRAME_RE.search(body), _USED_RE.search(body)
        if frame is None or used is None:
            raise ValueError(f"incomplete ptxas statistics for {name!r}:\n{body}")
        smem = _SMEM_RE.search(used.group("rest"))
        out[name] = KernelResources(
            name=name,
            registers=int(used.group("regs")),
            stack_bytes=int(frame.group("stack")),
            spill_stores=int(frame.group("st")),
            spill_loads=int(frame.group("ld")),
            smem_bytes=int(smem.group(1)) if smem else 0,
        )
    return out
