"""API key checks and confinement of client-given adapter paths to one root directory."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path


class PathNotAllowedError(ValueError):
    """A client-given path outside the adapter root, or not a plain adapter directory."""


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so the key cannot be guessed byte by byte from timing."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def confine(root: str | Path, user_path: str, *, max_files: int = 64) -> Path:
    """Resolve a client-given adapter path inside `root` or raise `PathNotAllowedError`.

    Relative paths are taken from `root`; absolute ones must lie inside it. The path may not
    contain `..`, must resolve (symlinks followed) inside the resolved root, must be a
    directory, and every entry in it must be a regular file whose real path is inside the
    root too (a symlink inside the directory to /etc/passwd or a FIFO or device file would
    otherwise be read by the loader)."""
    if "\x00" in user_path:
        raise PathNotAllowedError("lora_path contains a NUL byte")
    root_real = Path(os.path.realpath(root))
    p = Path(user_path)
    if ".." in p.parts:
        raise PathNotAllowedError("lora_path must not contain '..'")
    candidate = p if p.is_absolute() else root_real / p
    real = Path(os.path.realpath(candidate))
    if real != root_real and root_real not in real.parents:
        raise PathNotAllowedError("lora_path is outside the adapter root")
    try:
        st = os.stat(real)
    except OSError:
        raise PathNotAllowedError("lora_path does not exist under the adapter root") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PathNotAllowedError("lora_path must be an adapter directory")
    entries = list(real.iterdir())
    if len(entries) > max_files:
        raise PathNotAllowedError("lora_path holds too many files for an adapter directory")
    for entry in entries:
        entry_real = Path(os.path.realpath(entry))
        if root_real not in entry_real.parents:
            raise PathNotAllowedError(f"{entry.name} links outside the adapter root")
        mode = os.stat(entry_real).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise PathNotAllowedError(f"{entry.name} is not a regular file")
    return real
