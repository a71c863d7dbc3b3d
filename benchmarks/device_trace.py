"""Where the time of one call goes: the device kernels it launches, from a profiler trace (JAX's own profiler).

A benchmark time per call (``benchmarks/kernels.py``) says how far a kernel is from the copy-bandwidth floor, not
why: the Pallas kernel itself, the XLA launches around it (activation pre-pass, split-K reduction, a weight
transpose) or gaps between launches (launch latency, host dispatch). :func:`trace_calls` runs ``calls`` calls
under ``jax._src.profiler``'s profiler session (the one ``jax.profiler.trace`` uses), reads the trace back with
``ProfileData`` (no TensorBoard needed) and returns, per call: the wall time, each launched kernel's device time
and count, their sum (device busy time) and the rest (gaps).

Devices: the events of the ``/device:GPU:*`` planes, per line ("Stream ..." lines hold the kernels; memcpy
events count too). Without a GPU (CPU dry runs) the host plane's XLA thread lines stand in for them, so the code
path is exercised; those numbers mean nothing for a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["summarize", "trace_calls"]

#: lines of a device plane that the converter derives from the kernel events (counted twice otherwise)
_DERIVED = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "TensorFlow")


def trace_calls(fn: Callable[..., Any], args: tuple, calls: int = 20) -> dict[str, Any]:
    """Trace ``calls`` back-to-back calls of ``fn(*args)`` (compiled and warmed up first) and summarize them.

    Returns :func:`summarize`'s dict plus ``wall_us`` (wall time per call around the traced loop; the profiler
    adds a little overhead per launch). Raises ``ValueError`` for ``calls < 1``; a profiler that cannot start
    raises its own error (callers in the suite report it and go on).
    """
    if calls < 1:
        raise ValueError(f"trace_calls: calls must be >= 1, got {calls}")
    from jax._src import profiler as jp
    from jax._src.lib import _profiler

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    session = _profiler.ProfilerSession(_profiler.ProfileOptions())
    try:
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        wall = time.perf_counter() - t0
    finally:
        xspace = session.stop()
    summary = summarize(jp.ProfileData.from_serialized_xspace(xspace), calls)
    summary["wall_us"] = 1e6 * wall / calls
    return summary


def _event_lines(data: Any) -> tuple[str, list[tuple[str, list[Any]]]]:
    """``(source, [(line name, events)])``: the GPU planes' kernel lines, else the host's XLA thread lines."""
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if gpu:
        lines = [(f"{p.name} {ln.name}", list(ln.events)) for p in gpu for ln in p.lines if ln.name not in _DERIVED]
        return "gpu", lines
    host = [p for p in data.planes if p.name.startswith("/host:CPU")]
    lines = [(f"{p.name} {ln.name}", list(ln.events)) for p in host for ln in p.lines if ln.name.startswith("tf_XLA")]
    return "host (no GPU: not device times)", lines


def summarize(data: Any, calls: int) -> dict[str, Any]:
    """Per-call kernel times of a trace (``jax._src.profiler.ProfileData``) of ``calls`` identical calls.

        Returns ``source`` (``"gpu"`` or the host stand-in), ``kernels`` (``[{name, per_call, us_per_call}]``, by
        time, events of zero duration left out), ``busy_us`` (sum of the kernel times per call; overlapping kernels on
        several streams count twice) and ``span_us`` (first kernel start to last kernel end over the whole trace,
    divided by ``calls``: the gaps within and between calls included).
    """
    source, lines = _event_lines(data)
    agg: dict[str, list[float]] = {}
    first, last = None, None
    for _, events in lines:
        for e in events:
            if e.duration_ns <= 0:
                continue
            a = agg.setdefault(e.name, [0, 0.0])
            a[0] += 1
            a[1] += e.duration_ns
            first = e.start_ns if first is None else min(first, e.start_ns)
            last = e.end_ns if last is None else max(last, e.end_ns)
    kernels = [
        {"name": name, "per_call": count / calls, "us_per_call": ns / calls / 1e3}
        for name, (count, ns) in sorted(agg.items(), key=lambda kv: -kv[1][1])
    ]
    return {
        "source": source,
        "kernels": kernels,
        "busy_us": sum(k["us_per_call"] for k in kernels),
        "span_us": (last - first) / calls / 1e3 if first is not None else 0.0,
    }
