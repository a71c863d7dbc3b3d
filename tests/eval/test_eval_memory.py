"""Process memory and pytree byte accounting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.eval.memory import (
    current_rss_bytes,
    device_memory_stats,
    format_bytes,
    peak_rss_bytes,
    tree_nbytes,
    tree_size,
)


def test_tree_nbytes_plain_arrays() -> None:
    tree = {
        "w": jnp.zeros((10, 10), jnp.float32),
        "b": jnp.zeros((4,), jnp.bfloat16),
        "n": np.zeros((3,), np.int8),
        "spec": jax.ShapeDtypeStruct((2, 8), jnp.float16),
        "none": None,
        "step": 3,
    }
    assert tree_nbytes(tree) == 400 + 8 + 3 + 32
    assert tree_nbytes({}) == 0


def test_tree_nbytes_counts_qarray_storage() -> None:
    w = jax.random.normal(jax.random.key(0), (256, 64), jnp.float32)
    q = jq.quantize(w, jq.IntScheme(bits=4, group_size=32))
    tree = {"layer": {"kernel": q, "bias": jnp.zeros((64,), jnp.float32)}}
    assert tree_nbytes(tree) == q.nbytes + 256
    assert q.nbytes < w.size * 4 / 4  # 4-bit storage is well under a quarter of fp32
    st = tree_size(tree)
    assert (st.nbytes, st.quantized_bytes, st.other_bytes) == (q.nbytes + 256, q.nbytes, 256)
    assert (st.n_params, st.n_quantized_params) == (256 * 64 + 64, 256 * 64)
    assert st.quantized_bits_per_param == q.bits_per_weight
    assert np.isnan(tree_size({"b": jnp.zeros(3)}).quantized_bits_per_param)


def test_process_memory() -> None:
    before = peak_rss_bytes()
    assert before > 10 * 2**20  # a Python process with JAX loaded is well over 10 MiB
    big = np.ones(64 * 2**20, np.uint8)  # touch 64 MiB
    after = peak_rss_bytes()
    assert after >= before
    cur = current_rss_bytes()
    assert cur is None or cur >= big.nbytes
    del big
    stats = device_memory_stats()
    assert stats is None or isinstance(stats, dict)


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"
