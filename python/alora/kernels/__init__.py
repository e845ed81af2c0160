"""CUDA kernels for the batched LoRA op (DESIGN.md section 6).

The kernel sources live in the repository's `cuda/` directory; the Rust extension embeds them
at build time (`alora._core.kernel_sources()`), so the wheel carries them and the Rust benches
compile the very same text. They are compiled at run time with NVRTC through cuda-python
(`compile.py`), cached on disk, and launched on torch's current stream (`launch.py`).

Nothing here imports cuda-python at import time: `import alora` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from alora.backend import LoraBackend

# The translation unit NVRTC compiles; it includes the other files by quoted name.
KERNEL_FILE = "lora.cu"
# Largest adapter rank the kernels accept (ALORA_MAX_RANK in cuda/lora_common.cuh).
MAX_RANK = 128
DTYPE_SUFFIXES = ("f32", "f16", "bf16")
FORMS = ("dec", "seg")
# Every extern "C" entry point of KERNEL_FILE.
KERNEL_NAMES = tuple(
    f"alora_{op}_{form}_{dt}"
    for dt in DTYPE_SUFFIXES
    for op in ("shrink", "expand")
    for form in FORMS
)


def sources() -> dict[str, str]:
    """The kernel sources (file name -> text) embedded in the Rust extension. The single place
    that provides them; tests and tools that run without the extension patch this function."""
    from alora import _core

    return dict(_core.kernel_sources())


def cuda_python_available() -> bool:
    try:
        import cuda.core  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device: torch.device) -> LoraBackend:
    """The LoRA backend for a model on `device`: the CUDA kernels on a CUDA device when
    cuda-python is installed, else the torch reference."""
    import torch

    from alora.backend import TorchBackend

    if torch.device(device).type == "cuda" and cuda_python_available():
        from alora.kernels.launch import CudaBackend

        return CudaBackend(device)
    return TorchBackend()


def __getattr__(name: str) -> Any:
    # Lazy re-exports: importing them pulls in torch (and, at first use, cuda-python).
    if name in ("CudaBackend", "KernelLaunchError"):
        from alora.kernels import launch

        return getattr(launch, name)
    if name in ("KernelCompileError", "compile_cubin"):
        from alora.kernels import compile as _compile

        return getattr(_compile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DTYPE_SUFFIXES",
    "FORMS",
    "KERNEL_FILE",
    "KERNEL_NAMES",
    "MAX_RANK",
    "CudaBackend",
    "KernelCompileError",
    "KernelLaunchError",
    "compile_cubin",
    "cuda_python_available",
    "default_backend",
    "sources",
]
