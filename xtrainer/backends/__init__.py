"""Backends: everything that touches a device sits behind the Backend protocol (see base.py)."""

from .base import Backend, EvalOutput, StepMetrics
from .registry import available_backends, get_backend, resolve_backend_name

__all__ = ["Backend", "EvalOutput", "StepMetrics", "available_backends", "get_backend", "resolve_backend_name"]
