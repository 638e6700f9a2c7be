"""Backends compute per-row statistics and gradients for a validated problem; `dispatch` picks one."""

from xentlib.backends.dispatch import explain_dispatch, select_backend

__all__ = ["explain_dispatch", "select_backend"]
