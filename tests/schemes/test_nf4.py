"""NF4 (QLoRA) blockwise quantization: bit-compatibility with bitsandbytes and the nearest-code property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.core.formats import NF4_CODE
from jaxquant.schemes.nf4 import DYNAMIC_CODE

torch = pytest.importorskip("torch")
bnbF = pytest.importorskip("bitsandbytes.functional")

# the 16 NF4 values as printed in the QLoRA paper / bitsandbytes' `get_4bit_type("nf4")` (float64 literals)
NF4_PAPER = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def _bnb_quantize(w: np.ndarray, double_quant: bool = False):
    """bitsandbytes on the torch orientation: (out, in) = our w.T."""
    t = torch.tensor(np.ascontiguousarray(w.T if w.ndim == 2 else w))
    return bnbF.quantize_4bit(t, quant_type="nf4", blocksize=64, compress_statistics=double_quant)


def _codes(q) -> np.ndarray:
    """Unpack QArray.data independently: two codes per byte, the even element in the high nibble."""
    d = np.asarray(q.data)
    return np.stack([d >> 4, d & 15], axis=1).reshape(-1)[: q.size]


SHAPES = [(128, 64), (100, 7), (33, 5), (3, 5), (129,)]  # 700, 165 (odd) and 15 (< one block) weights


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes(shape):
    w = (np.random.default_rng(sum(shape)).standard_normal(shape) * 0.05).astype(np.float32)
    packed, state = _bnb_quantize(w)
    q = jq.quantize(jnp.asarray(w), jq.NF4Scheme(block_size=64))
    assert q.data.dtype == jnp.uint8 and q.scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.data), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scale), state.absmax.numpy())
    ref = bnbF.dequantize_4bit(packed, state).numpy()
    ours = np.asarray(jq.dequantize(q))
    np.testing.assert_array_equal(ours, ref.T if w.ndim == 2 else ref)


def test_matches_bitsandbytes_on_decision_boundaries():
    """Values exactly on the code table and on the float32 midpoints (ties go to the lower code)."""
    mids = ((NF4_PAPER[1:] + NF4_PAPER[:-1]) / 2).astype(np.float32)
    vals = np.concatenate([NF4_CODE, mids, np.nextafter(mids, 2), np.nextafter(mids, -2)])  # 61 values
    blk = np.zeros(128, np.float32)
    blk[: len(vals)] = vals  # absmax 1 (NF4_CODE holds +-1) ...
    blk[64 : 64 + len(vals)] = vals * np.float32(0.5)  # ... and 0.5: x / absmax is exact in both blocks
    w = np.tile(blk, 3).reshape(3, -1).T  # (128, 3); torch orientation rows are the blocks
    packed, _ = _bnb_quantize(w)
    q = jq.quantize(jnp.asarray(w), jq.NF4Scheme())
    np.testing.assert_array_equal(np.asarray(q.data), packed.numpy().reshape(-1))
    # and the code of a value equal to a float32 midpoint is the lower one
    c = _codes(q)[: len(vals)]
    np.testing.assert_array_equal(c[16:31], np.arange(15))


@pytest.mark.parametrize("shape", [(256, 24), (100, 7), (33, 5)])
def test_double_quant_matches_bitsandbytes(shape):
    w = (np.random.default_rng(1).standard_normal(shape) * 0.05).astype(np.float32)
    packed, state = _bnb_quantize(w, double_quant=True)
    assert state.nested
    q = jq.quantize(jnp.asarray(w), jq.NF4Scheme(double_quant=True))
    np.testing.assert_array_equal(np.asarray(q.data), packed.numpy().reshape(-1))
    assert q.scale.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(q.scale), state.absmax.numpy())
    # the offset is a float32 mean: torch's summation order differs from XLA's, so it (and the second-level
    # absmax of absmax - offset) may differ in the last bits; the 8-bit codes above are identical
    np.testing.assert_allclose(np.asarray(q.aux["absmax_offset"]), state.offset.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.aux["absmax_scale"]), state.state2.absmax.numpy(), rtol=1e-6)
    ref = bnbF.dequantize_4bit(packed, state).numpy().T
    np.testing.assert_allclose(np.asarray(jq.dequantize(q)), ref, rtol=1e-6, atol=1e-12)


def test_dynamic_code_within_two_ulp_of_bitsandbytes():
    _, state = _bnb_quantize(np.ones((64, 4), np.float32), double_quant=True)
    ref = state.state2.code.numpy()
    assert ref.shape == DYNAMIC_CODE.shape == (256,)
    assert np.all(np.diff(DYNAMIC_CODE) > 0)
    # torch.linspace (float32, computed from both ends) vs np.linspace (float64 then rounded): the two tables
    # agree to 2 ulp (+-0.48671877 are 2 ulp apart, 20 other entries 1 ulp), never more
    np.testing.assert_array_max_ulp(DYNAMIC_CODE, ref, maxulp=2)
    assert DYNAMIC_CODE[0] == ref[0] and DYNAMIC_CODE[-1] == ref[-1] == 1.0
    assert 0.0 in DYNAMIC_CODE


def _reference_codes(flat: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Nearest NF4 value to x / absmax (float64 distances); a value equal to the float32-rounded midpoint of two
    neighbouring codes counts as a tie, and ties go to the lower code."""
    n = flat.shape[0]
    x = np.concatenate([flat, np.zeros((-n) % block, np.float32)]).reshape(-1, block)
    a = np.abs(x).max(axis=1)
    v = (x / np.where(a > 0, a, np.float32(1))[:, None]).reshape(-1)[:n]  # float32, correctly rounded
    code = NF4_PAPER.astype(np.float32).astype(np.float64)
    c = np.argmin(np.abs(v.astype(np.float64)[:, None] - code[None, :]), axis=1)  # first = lower on exact ties
    m32 = ((code[1:] + code[:-1]) / 2).astype(np.float32)
    at_mid = (c > 0) & (v == m32[np.maximum(c - 1, 0)])
    return np.where(at_mid, c - 1, c), a


@st.composite
def nf4_weights(draw):
    k, n = draw(st.sampled_from([(64, 2), (100, 3), (37, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mode = draw(st.sampled_from(["normal", "grid", "zeros"]))
    flat = rng.standard_normal(k * n).astype(np.float32)
    if mode == "grid":
        # x / absmax exactly on code values, float32 midpoints and their neighbours: absmax is a power of two
        mids = ((NF4_PAPER[1:] + NF4_PAPER[:-1]) / 2).astype(np.float32)
        pool = np.concatenate([NF4_CODE, mids, np.nextafter(mids, 2), np.nextafter(mids, -2)])
        scale = np.float32(2.0 ** draw(st.integers(-6, 3)))
        flat = (rng.choice(pool, size=k * n) * scale).astype(np.float32)
        flat[::64] = scale * rng.choice([-1, 1], size=flat[::64].shape)
    elif mode == "zeros":
        flat[64:128] = 0.0  # an all-zero block
    return flat.reshape(n, k).T.copy()  # blocks run along the input axis of each output column


@given(w=nf4_weights())
def test_codes_are_nearest_table_entry(w):
    q = jq.quantize(jnp.asarray(w), jq.NF4Scheme())
    ref_c, ref_a = _reference_codes(w.T.reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scale), ref_a)
    np.testing.assert_array_equal(_codes(q), ref_c)
    # dequantization is table value times absmax
    ref_w = (NF4_CODE[ref_c] * np.repeat(ref_a, 64)[: w.size]).reshape(w.shape[1], w.shape[0]).T
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), ref_w)


@given(w=nf4_weights())
def test_requantize_is_exact(w):
    s = jq.NF4Scheme()
    q = jq.quantize(jnp.asarray(w), s)
    q2 = jq.quantize(jq.dequantize(q), s)
    np.testing.assert_array_equal(np.asarray(q2.data), np.asarray(q.data))
    np.testing.assert_array_equal(np.asarray(q2.scale), np.asarray(q.scale))


@pytest.mark.parametrize("dq", [False, True])
def test_jit_equals_eager_and_vmap_equals_loop(dq):
    s = jq.NF4Scheme(double_quant=dq)
    ws = jax.random.normal(jax.random.key(3), (3, 200, 24)) * 0.05
    eager = [jq.quantize(w, s) for w in ws]
    jitted = jax.jit(jq.quantize, static_argnums=1)(ws[0], s)
    for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vm = jax.vmap(lambda w: jq.quantize(w, s))(ws)
    deq = jax.vmap(jq.dequantize)(vm)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(eager[i]), jax.tree.leaves(vm), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])
        np.testing.assert_array_equal(np.asarray(deq[i]), np.asarray(jq.dequantize(eager[i])))


def test_dtype_roundtrip_bf16():
    w = (jax.random.normal(jax.random.key(0), (64, 8)) * 0.05).astype(jnp.bfloat16)
    q = jq.quantize(w, jq.NF4Scheme())
    out = jq.dequantize(q)
    assert out.dtype == jnp.bfloat16 and out.shape == (64, 8)
    # quantizing bf16 is quantizing its exact float32 value
    q32 = jq.quantize(w.astype(jnp.float32), jq.NF4Scheme())
    np.testing.assert_array_equal(np.asarray(q.data), np.asarray(q32.data))


def test_bits_per_weight():
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    q = jax.eval_shape(lambda w: jq.quantize(w, jq.NF4Scheme()), w)
    assert q.bits_per_weight == 4.5  # 4 bits + one float32 absmax per 64
    qd = jax.eval_shape(lambda w: jq.quantize(w, jq.NF4Scheme(double_quant=True)), w)
    # 4 + 8/64 + 32/(64*256) (+ one float32 offset): QLoRA's 4.127
    assert qd.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert qd.bits_per_weight == pytest.approx(4.127, abs=1e-3)
    assert qd.nbytes == 4096 * 4096 // 2 + 4096 * 64 + 4 * 4096 * 64 // 256 + 4


def test_reciprocal_normalisation_like_bitsandbytes():
    # bitsandbytes normalises with x * (1/absmax); a correctly rounded x / absmax would pick the other code here
    a, x = np.float32(1.4554425), np.float32(0.05791228)  # x / a == midpoint, x * (1 / a) == midpoint + 1 ulp
    w = np.zeros((64, 1), np.float32)
    w[0, 0], w[1, 0] = a, x
    packed, _ = _bnb_quantize(w)
    q = jq.quantize(jnp.asarray(w), jq.NF4Scheme())
    np.testing.assert_array_equal(np.asarray(q.data), packed.numpy().reshape(-1))
