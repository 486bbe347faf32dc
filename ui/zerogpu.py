"""ZeroGPU, the hosted demo's GPU: only functions decorated with ``spaces.GPU`` get one.

Each call of such a function runs in a worker process forked from the server, its arguments and return values (or
each value it yields) pickled across, so the functions given to :func:`gpu` take and return plain values, change
nothing of the server's, and do every model step of a handler (loading an artifact, previews, class images, samples,
generation) inside the one call. The server process has no GPU: what it builds at start-up and moves to "cuda" (the
base pipeline, ``Services.warm_up``) the ``spaces`` package keeps on the CPU and hands to each worker, so no GPU
time goes to loading it. Everywhere else :func:`gpu` returns the function unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def on_zero_gpu() -> bool:
    """Whether this is a ZeroGPU Space (read as the ``spaces`` package reads it)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu(duration: Callable[..., int]) -> Callable[[F], F]:
    """``spaces.GPU(duration=duration)`` on ZeroGPU: ``duration`` gets the call's arguments and returns the seconds
    to ask for, so each call asks for what its size needs; elsewhere the function itself."""
    if not on_zero_gpu():
        return lambda function: function
    import spaces  # installed on ZeroGPU Spaces; app.py imports it first, before anything touches CUDA

    return spaces.GPU(duration=duration)
