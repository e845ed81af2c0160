"""Run the CUDA kernels on the CPU, for testing without a GPU.

`cuda/lora.cu` is compiled with the host C++ compiler against a small emulation of the CUDA
subset it uses (`_emu/emu.h`: one OS thread per CUDA thread, real barriers for
`__syncthreads`, a real exchange for `__shfl_xor_sync`, NaN-poisoned shared memory per block).
Only the three fp16/bf16 conversion instructions differ from the device build. The executor
takes the same `Launch` records as the CUDA one, so tests exercise the kernels' indexing and
the launch planning together:

    backend = CudaBackend("cpu", executor=EmuExecutor(), num_sms=4)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from alora.kernels.compile import cache_dir, translation_unit
from alora.kernels.launch import Launch

_HERE = Path(__file__).parent / "_emu"
_FLAGS = ["-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-DALORA_HOST_EMU", "-w"]


class EmulatorUnavailable(RuntimeError):
    """No host C++20 compiler to build the emulator with."""


def compiler() -> str | None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    return cxx


def build(srcs: dict[str, str] | None = None) -> Path:
    """Build (or reuse) the emulator library for the current kernel sources."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorUnavailable("no C++ compiler (set CXX or install g++)")
    tu = translation_unit(srcs)
    emu_h, harness = (_HERE / "emu.h").read_text(), (_HERE / "harness.cpp").read_text()
    key = hashlib.sha256("\0".join([tu, emu_h, harness, cxx, *_FLAGS]).encode()).hexdigest()[:24]
    lib = cache_dir() / "emu" / f"lora_emu-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "lora_tu.cu").write_text(tu)
        (d / "emu.h").write_text(emu_h)
        (d / "harness.cpp").write_text(harness)
        out = d / "lib.so"
        cmd = [cxx, *_FLAGS, "-include", str(d / "emu.h"), str(d / "harness.cpp"), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"building the kernel emulator failed:\n{res.stderr}")
        fd, tmp_lib = tempfile.mkstemp(dir=lib.parent, suffix=".tmp")
        os.close(fd)
        shutil.copyfile(out, tmp_lib)
        os.replace(tmp_lib, lib)
    return lib


def _ctype(v: np.generic) -> object:
    if isinstance(v, np.uint64):
        return ctypes.c_void_p(int(v) or None)
    if isinstance(v, np.int32):
        return ctypes.c_int(int(v))
    raise TypeError(f"unexpected kernel argument type {type(v)}")


class EmuExecutor:
    """Executes `Launch` records on the CPU; the tensors must be CPU tensors."""

    def __init__(self, srcs: dict[str, str] | None = None) -> None:
        self._lib = ctypes.CDLL(str(build(srcs)))
        self.launches: list[Launch] = []  # a record, for tests that check the planning

    def __call__(self, launch: Launch) -> None:
        self.launches.append(launch)
        op = launch.kernel.split("_")[1]
        fn = {"shrink": self._lib.emu_shrink, "expand": self._lib.emu_expand}[op]
        fn.restype = ctypes.c_int
        head = [
            ctypes.c_char_p(launch.kernel.encode()),
            *(ctypes.c_uint(g) for g in launch.grid),
            ctypes.c_uint(launch.block),
            ctypes.c_uint(launch.shmem),
        ]
        rc = fn(*head, *(_ctype(a) for a in launch.args))
        if rc != 0:
            raise RuntimeError(f"emulated launch of {launch.kernel} failed (code {rc}): {launch}")
