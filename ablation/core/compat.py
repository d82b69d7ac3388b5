"""Small shims so the toolkit runs on every JAX it supports (0.4.3x through 0.11)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax


@contextlib.contextmanager
def enable_x64() -> Iterator[None]:
    """Context manager turning on 64-bit types (``jax.enable_x64`` on new JAX)."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:  # older JAX kept it under experimental
        from jax.experimental import enable_x64 as ctx  # type: ignore[no-redef]
        with ctx():
            yield
        return
    with ctx(True):
        yield
