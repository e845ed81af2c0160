"""`alora serve`: an OpenAI/vLLM-compatible HTTP server over an `AdapterRuntime`.

`create_app(rt, ServerConfig(...))` builds the FastAPI app; `alora.serving.cli` holds the
command line. FastAPI, uvicorn and llguidance are imported only when this package is used.
"""

from alora.serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
