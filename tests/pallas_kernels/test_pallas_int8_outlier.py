"""LLM.int8 outlier-split kernel: interpret numerics, dispatch, lowering, cubin."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_helpers import assert_compiles, cuda_lowering, rel_err, requires_triton, shape_struct

import jaxquant as jq
from pallas_kernels._common import BlockConfig
from pallas_kernels.int8_outlier_matmul import int8_outlier_matmul, outlier_indices, prepass, quantize_activations


def np_llm_int8(x, wq, sw, threshold):
    """Float64 NumPy LLM.int8: exact int product of the regular part + float64 product of the outlier dims."""
    x = np.asarray(x, np.float64)
    out = np.abs(x).max(axis=0) > threshold if threshold is not None else np.zeros(x.shape[1], bool)
    xr = np.where(out[None, :], 0.0, x)
    sx = np.abs(xr).max(axis=1, keepdims=True) / 127.0
    sx = np.where(sx > 0, sx, 1.0)
    xq = np.clip(np.round(xr / sx), -127, 127)
    w = np.asarray(wq, np.float64)
    sw = np.asarray(sw, np.float64)
    return (xq @ w) * sx * sw[None, :] + np.where(out[None, :], x, 0.0) @ (w * sw[None, :])


@pytest.mark.parametrize(
    "m,k,n,threshold,bk,split,variant,layout",
    [
        (1, 256, 96, 6.0, 64, 1, "", "kn"),
        (19, 200, 80, 6.0, 128, 1, "", "kn"),
        (4, 128, 64, None, 64, 1, "", "kn"),
        (1, 512, 96, 6.0, 64, 4, "", "kn"),  # split-K: outliers added once (split 0), partial sums added by XLA
        (19, 300, 80, 6.0, 64, 3, "", "kn"),  # ragged K with split-K
        (19, 300, 80, 6.0, 64, 1, "kmajor", "kn"),  # (N, K) weight copy: ragged M, N and K
        (33, 256, 96, None, 64, 2, "kmajor", "kn"),
        (19, 300, 80, 6.0, 64, 3, "", "nk"),  # weight stored (N, K): ragged M, N, K, split-K, outliers gathered along K
        (1, 256, 96, 6.0, 64, 1, "", "nk"),
        (33, 256, 96, None, 64, 2, "kmajor", "nk"),
    ],
)
def test_interpret_matches_float64(m, k, n, threshold, bk, split, variant, layout):
    rng = np.random.default_rng(m + k)
    scheme = jq.LLMInt8Scheme(threshold=threshold, layout=layout)
    q = jq.quantize(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), scheme)
    xn = rng.standard_normal((m, k)).astype(np.float32)
    xn[:, rng.choice(k, 21, replace=False)] *= 25.0  # more outlier dims than one 16-wide chunk
    x = jnp.asarray(xn)
    xq, sx, is_out = quantize_activations(x, threshold)
    idx, count = outlier_indices(is_out)
    y = int8_outlier_matmul(
        x,
        xq,
        sx,
        idx,
        count,
        q.data,
        q.scale,
        config=BlockConfig(16, 32, bk, split_k=split, variant=variant),
        outliers=threshold is not None,
        w_layout=layout,
        interpret=True,
    )
    wq = q.data.T if layout == "nk" else q.data
    assert rel_err(y, np_llm_int8(xn, wq, q.scale, threshold)) < 2e-3  # rare 1-code differences in x_q


@pytest.mark.parametrize("variant,m", [("", 7), ("kmajor", 40), ("prepass", 3)])
def test_kmajor_storage_gives_the_same_result_bit_for_bit(variant, m):
    """``LLMInt8Scheme(layout="nk")`` (codes stored ``(N, K)``) through ``qdot``'s kernel: the same output as the
    ``(K, N)`` storage, bit for bit (the int8 sums are exact; the outlier terms are the same products in the same
    order), and as the XLA path of either layout."""
    from pallas_kernels import tuning

    rng = np.random.default_rng(m)
    w = jnp.asarray(rng.standard_normal((320, 72)), jnp.float32)
    xn = rng.standard_normal((m, 320)).astype(np.float32)
    xn[:, [5, 77, 200]] *= 30.0
    x = jnp.asarray(xn, jnp.bfloat16)
    q_kn = jq.quantize(w, jq.LLMInt8Scheme())
    q_nk = jq.relayout(q_kn, "nk")
    assert q_nk.data.shape == (72, 320) and q_nk.scheme == jq.LLMInt8Scheme(layout="nk")
    table = tuning.TABLE.setdefault(tuning.device_key(), {})
    saved = table.get("int8_outlier")
    table["int8_outlier"] = [(1 << 62, BlockConfig(16, 32, 64, split_k=2, variant=variant))]
    try:
        jax.clear_caches()
        with jq.ops.kernel_mode("interpret"):
            assert jq.ops.explain_qdot(x, q_nk).startswith("kernel: int8_outlier")
            assert ("relayout" in jq.ops.explain_qdot(x, q_kn)) == (variant == "kmajor")  # the per-call copy is named
            assert "relayout" not in jq.ops.explain_qdot(x, q_nk)
            y_nk, y_kn = jq.qdot(x, q_nk), jq.qdot(x, q_kn)
    finally:
        if saved is None:
            del table["int8_outlier"]
        else:
            table["int8_outlier"] = saved
        jax.clear_caches()
    with jq.ops.kernel_mode("off"):
        y0_nk, y0_kn = jq.qdot(x, q_nk), jq.qdot(x, q_kn)
    np.testing.assert_array_equal(np.asarray(y_nk), np.asarray(y_kn))
    np.testing.assert_array_equal(np.asarray(y0_nk), np.asarray(y0_kn))
    assert rel_err(y_nk, y0_kn) <= 4e-3
    xq, sx, is_out = quantize_activations(x, 6.0)
    idx, count = outlier_indices(is_out)
    args = (x, xq, sx, idx, count, q_kn.data, q_kn.scale)
    with pytest.raises(ValueError, match="w_layout"):
        int8_outlier_matmul(*args, config=BlockConfig(16, 32, 64), w_layout="km", interpret=True)
    with pytest.raises(ValueError, match="shapes disagree"):  # a (K, N) weight passed as (N, K)
        int8_outlier_matmul(*args, config=BlockConfig(16, 32, 64), w_layout="nk", interpret=True)


def test_dispatch_equals_scheme_xla_path():
    rng = np.random.default_rng(2)
    q = jq.quantize(jnp.asarray(rng.standard_normal((256, 64)), jnp.float32), jq.LLMInt8Scheme())
    xn = rng.standard_normal((2, 5, 256))
    xn[..., [3, 99]] *= 30.0
    x = jnp.asarray(xn, jnp.bfloat16)
    with jq.ops.kernel_mode("interpret"):
        assert jq.ops.explain_qdot(x, q).startswith("kernel: int8_outlier")
        y = jax.jit(jq.qdot)(x, q)
    with jq.ops.kernel_mode("off"):
        y0 = jax.jit(jq.qdot)(x, q)
    assert rel_err(y, y0) <= 4e-3
    q2 = jq.quantize(jnp.ones((256, 64)), jq.LLMInt8Scheme(outlier_rows=(3,)))
    with jq.ops.kernel_mode("interpret"):
        assert jq.ops.explain_qdot(x, q2).startswith("xla:")


def _kernel_args(m, k, n):
    """Shapes of ``int8_outlier_matmul``'s operands: x, x_q, s_x, idx, count, W_q, s_w."""
    return [
        shape_struct((m, k), jnp.bfloat16),
        shape_struct((m, k), jnp.int8),
        shape_struct((m,), jnp.float32),
        shape_struct((k,), jnp.int32),
        shape_struct((1,), jnp.int32),
        shape_struct((k, n), jnp.int8),
        shape_struct((n,), jnp.float32),
    ]


def _lower(outliers, m, k=512, n=256, split=1):
    cfg = BlockConfig(min(m, 128), 64, 128, split_k=split)
    return cuda_lowering(functools.partial(int8_outlier_matmul, config=cfg, outliers=outliers), *_kernel_args(m, k, n))


@pytest.mark.parametrize("outliers,m", [(True, 16), (False, 128)])
def test_lowers_to_triton_custom_call(outliers, m):
    assert _lower(outliers, m)[0].name == "int8_outlier_matmul"


@requires_triton
@pytest.mark.parametrize("split", [1, 4])
def test_compiles_to_cubin_sm90_sm80(split):
    assert_compiles(_lower(True, 16, split=split), archs=(90, 80))


@requires_triton
def test_kmajor_int8_loop_has_no_byte_transposes_sm90():
    """The int8 ``wgmma`` reads K-major operands from shared memory: from the ``(K, N)`` weight Triton transposes
    each tile byte by byte (``STS.U8``) and waits for the loaded registers in the same trip; from the ``(N, K)``
    copy (``"kmajor"``) the K loop is the pipelined copies and the ``IGMMA`` alone."""
    from pallas_kernels import _triton_tools as tt
    from pallas_kernels.tuning import heuristic

    args = _kernel_args(512, 8192, 1024)  # a long K loop (short constant loops are unrolled)

    def profile(variant):
        cfg = BlockConfig(128, 256, 64, num_warps=8, num_stages=3, variant=variant)
        call = cuda_lowering(functools.partial(int8_outlier_matmul, config=cfg, outliers=False), *args)[0]
        return tt.loop_profile(tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages))

    kn, nk = profile(""), profile("kmajor")
    assert kn.count("IGMMA") > 0 and nk.count("IGMMA") > 0
    assert kn.count("STS") > 0 and nk.count("STS") == 0 and nk.exposed_loads == 0
    assert nk.instructions <= 0.6 * kn.instructions, (nk.instructions, kn.instructions)
    assert heuristic("int8_outlier", 4096, 8192, 8192, sms=132).variant == "kmajor"
    assert heuristic("int8_outlier", 16, 8192, 8192, sms=132).variant == ""


@requires_triton
def test_kmajor_storage_small_m_reads_whole_tiles_sm90():
    """At M <= 16 (``mma.sync``, int8 ``IMMA``) a ``(K, N)`` weight tile is read from shared memory byte by byte
    (``LDS.U8``, then ``PRMT`` to assemble the K-major fragments); stored ``(N, K)`` it is read by ``ldmatrix``
    (``LDSM``) without any byte load: measured on the sm_90 machine code of the table's 16x64x128 split-4 tile at
    K = N = 8192 (one trip of the K loop or, where Triton unrolled it, the kernel per trip)."""
    from pallas_kernels import _triton_tools as tt

    cfg = BlockConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=4)

    def profile(layout):
        args = _kernel_args(16, 8192, 8192)
        if layout == "nk":
            args[5] = shape_struct((8192, 8192), jnp.int8)
        fn = functools.partial(int8_outlier_matmul, config=cfg, outliers=False, w_layout=layout)
        call = cuda_lowering(fn, *args)[0]
        sass = tt.sass(tt.ir_text(call.ir), 90, call.num_warps, call.num_stages)
        return tt.k_loop_profile(sass, trips=8192 // (128 * 4), mma=("IMMA", "IGMMA"))

    kn, nk = profile("kn"), profile("nk")
    assert kn.count("IMMA") == nk.count("IMMA") > 0
    assert kn.count("LDS.U8") >= 32 and nk.count("LDS.U8") == 0 and nk.count("LDSM") > 0
    assert nk.instructions <= 0.5 * kn.instructions, (nk.instructions, kn.instructions)


# ---------------------------------------------------------------------------------------------------------------
# the activation split in one Pallas launch (small M)
# ---------------------------------------------------------------------------------------------------------------
def _xla_split(x, threshold, per_row):
    from jaxquant.schemes.llm_int8 import _absmax_int8

    xf = x.astype(jnp.float32)
    if threshold is None:
        is_out, x_r = jnp.zeros((x.shape[1],), bool), xf
    else:
        is_out = jnp.max(jnp.abs(xf), axis=0) > threshold
        x_r = xf - jnp.where(is_out[None, :], xf, 0.0)
    xq, sx = _absmax_int8(x_r, axis=1 if per_row else None)
    idx, count = outlier_indices(is_out)
    return xq, jnp.broadcast_to(sx.reshape(-1), (x.shape[0],)), idx, count


@pytest.mark.parametrize(
    "m,k,threshold,per_row,dt",
    [
        (1, 1000, 6.0, True, jnp.bfloat16),  # ragged K (two 512 chunks)
        (5, 2048, 6.0, True, jnp.float16),  # rows padded to 8
        (16, 512, None, True, jnp.float32),  # no split: plain int8 quantization
        (3, 700, 6.0, False, jnp.float32),  # one scale for the whole tensor
        (2, 256, 1e6, True, jnp.bfloat16),  # no outlier at all
    ],
)
def test_prepass_is_the_xla_split_bit_for_bit(m, k, threshold, per_row, dt):
    """``prepass`` (one program) returns the XLA path's ``x_q`` and ``s_x`` and the compacted outlier dims, with an
    all-zero row, exact ties (``x_r / s_x`` = 2.5, -0.5) and outliers in several chunks."""
    rng = np.random.default_rng(m * k)
    xn = rng.standard_normal((m, k)).astype(np.float32) * 2
    xn[:, rng.choice(k, 37, replace=False)] *= 20
    xn[0, :3] = [5.5, 2.5 * 5.5 / 127, -0.5 * 5.5 / 127]
    if m > 2:
        xn[2] = 0.0
    x = jnp.asarray(xn, dt)
    xq, sx, idx, count = prepass(x, threshold, per_row, interpret=True)
    xq0, sx0, idx0, count0 = _xla_split(x, threshold, per_row)
    np.testing.assert_array_equal(np.asarray(xq), np.asarray(xq0))
    np.testing.assert_array_equal(np.asarray(sx), np.asarray(sx0))
    c = int(count[0])
    assert c == int(count0[0]) and (c > 0) == (threshold is not None and threshold < 100)
    np.testing.assert_array_equal(np.asarray(idx[:c]), np.asarray(idx0[:c]))


def test_prepass_feeds_the_kernel_through_qdot(monkeypatch):
    """With an ``int8_outlier`` table row of variant ``"prepass"``, ``qdot`` runs the one-launch split and the same
    kernel: the result equals the XLA-split kernel's bit for bit."""
    from pallas_kernels import tuning

    rng = np.random.default_rng(3)
    q = jq.quantize(jnp.asarray(rng.standard_normal((384, 96)), jnp.float32), jq.LLMInt8Scheme())
    xn = rng.standard_normal((3, 384))
    xn[:, [5, 200, 383]] *= 40.0
    x = jnp.asarray(xn, jnp.bfloat16)
    dev = tuning.device_key()
    out = {}
    for variant in ("", "prepass"):
        cfg = BlockConfig(16, 32, 128, split_k=2, variant=variant)
        monkeypatch.setitem(tuning.TABLE, dev, {"int8_outlier": [(1 << 62, cfg)]})
        jax.clear_caches()
        with jq.ops.kernel_mode("interpret"):
            jaxpr = str(jax.make_jaxpr(jq.qdot)(x, q))
            out[variant] = np.asarray(jax.jit(jq.qdot)(x, q), np.float32)
        assert ("llm_int8_prepass" in jaxpr) == (variant == "prepass")
    np.testing.assert_array_equal(out["prepass"], out[""])


def test_prepass_rejects_large_m_and_bad_blocks():
    from pallas_kernels.int8_outlier_matmul import PREPASS_MAX_M

    with pytest.raises(ValueError, match="outside"):
        prepass(jnp.ones((PREPASS_MAX_M + 1, 64)), 6.0)
    with pytest.raises(ValueError, match="block_k"):
        prepass(jnp.ones((2, 64)), 6.0, block_k=48)
    with pytest.raises(ValueError, match="M, K"):
        prepass(jnp.ones((64,)), 6.0)
    with pytest.raises(ValueError, match="threshold"):
        prepass(jnp.ones((2, 64)), 0.0)


@requires_triton
def test_prepass_lowers_and_compiles_sm90_sm80():
    from pallas_kernels import _triton_tools as tt
    from pallas_kernels._ptx import DIV_RN_ASM, RINT_ASM

    calls = cuda_lowering(functools.partial(prepass, threshold=6.0), shape_struct((4, 8192), jnp.bfloat16))
    assert [c.name for c in calls] == ["llm_int8_prepass"]
    text = tt.ir_text(calls[0].ir)
    assert DIV_RN_ASM.split()[0] in text and RINT_ASM.split()[0] in text
    assert_compiles(calls, archs=(90, 80))
