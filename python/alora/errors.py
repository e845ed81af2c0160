"""The exception hierarchy. Every error the engine raises is an `AloraError`; the classes are
defined by the Rust extension and re-exported here."""

from alora._core import (
    AdapterBusyError,
    AdapterError,
    AdapterFormatError,
    AdapterShapeError,
    AloraError,
    CapacityError,
    ConfigError,
    DuplicateAdapterError,
    InvalidRequestError,
    StepError,
    UnknownAdapterError,
    UnknownRequestError,
    UnsupportedDtypeError,
)
from alora.model import UnsupportedModelError

__all__ = [
    "AdapterBusyError",
    "AdapterError",
    "AdapterFormatError",
    "AdapterShapeError",
    "AloraError",
    "CapacityError",
    "ConfigError",
    "DuplicateAdapterError",
    "InvalidRequestError",
    "StepError",
    "UnknownAdapterError",
    "UnknownRequestError",
    "UnsupportedDtypeError",
    "UnsupportedModelError",
]
