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


def shard_map(fn, *, mesh, in_specs, out_specs):
    """``jax.shard_map`` (new JAX) or ``jax.experimental.shard_map.shard_map`` (older), with
    replication checking off.

    With it on, differentiating inside the body with respect to a replicated input (the
    parameters) sums that gradient across devices on its own (the transpose of the implicit
    ``pvary``), which would mix the per-example gradients of different devices' examples
    before they are clipped. The body sums its clipped gradients itself (``psum``).
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # type: ignore[import-not-found]
    return legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
