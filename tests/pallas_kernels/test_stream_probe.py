"""``benchmarks/stream_probe.py``: its Pallas loop sums what it reads (interpret mode), and bad tiles are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_helpers import assert_compiles, cuda_lowering, requires_triton

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


@pytest.mark.parametrize("dtype", ["uint8", "uint32"])
def test_stream_dot_is_the_product_with_the_bytes(dtype):
    """The pipelined rung: ``x @ bytes(w)`` in float32, per K split; uint32 words feed one dot per byte, their
    output columns mapped back to the byte columns by :func:`word_columns` (vs float64 NumPy)."""
    from benchmarks.stream_probe import stream_dot, word_columns

    w8 = jax.random.randint(jax.random.PRNGKey(0), (64, 128), 0, 256).astype(jnp.uint8)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 64), jnp.float32).astype(jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w8, np.float64)
    cfg = BlockConfig(block_m=16, block_n=64, block_k=16, split_k=2)
    if dtype == "uint32":
        w = jax.lax.bitcast_convert_type(w8.reshape(64, 32, 4), jnp.uint32)
        want = want[:, word_columns(128, 64)]
    else:
        w = w8
    got = np.asarray(stream_dot(x, w, cfg, interpret=True), np.float64)
    assert got.shape == (32, 128)
    np.testing.assert_allclose(got.reshape(2, 16, 128).sum(axis=0), want, rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="does not divide"):
        stream_dot(x, w, BlockConfig(block_m=16, block_n=256, block_k=16, split_k=2), interpret=True)
    with pytest.raises(ValueError, match="uint8/uint32"):
        stream_dot(x, w.astype(jnp.int32), cfg, interpret=True)


def test_word_columns_is_a_permutation_within_each_tile():
    from benchmarks.stream_probe import word_columns

    cols = word_columns(256, 128)
    assert sorted(cols.tolist()) == list(range(256))
    assert cols[:4].tolist() == [0, 4, 8, 12] and cols[32] == 1  # byte 0 of words 0..; then byte 1 of word 0
    assert set(cols[128:].tolist()) == set(range(128, 256))  # the second tile's own columns


@requires_triton
def test_stream_dot_lowers_and_compiles_for_sm90():
    """The rungs must run on the GPU when it comes: CUDA lowering and an sm_90 cubin for both tile dtypes."""
    from benchmarks.stream_probe import DOT_CASES, stream_dot

    x = jax.ShapeDtypeStruct((16, 1024), jnp.bfloat16)
    for dtype, bn, bk, split, warps, stages in DOT_CASES[:1] + DOT_CASES[-1:]:
        words = dtype == "uint32"
        w = jax.ShapeDtypeStruct((1024, 1024 // (4 if words else 1)), jnp.uint32 if words else jnp.uint8)
        cfg = BlockConfig(16, bn, bk, split_k=split, num_warps=warps, num_stages=stages)
        assert_compiles(cuda_lowering(lambda a, b, cfg=cfg: stream_dot(a, b, cfg), x, w))


def test_cli_refuses_unknown_rungs(capsys):
    from benchmarks.stream_probe import main

    with pytest.raises(SystemExit) as e:
        main(["--dry-run", "--rungs", "sum,fast"])
    assert e.value.code == 2 and "--rungs" in capsys.readouterr().err
