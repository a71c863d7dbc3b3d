"""``benchmarks/stream_probe.py``: its Pallas loop sums what it reads (interpret mode), and bad tiles are refused."""

from __future__ import annotations

import functools

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


@pytest.mark.parametrize(
    ("form", "nibbles"), [("kn", False), ("kn", True), ("nk", False), ("nk", True), ("words", False)]
)
def test_stream_dot_is_the_product_with_the_bytes(form, nibbles):
    """The pipelined rungs: ``x @ B`` (or the two nibbles' products) in float32 per K split, for the bytes as stored,
    K-major, or as words whose output columns :func:`word_columns` maps back (vs float64 NumPy)."""
    from benchmarks.stream_probe import stream_dot, word_columns

    b = jax.random.randint(jax.random.PRNGKey(0), (64, 128), 0, 256).astype(jnp.uint8)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 128), jnp.float32).astype(jnp.bfloat16)
    x64, b64 = np.asarray(x, np.float64), np.asarray(b, np.int64)
    if nibbles:
        want = x64[:, :64] @ (b64 & 15) + x64[:, 64:] @ (b64 >> 4)
    else:
        x, want = x[:, :64], x64[:, :64] @ b64
    w = {"kn": b, "nk": b.T, "words": jax.lax.bitcast_convert_type(b.reshape(64, 32, 4), jnp.uint32)}[form]
    if form == "words":
        want = want[:, word_columns(128, 64)]
    cfg = BlockConfig(block_m=16, block_n=64, block_k=16, split_k=2)
    got = np.asarray(stream_dot(x, w, cfg, form, nibbles, interpret=True), np.float64)
    assert got.shape == (32, 128)
    np.testing.assert_allclose(got.reshape(2, 16, 128).sum(axis=0), want, rtol=1e-6, atol=1e-3)


def test_stream_dot_refuses_bad_input():
    from benchmarks.stream_probe import stream_dot

    b = jnp.zeros((64, 128), jnp.uint8)
    x = jnp.zeros((16, 64), jnp.bfloat16)
    cfg = BlockConfig(block_m=16, block_n=64, block_k=16, split_k=2)
    with pytest.raises(ValueError, match="does not divide"):
        stream_dot(x, b, BlockConfig(block_m=16, block_n=256, block_k=16, split_k=2), interpret=True)
    with pytest.raises(ValueError, match="uint8"):
        stream_dot(x, b.astype(jnp.int32), cfg, interpret=True)
    with pytest.raises(ValueError, match="form must be"):
        stream_dot(x, b, cfg, "mn", interpret=True)
    with pytest.raises(ValueError, match="byte forms only"):
        stream_dot(x, jnp.zeros((64, 32), jnp.uint32), cfg, "words", True, interpret=True)
    with pytest.raises(ValueError, match="does not match"):
        stream_dot(x, b, cfg, "kn", True, interpret=True)  # nibbles need 2 * 64 activation columns


def test_word_columns_is_a_permutation_within_each_tile():
    from benchmarks.stream_probe import word_columns

    cols = word_columns(256, 128)
    assert sorted(cols.tolist()) == list(range(256))
    assert cols[:4].tolist() == [0, 4, 8, 12] and cols[32] == 1  # byte 0 of words 0..; then byte 1 of word 0
    assert set(cols[128:].tolist()) == set(range(128, 256))  # the second tile's own columns


@requires_triton
def test_stream_dot_lowers_and_compiles_for_sm90():
    """The rungs must run on the GPU when it comes: CUDA lowering and an sm_90 cubin for every form."""
    from benchmarks.stream_probe import DOT_CASES, stream_dot

    seen = set()
    for form, nibbles, bn, bk, split, warps, stages in DOT_CASES:
        if (form, nibbles) in seen:
            continue
        seen.add((form, nibbles))
        shape = {"kn": (512, 1024), "nk": (1024, 512), "words": (512, 256)}[form]
        w = jax.ShapeDtypeStruct(shape, jnp.uint32 if form == "words" else jnp.uint8)
        x = jax.ShapeDtypeStruct((16, 1024 if nibbles else 512), jnp.bfloat16)
        cfg = BlockConfig(16, bn, bk, split_k=split, num_warps=warps, num_stages=stages)
        fn = functools.partial(stream_dot, cfg=cfg, form=form, nibbles=nibbles)
        assert_compiles(cuda_lowering(fn, x, w))
    assert len(seen) == 5


def test_cli_refuses_unknown_rungs(capsys):
    from benchmarks.stream_probe import main

    with pytest.raises(SystemExit) as e:
        main(["--dry-run", "--rungs", "sum,fast"])
    assert e.value.code == 2 and "--rungs" in capsys.readouterr().err


@requires_triton
def test_sass_table_reads_the_weight_tile_as_the_layout_says(monkeypatch):
    """The static profile of two rungs (compiled for sm_90 on the CPU): the (K, N) byte tile is read from shared
    memory byte by byte (LDS.U8); the K-major copy of the same tile is not (ldmatrix)."""
    import benchmarks.stream_probe as sp

    monkeypatch.setattr(sp, "DOT_CASES", [("kn", False, 64, 64, 4, 4, 4), ("nk", False, 64, 64, 4, 4, 4)])
    head, rule, kn, nk = sp.sass_table(1024, 1024).splitlines()
    assert head.count("|") == rule.count("|") == kn.count("|") == nk.count("|")
    assert kn.startswith("| kn |") and "LDS.U8" in kn
    assert nk.startswith("| nk |") and "LDS.U8" not in nk and "LDSM" in nk


def test_out_file_holds_every_printed_line(tmp_path, capsys):
    from benchmarks.stream_probe import main

    out = tmp_path / "ladder.md"
    assert main(["--dry-run", "--rungs", "int4", "--out", str(out)]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    text = out.read_text()
    assert text.startswith("# Pallas-Triton streaming ladder on ") and "- commit: " in text and "--rungs int4" in text
    assert all(ln in text for ln in printed) and sum("int4 kernel M=" in ln for ln in printed) == 4


@pytest.mark.parametrize("nk", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_xla_s4_rung_is_the_dequantized_product(nk, groups):
    """The ``xla`` rungs' formulation: the IntScheme(4) bytes as ``jnp.int4`` values ``c - 8`` (K-major with ``nk``),
    times group (or channel) scales, then the dot: the XLA reference's result, within bf16 output rounding of
    float64."""
    import jaxquant as jq
    from benchmarks.stream_probe import to_int4, xla_s4_matmul

    w = jax.random.normal(jax.random.PRNGKey(0), (256, 64), jnp.float32)
    q = jq.quantize(w, jq.IntScheme(4, 256 // groups, scale_dtype="bfloat16"))
    v = to_int4(q.data, nk)
    assert v.dtype == jnp.int4 and v.shape == ((64, 256) if nk else (256, 64))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 256), jnp.float32).astype(jnp.bfloat16)
    got = np.asarray(xla_s4_matmul(x, v, q.scale.reshape(groups, 64), nk), np.float64)
    wd64 = np.asarray(jq.dequantize(q), np.float64)
    want = np.asarray(x, np.float64) @ wd64
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 4e-3
    with pytest.raises(ValueError, match="do not fit"):
        xla_s4_matmul(x, v, jnp.ones((3, 64), jnp.bfloat16), nk)  # 3 groups do not divide K = 256
    with pytest.raises(ValueError, match="2-D uint8"):
        to_int4(q.data.astype(jnp.int32))


def test_xla_rungs_print_every_form(capsys):
    from benchmarks.stream_probe import main

    assert main(["--dry-run", "--rungs", "xla"]) == 0
    out = capsys.readouterr().out
    assert out.count("xla bf16 dot M=") == 2 and out.count("xla s4 ") == 8
    assert "FAILED" not in out and "WRONG" not in out


def test_mosaic_rungs_run_every_case(capsys):
    """The ``mosaic`` rungs (the library's Mosaic GPU GEMV on the probe's bytes, in its interpreter here): every case
    runs and agrees with the XLA path."""
    from benchmarks.stream_probe import MOSAIC_CASES, main

    assert main(["--dry-run", "--rungs", "mosaic"]) == 0
    out = capsys.readouterr().out
    assert out.count("mosaic gemv nk ") + out.count("mosaic dot M=16 nk ") == len(MOSAIC_CASES)
    assert "FAILED" not in out and "WRONG" not in out
