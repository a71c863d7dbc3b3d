"""``benchmarks/device_trace.py``: per-call kernel times from a profiler trace (a synthetic GPU trace; a CPU run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

GPU_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines { id: 1 name: "Stream #7(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
    events { metadata_id: 2 offset_ps: 6000000 duration_ps: 2000000 }
    events { metadata_id: 1 offset_ps: 10000000 duration_ps: 5000000 }
    events { metadata_id: 2 offset_ps: 16000000 duration_ps: 2000000 }
    events { metadata_id: 3 offset_ps: 17000000 duration_ps: 0 }
  }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "int4_matmul" } }
  event_metadata { key: 2 value { id: 2 name: "loop_reduce_fusion" } }
  event_metadata { key: 3 value { id: 3 name: "marker" } }
}
planes { id: 2 name: "/host:CPU" }
"""


def test_summarize_a_gpu_trace_per_call():
    """Two calls, each a 5 µs kernel and a 2 µs reduction 1 µs later: per call 7 µs busy and 9 µs of the trace's
    first-to-last span (the gaps within and between calls included), kernels ordered by time; the derived
    "XLA Ops" line and zero-length events not counted."""
    from jax._src import profiler as jp

    from benchmarks.device_trace import summarize

    s = summarize(jp.ProfileData.from_text_proto(GPU_TRACE), calls=2)
    assert s["source"] == "gpu"
    assert [k["name"] for k in s["kernels"]] == ["int4_matmul", "loop_reduce_fusion"]
    assert s["kernels"][0] == {"name": "int4_matmul", "per_call": 1.0, "us_per_call": 5.0}
    assert s["busy_us"] == pytest.approx(7.0) and s["span_us"] == pytest.approx(9.0)  # 1 µs .. 19 µs over 2 calls


def test_trace_calls_runs_on_this_backend():
    from benchmarks.device_trace import trace_calls

    f = jax.jit(lambda a: (a @ a).sum())
    r = trace_calls(f, (jnp.ones((64, 64)),), calls=3)
    assert r["wall_us"] > 0 and r["source"] in ("gpu", "host (no GPU: not device times)")
    assert r["kernels"] and all(k["us_per_call"] > 0 for k in r["kernels"])
    with pytest.raises(ValueError, match="calls"):
        trace_calls(f, (jnp.ones((2, 2)),), calls=0)
