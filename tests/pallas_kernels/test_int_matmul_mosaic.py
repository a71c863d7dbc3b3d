"""The Mosaic GPU kernels for K-major integer codes (GEMV and tensor-core dot): interpreter numerics, refusals, qdot
dispatch, CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_helpers import rel_err

import jaxquant as jq
from jaxquant.ops import explain_qdot, kernel_mode
from pallas_kernels import int_matmul_mosaic as mosaic
from pallas_kernels import tuning
from pallas_kernels._common import BlockConfig
from pallas_kernels.int4_matmul import IntLayout, int_matmul, int_matmul_reference, supported

# one output rounding, relative (norm)
BOUND = {jnp.bfloat16: 4e-3, jnp.float16: 1e-3}

# (bits, group_size, K, N, split_k, steps in flight, x dtype, symmetric)
CASES = [
    (4, 128, 512, 128, 2, 2, jnp.bfloat16, True),
    (4, 256, 1024, 64, 2, 3, jnp.float16, True),  # two K steps per scale row
    (8, None, 512, 128, 1, 2, jnp.bfloat16, True),  # int8 per channel: one scale row for all steps
    (8, 128, 256, 192, 2, 4, jnp.float16, True),
    (4, 128, 512, 128, 2, 2, jnp.bfloat16, False),  # zero points (GPTQ / AWQ's int4)
    (8, None, 256, 64, 1, 2, jnp.float16, False),
]


def _cfg(split: int, stages: int) -> BlockConfig:
    return BlockConfig(1, 64, 128, split_k=split, num_warps=4, num_stages=stages, variant=mosaic.GEMV)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}g{c[1]}k{c[2]}n{c[3]}s{c[4]}{'sym' if c[7] else 'zp'}")
def test_mosaic_gemv_matches_float64_in_the_interpreter(case):
    """``x @ dequantize(w)`` for K-major codes (symmetric or with zero points): within one output rounding of float64
    (the weights are not rounded to the activation dtype, as in ``+postscale``), and of the XLA path."""
    bits, group, k, n, split, stages, dt, sym = case
    rng = np.random.default_rng(bits + k + n)
    w = jnp.asarray(rng.standard_normal((k, n)) + (0 if sym else 0.7), jnp.float32)
    q = jq.quantize(w, jq.IntScheme(bits, group, symmetric=sym, layout="nk"))
    layout = IntLayout(bits=bits, mode="sym" if sym else "zeropoint", k=k, n=n, group_size=group, nk=True)
    zero = None if sym else q.zero
    x = jnp.asarray(rng.standard_normal((1, k)), dt)
    cfg = _cfg(split, stages)
    assert supported(layout, cfg, dt, 1) is None
    y = int_matmul(x, q.data, q.scale, zero, layout=layout, config=cfg, interpret=True)
    assert y.shape == (1, n) and y.dtype == dt
    want = np.asarray(x, np.float64) @ np.asarray(jq.dequantize(q), np.float64)
    assert rel_err(y, want) <= BOUND[dt]
    assert rel_err(y, int_matmul_reference(x, q.data, q.scale, zero, layout)) <= 2 * BOUND[dt]


# (bits, group_size, M, block_m, K, N, split_k, steps in flight, x dtype, symmetric)
DOT_CASES = [
    (4, 128, 1, 16, 512, 128, 2, 2, jnp.bfloat16, True),
    (4, 128, 16, 16, 512, 192, 1, 3, jnp.float16, True),
    (4, 256, 33, 64, 1024, 64, 2, 2, jnp.bfloat16, True),  # two K steps per scale row
    (8, None, 7, 32, 512, 128, 2, 2, jnp.bfloat16, True),
    (8, 128, 20, 32, 256, 128, 1, 2, jnp.float16, True),
    (4, 128, 9, 16, 512, 64, 2, 2, jnp.bfloat16, False),  # zero points
]


@pytest.mark.parametrize(
    "case", DOT_CASES, ids=lambda c: f"b{c[0]}g{c[1]}m{c[2]}bm{c[3]}k{c[4]}n{c[5]}s{c[6]}{'sym' if c[9] else 'zp'}"
)
def test_mosaic_dot_is_the_xla_path_up_to_summation_order(case):
    """The transposed tensor-core product (``y^T = W^T x^T``, weights dequantized and rounded as the XLA path rounds
    them, rows padded to ``block_m``): the XLA path's result up to float32 summation order, and within one output
    rounding of float64 ``x @ round(dequantize(w))``."""
    bits, group, m, bm, k, n, split, stages, dt, sym = case
    rng = np.random.default_rng(bits + m + k + n)
    w = jnp.asarray(rng.standard_normal((k, n)) + (0 if sym else 0.7), jnp.float32)
    q = jq.quantize(w, jq.IntScheme(bits, group, symmetric=sym, layout="nk"))
    layout = IntLayout(bits=bits, mode="sym" if sym else "zeropoint", k=k, n=n, group_size=group, nk=True)
    zero = None if sym else q.zero
    x = jnp.asarray(rng.standard_normal((m, k)), dt)
    cfg = BlockConfig(bm, 64, 128, split_k=split, num_warps=4, num_stages=stages, variant=mosaic.DOT)
    assert supported(layout, cfg, dt, m) is None
    y = int_matmul(x, q.data, q.scale, zero, layout=layout, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dt
    assert rel_err(y, int_matmul_reference(x, q.data, q.scale, zero, layout)) <= 1e-4
    w64 = np.asarray(jnp.asarray(jq.dequantize(q), jnp.float32).astype(dt), np.float64)
    assert rel_err(y, np.asarray(x, np.float64) @ w64) <= BOUND[dt]


def test_mosaic_gemv_subtracts_the_offset_of_unsigned_codes():
    """Unsigned 8-bit codes (offset 128) and 4-bit codes with another offset (here 1, as ternary codes are read) give
    the reference's weights, exactly: one-hot activation rows pick single weights."""
    rng = np.random.default_rng(5)
    for bits, dtype, offset in ((8, jnp.uint8, None), (4, jnp.uint8, 1)):
        k, n = 256, 64
        layout = IntLayout(bits=bits, mode="sym", k=k, n=n, group_size=128, offset=offset, nk=True)
        packed = jnp.asarray(rng.integers(0, 256, (n, k * bits // 8)), dtype)
        scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // 128, n)), jnp.float32).astype(jnp.bfloat16)
        want = np.asarray(int_matmul_reference(jnp.eye(k, dtype=jnp.bfloat16), packed, scale, None, layout), np.float32)
        for row in (0, 1, 130, 255):
            x = jnp.zeros((1, k), jnp.bfloat16).at[0, row].set(1.0)
            got = int_matmul(x, packed, scale, None, layout=layout, config=_cfg(1, 2), interpret=True)
            np.testing.assert_array_equal(np.asarray(got, np.float32)[0], want[row])


def test_mosaic_gemv_refuses_what_it_cannot_run():
    lay = IntLayout(bits=4, mode="sym", k=512, n=128, group_size=128, nk=True)
    ok = _cfg(2, 2)
    assert supported(lay, ok, jnp.bfloat16, 1) is None
    reasons = {
        "kn storage": supported(IntLayout(bits=4, mode="sym", k=512, n=128, group_size=128), ok, jnp.bfloat16, 1),
        "minmax": supported(IntLayout(4, "minmax", 512, 128, 128, nk=True), ok, jnp.bfloat16, 1),
        "2 bits": supported(IntLayout(2, "sym", 512, 128, 128, nk=True), ok, jnp.bfloat16, 1),
        "float32 x": supported(lay, ok, jnp.float32, 1),
        "two rows": supported(lay, ok, jnp.bfloat16, 2),
        "block_n": supported(lay, BlockConfig(1, 32, 128, 2, 4, 2, mosaic.GEMV), jnp.bfloat16, 1),
        "step bytes": supported(lay, BlockConfig(1, 64, 512, 1, 4, 2, mosaic.GEMV), jnp.bfloat16, 1),
        "ragged N": supported(IntLayout(4, "sym", 512, 96, 128, nk=True), ok, jnp.bfloat16, 1),
        "K split": supported(lay, BlockConfig(1, 64, 128, 8, 4, 2, mosaic.GEMV), jnp.bfloat16, 1),
        "group": supported(IntLayout(4, "sym", 512, 128, 64, nk=True), ok, jnp.bfloat16, 1),
    }
    dot = BlockConfig(16, 64, 128, 2, 4, 2, mosaic.DOT)
    assert supported(lay, dot, jnp.bfloat16, 16) is None
    reasons["dot rows"] = supported(lay, dot, jnp.bfloat16, 17)
    reasons["dot block_m"] = supported(lay, BlockConfig(8, 64, 128, 2, 4, 2, mosaic.DOT), jnp.bfloat16, 1)
    for what, why in reasons.items():
        assert why and "mosaic-" in why, what
    x = jnp.ones((2, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match="one activation row"):
        int_matmul(x, jnp.zeros((128, 256), jnp.uint8), jnp.ones((4, 128)), None, layout=lay, config=ok, interpret=True)


def test_qdot_runs_mosaic_table_rows_within_their_rows(monkeypatch):
    """A device table with the Mosaic GEMV for M <= 1 and the Mosaic dot for M <= 16: ``qdot`` runs the GEMV at
    M = 1 (the same result as calling the kernel), the dot at M = 2, and the next row above 16 rows."""
    monkeypatch.setattr(tuning, "device_key", lambda kind=None: "mosaic-probe")
    rows = [
        (1, _cfg(2, 2)),
        (16, BlockConfig(16, 64, 128, 2, 4, 2, mosaic.DOT)),
        (1 << 62, BlockConfig(16, 64, 128, 2, 4, 3, "split")),
    ]
    monkeypatch.setitem(tuning.TABLE, "mosaic-probe", {"int4_nk": rows})
    w = jax.random.normal(jax.random.PRNGKey(0), (512, 128), jnp.float32)
    q = jq.quantize(w, jq.IntScheme(4, 128, layout="nk"))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 512), jnp.float32).astype(jnp.bfloat16)
    x20 = jnp.tile(x, (10, 1))
    with kernel_mode("interpret"):
        assert mosaic.GEMV in explain_qdot(x[:1], q)
        assert mosaic.DOT in explain_qdot(x, q)
        assert "'split'" in explain_qdot(x20, q)  # 20 rows: above the dot row's 16
        y1 = jq.qdot(x[:1], q)
    layout = IntLayout(bits=4, mode="sym", k=512, n=128, group_size=128, nk=True)
    direct = int_matmul(x[:1], q.data, q.scale, None, layout=layout, config=_cfg(2, 2), interpret=True)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(direct))


@pytest.mark.parametrize("bits,mode", [(4, "sym"), (8, "sym"), (4, "zeropoint")])
def test_mosaic_kernels_lower_for_cuda(bits, mode):
    """At 8192^2 both kernels lower to the Mosaic GPU custom call for CUDA with their shared-memory tiling, register
    layouts and (the dot) wgmma's operand A in registers (the interpreter runs plain tiles; Mosaic compiles to machine
    code only on a GPU). Lowering checks what the interpreter does not: e.g. that every TMA copy moves a multiple of
    128 bytes (a uint8 zero-point row of 64 columns does not: the kernels take the zero points as float32)."""
    from jax import export

    k = n = 8192
    layout = IntLayout(bits=bits, mode=mode, k=k, n=n, group_size=128, nk=True)
    packed = jax.ShapeDtypeStruct((n, k * bits // 8), jnp.uint8 if bits == 4 else jnp.int8)
    scale = jax.ShapeDtypeStruct((k // 128, n), jnp.float16)
    zero = jax.ShapeDtypeStruct((k // 128, n), jnp.uint8) if mode == "zeropoint" else None
    dots = [BlockConfig(bm, 64, 128, 4, 4, 4, mosaic.DOT) for bm in mosaic.DOT_ROWS]
    for cfg in (_cfg(4, 4), _cfg(8, 6), *dots):
        x = jax.ShapeDtypeStruct((cfg.block_m, k), jnp.bfloat16)
        fn = jax.jit(lambda x, p, s, z, cfg=cfg: int_matmul(x, p, s, z, layout=layout, config=cfg))
        exp = export.export(
            fn, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")]
        )(x, packed, scale, zero)
        text = exp.mlir_module()
        assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" not in text
