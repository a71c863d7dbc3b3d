"""GGUF block formats against gguf-py (the reference implementation of llama.cpp's numpy quantizers):
bytes of Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/TQ1_0/TQ2_0 quantization, dequantization of every type, the real
SmolLM2 Q4_1 tensors re-quantized to their original bytes, K-quant quality."""

from __future__ import annotations

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import jaxquant as jq
from jaxquant.formats._kquants import nearest_int
from jaxquant.formats.gguf_blocks import GGUF_TYPES, KQUANT_TYPES, GGUFScheme, decode_rows, encode_rows

# inputs near the fp16 range overflow the fp16 block scales (inf, as in llama.cpp): gguf-py warns about it
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SIMPLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0")
ALL = tuple(GGUF_TYPES)


_ENC = {q: jax.jit(functools.partial(encode_rows, qtype=q)) for q in GGUF_TYPES}
_DEC = {q: jax.jit(functools.partial(decode_rows, qtype=q)) for q in GGUF_TYPES}


def _encode(rows: np.ndarray, qtype: str) -> np.ndarray:
    return np.asarray(_ENC[qtype](jnp.asarray(rows)))


def _decode(data: np.ndarray, qtype: str) -> np.ndarray:
    return np.asarray(_DEC[qtype](jnp.asarray(data)))


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float32).view(np.uint32), b.view(np.uint32))


def _inputs(seed: int, rows: int, n: int) -> np.ndarray:
    """Rows of several kinds: gaussian at many scales, uniform, heavy-tailed, zero and constant blocks, values
    on coarse grids (many exact ties), huge and tiny magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * np.exp(rng.uniform(-12, 4, (rows, 1)))
    x[1::7] = rng.uniform(-1, 1, (len(x[1::7]), n))
    x[2::7] = rng.standard_t(2, (len(x[2::7]), n))
    x[3::7, :32] = 0.0
    x[4::7, 32:64] = 1.5
    x[5::7] = np.round(rng.standard_normal((len(x[5::7]), n)) * 8) / 16  # many ties on the quantization grids
    x[6::7] = rng.standard_normal((len(x[6::7]), n)) * 6e4  # near the fp16 range
    return x.astype(np.float32)


def test_type_table_matches_gguf():
    from gguf.constants import GGML_QUANT_SIZES

    for name, t in GGUF_TYPES.items():
        assert int(T[name]) == t.ggml_type
        assert GGML_QUANT_SIZES[T[name]] == (t.block_size, t.type_size)


@pytest.mark.parametrize("qtype", SIMPLE)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_bytes_equal_gguf_py(qtype, seed):
    x = _inputs(seed, 70, 1024)
    ours = _encode(x, qtype)
    ref = gguf.quants.quantize(x, T[qtype])
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{qtype}: {bad.size} rows differ, first {bad[:5]}"


@pytest.mark.parametrize("qtype", SIMPLE)
def test_scheme_kernel_layout_jit_vmap(qtype):
    """A (K, N) kernel's GGUF rows are its columns; eager (compiled), jit and vmap give the same bytes."""
    x = _inputs(7, 48, 512).T  # kernel (512, 48)
    s = GGUFScheme(qtype)
    q = jq.quantize(jnp.asarray(x), s)
    assert np.array_equal(np.asarray(q.data), gguf.quants.quantize(np.ascontiguousarray(x.T), T[qtype]))
    assert q.nbytes == s.storage_bytes(x.shape)
    assert q.bits_per_weight == pytest.approx(GGUF_TYPES[qtype].bits_per_weight)
    qj = jax.jit(lambda w: jq.quantize(w, s))(jnp.asarray(x))
    qv = jax.vmap(lambda w: jq.quantize(w, s))(jnp.stack([jnp.asarray(x), jnp.asarray(x[:, ::-1])]))
    assert np.array_equal(np.asarray(qj.data), np.asarray(q.data))
    assert np.array_equal(np.asarray(qv.data[0]), np.asarray(q.data))
    w = jq.dequantize(q)
    assert w.shape == x.shape and w.dtype == jnp.float32
    assert _bit_equal(np.asarray(w).T, gguf.quants.dequantize(np.asarray(q.data), T[qtype]))


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_random_bytes_equals_gguf_py(qtype):
    """Arbitrary block bytes (every bit of every field exercised): dequantization equals gguf-py's."""
    t = GGUF_TYPES[qtype]
    rng = np.random.default_rng(int(t.ggml_type))
    data = rng.integers(0, 256, (16, 4 * t.type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(data, T[qtype])
    ours = _decode(data, qtype)
    fin = np.isfinite(ref)  # compare values where finite (NaN payloads may differ), and where they are NaN/Inf
    assert np.array_equal(np.isfinite(ours), fin)
    assert _bit_equal(ours[fin], ref[fin])


@pytest.mark.parametrize("qtype", sorted(KQUANT_TYPES))
def test_kquant_roundtrip_dequant_matches_gguf_py(qtype):
    x = _inputs(3, 35, 1024)
    data = _encode(x, qtype)
    assert data.shape == (35, 1024 // 256 * GGUF_TYPES[qtype].type_size)
    assert _bit_equal(_decode(data, qtype), gguf.quants.dequantize(data, T[qtype]))


# Two real (perturbed) SmolLM2 blocks where x*id + 8.5 (Q4_0) / + 16.5 (Q5_0) lands exactly on a rounding tie:
# with the product fused into the addition (XLA:CPU's multiply-add contraction) one code comes out one lower.
_TIE_BLOCKS = {
    "Q4_0": [
        0x3D8AB688,
        0xBEA026EE,
        0x3E377EF3,
        0x3D828AE4,
        0x3CDE8A04,
        0x3E32EA42,
        0xBE01028E,
        0x3D13E898,
        0x3E378721,
        0xBDEDB24C,
        0xBE17E493,
        0xBDA7E5D8,
        0xBE06F58F,
        0x3E0509F8,
        0xBE53C779,
        0xBDB1C4AA,
        0xBDEAF13F,
        0x3DE90A1E,
        0xBE382270,
        0xBCC62A12,
        0x3E81E7B2,
        0xBE23C01C,
        0x3E60A288,
        0xBB8D70AD,
        0x3E1544AF,
        0x3E16E6F9,
        0xBE00DD78,
        0x3E06897C,
        0x3E89BA84,
        0xBDEA3774,
        0x3E3D8E8A,
        0xBEA322CA,
    ],
    "Q5_0": [
        0x3EB7CC5B,
        0x3E45E74D,
        0xBC8DA6A1,
        0x3D980756,
        0x3DC00331,
        0x3E9B634F,
        0x3E57B1C0,
        0x3CECAEC6,
        0x3E97D15E,
        0xBCE0728C,
        0x3E881ABA,
        0xBEEABCA0,
        0x3E1F0226,
        0xBE4069C8,
        0x3E2161AC,
        0x3D0AC45A,
        0xBE456A7A,
        0x3EB5A975,
        0xBDBF6501,
        0xBE9E852F,
        0x3CF816DC,
        0x3D277E03,
        0xBD84AEF6,
        0x3D043EF4,
        0xBDCD5796,
        0x3D88BF8A,
        0xBDB3A117,
        0x3E10877A,
        0xBDB207AA,
        0xBD0673F2,
        0x3DADF7A7,
        0x3E0C1953,
    ],
}


@pytest.mark.parametrize("qtype", sorted(_TIE_BLOCKS))
def test_no_fused_multiply_add_at_ties(qtype):
    x = np.array(_TIE_BLOCKS[qtype], np.uint32).view(np.float32)[None, :]
    assert np.array_equal(_encode(x, qtype), gguf.quants.quantize(x, T[qtype]))
    qv = jax.vmap(lambda r: encode_rows(r, qtype))(jnp.asarray(x)[None])
    assert np.array_equal(np.asarray(qv[0]), gguf.quants.quantize(x, T[qtype]))


def test_nearest_int_is_round_half_even():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, -7.5, 4194303.0, 1e-9], np.float32)
    assert np.array_equal(nearest_int(v), np.rint(v).astype(np.int32))


# llama.cpp's own acceptance test (tests/test-quantize-fns.cpp): x_i = 0.1 + 2 cos(i), 4096 values,
# error = sqrt(sum (x - x_hat)^2) / n must stay below these bounds for the reference quantizers.
_LLAMA_CPP_BOUNDS = {
    "Q8_0": 0.002,
    "Q4_0": 0.002,
    "Q4_1": 0.002,
    "Q5_0": 0.002,
    "Q5_1": 0.002,
    "Q2_K": 0.0075,
    "Q3_K": 0.0040,
    "Q4_K": 0.002,
    "Q5_K": 0.002,
    "Q6_K": 0.002,
    "TQ1_0": 0.01,
    "TQ2_0": 0.01,
}


@pytest.mark.parametrize("qtype", ALL)
def test_llama_cpp_quantize_fns_error_bounds(qtype):
    i = np.arange(4096, dtype=np.float32)
    x = (0.1 + 2 * np.cos(i)).astype(np.float32)[None, :]
    err = np.sqrt(np.sum((_decode(_encode(x, qtype), qtype) - x).astype(np.float64) ** 2)) / x.size
    assert err < _LLAMA_CPP_BOUNDS[qtype]


def test_kquant_search_beats_plain_grids():
    """The K-quant searches do better than their own starting grids would (the search is really running):
    Q4_K's error is below Q4_1's (same 4-bit codes, min/max grid), Q5_K below Q5_1's, Q6_K far below Q5_1's."""
    x = np.random.default_rng(5).standard_normal((10, 2048)).astype(np.float32)

    def rmse(qt):
        return float(np.sqrt(np.mean((_decode(_encode(x, qt), qt) - x) ** 2)))

    assert rmse("Q4_K") < rmse("Q4_1")
    assert rmse("Q5_K") < rmse("Q5_1")
    assert rmse("Q6_K") < 0.6 * rmse("Q5_1")
    assert rmse("Q3_K") < rmse("Q4_0") * 2.2
    assert rmse("Q2_K") < rmse("Q3_K") * 2.5


def test_scheme_validation():
    with pytest.raises(ValueError, match="qtype must be one of"):
        GGUFScheme("Q7_K")
    with pytest.raises(ValueError, match="not a multiple of the 256-element block"):
        jq.quantize(jnp.ones((576, 64)), GGUFScheme("Q4_K"))
    with pytest.raises(ValueError, match="2-D"):
        jq.quantize(jnp.ones((64,)), GGUFScheme("Q8_0"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        jq.quantize(jnp.full((64, 2), jnp.nan), GGUFScheme("Q8_0"))
    with pytest.raises(ValueError, match="expected"):
        GGUFScheme("Q8_0").from_bytes(np.zeros((2, 33), np.uint8), (64, 2))
    assert GGUFScheme("q4_k") == GGUFScheme("Q4_K") and hash(GGUFScheme("q4_k")) == hash(GGUFScheme("Q4_K"))
    emb = jq.quantize(jnp.ones((10, 64)), GGUFScheme("Q8_0", transpose=False))
    assert emb.data.shape == (10, 68)


@pytest.mark.slow
def test_smollm2_q4_1_requantizes_to_original_bytes(smollm_reader):
    """Every Q4_1 tensor of the real SmolLM2 GGUF, dequantized and re-quantized, gives back its exact bytes."""
    n = 0
    for t in smollm_reader.tensors:
        if t.tensor_type != T.Q4_1:
            continue
        rows = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(_encode(rows, "Q4_1"), np.asarray(t.data)), t.name
        n += 1
    assert n == 210


@pytest.mark.slow
@pytest.mark.parametrize("qtype", SIMPLE)
def test_real_weights_quantize_like_gguf_py(smollm_reader, qtype):
    """Real weights (float values of several SmolLM2 tensors of each shape): identical bytes."""
    names = {"blk.3.attn_q.weight", "blk.7.attn_k.weight", "blk.11.ffn_up.weight", "blk.29.ffn_down.weight"}
    for t in smollm_reader.tensors:
        if t.name not in names:
            continue
        rows = gguf.quants.dequantize(t.data, t.tensor_type)
        if rows.shape[1] % GGUF_TYPES[qtype].block_size:
            continue
        # perturb off the Q4_1 grid so that the inputs are not trivially representable
        rows = rows + np.random.default_rng(0).standard_normal(rows.shape).astype(np.float32) * rows.std() / 20
        assert np.array_equal(_encode(rows, qtype), gguf.quants.quantize(rows, T[qtype])), (t.name, qtype)


@pytest.mark.slow
def test_real_weights_kquant(smollm_reader):
    """Real ffn_down weights (rows of 1536 = 6 super-blocks): K-quant blocks decode in jnp exactly as in gguf-py,
    and each K-quant's error sits where it should between the neighbouring plain formats."""
    t = next(t for t in smollm_reader.tensors if t.name == "blk.10.ffn_down.weight")
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    x = x + np.random.default_rng(1).standard_normal(x.shape).astype(np.float32) * x.std() / 20  # off the Q4_1 grid
    rel = {}
    for q in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_1", "Q8_0"):
        data = _encode(x, q)
        d = gguf.quants.dequantize(data, T[q])
        if q in KQUANT_TYPES:
            assert _bit_equal(_decode(data, q), d), q
        rel[q] = float(np.sqrt(np.mean((d - x) ** 2)) / x.std())
    assert rel["Q3_K"] < rel["Q2_K"] < 2.5 * rel["Q3_K"] and rel["Q4_0"] < rel["Q3_K"] < 2.5 * rel["Q4_0"], rel
    assert rel["Q4_K"] < rel["Q4_1"] < rel["Q4_0"], rel
    assert rel["Q5_K"] < rel["Q5_1"], rel
    assert rel["Q8_0"] < rel["Q6_K"] < rel["Q5_K"], rel
