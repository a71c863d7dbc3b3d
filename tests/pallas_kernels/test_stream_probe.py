"""``benchmarks/stream_probe.py``: its Pallas loop sums what it reads (interpret mode), and bad tiles are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import BlockConfig


def test_stream_sum_is_the_column_sum():
    from benchmarks.stream_probe import stream_sum

    w = jax.random.randint(jax.random.PRNGKey(0), (128, 96), 0, 256).astype(jnp.uint8)
    cfg = BlockConfig(block_m=1, block_n=32, block_k=16, split_k=2)
    got = np.asarray(stream_sum(w, cfg, interpret=True))
    assert got.shape == (2, 96)
    np.testing.assert_array_equal(got.sum(axis=0), np.asarray(w, np.int64).sum(axis=0))
    with pytest.raises(ValueError, match="does not divide"):
        stream_sum(w, BlockConfig(block_m=1, block_n=64, block_k=16, split_k=2), interpret=True)
