"""`alora serve`: an OpenAI/vLLM-compatible HTTP server over an `AdapterRuntime`.

`create_app(rt, ServerConfig(...))` builds the FastAPI app; `alora.serving.cli` holds the
command line. Importing this package is cheap: FastAPI, uvicorn and llguidance load on
first use of a name (so `alora --help` does not pay for them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alora.serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("alora.serving.app"), name)
    raise AttributeError(f"module 'alora.serving' has no attribute {name!r}")
