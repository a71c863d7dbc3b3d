"""HF GPTQ (v1) and AWQ (GEMM) tensors and checkpoint folders: bit-exact round trips, dequantization equal to
an independent torch implementation of the loaders' unpacking, act-order g_idx, errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxquant as jq
from jaxquant.formats._hf_common import check_safetensors, pack_words, unpack_words
from jaxquant.formats.hf_awq import from_awq, load_awq_checkpoint, save_awq_checkpoint, to_awq
from jaxquant.formats.hf_gptq import (
    GroupIndexScheme,
    from_gptq,
    load_gptq_checkpoint,
    save_gptq_checkpoint,
    to_gptq,
)
from jaxquant.formats.inspect import inspect_path
from jaxquant.models import Llama, forward, model_params, with_params

W = jax.random.normal(jax.random.key(0), (256, 96)) * 0.05


def _same_qarray(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return a.scheme == b.scheme and len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _torch_gptq_dequant(t: dict, bits: int) -> np.ndarray:
    """What a GPTQ v1 loader computes (AutoGPTQ's torch path: shifts over int32 words, zeros + 1), written
    independently with torch bit operations; K runs along qweight's rows."""
    qweight = torch.from_numpy(t["qweight"])
    qzeros = torch.from_numpy(t["qzeros"])
    scales = torch.from_numpy(t["scales"].astype(np.float32))
    g_idx = torch.from_numpy(t["g_idx"]).long()
    mask = (1 << bits) - 1
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    rows = []
    for i in range(k):  # bit stream: code i occupies bits [i*bits, (i+1)*bits)
        w, off = divmod(i * bits, 32)
        v = torch.bitwise_right_shift(qweight[w].to(torch.int64) & 0xFFFFFFFF, off)
        if off + bits > 32:
            v = v | torch.bitwise_left_shift(qweight[w + 1].to(torch.int64) & 0xFFFFFFFF, 32 - off)
        rows.append(v & mask)
    codes = torch.stack(rows)  # (K, N)
    zrows = []
    for j in range(n):
        w, off = divmod(j * bits, 32)
        v = torch.bitwise_right_shift(qzeros[:, w].to(torch.int64) & 0xFFFFFFFF, off)
        if off + bits > 32:
            v = v | torch.bitwise_left_shift(qzeros[:, w + 1].to(torch.int64) & 0xFFFFFFFF, 32 - off)
        zrows.append((v & mask) + 1)
    zeros = torch.stack(zrows, dim=1)  # (G, N)
    return (scales[g_idx] * (codes - zeros[g_idx]).float()).numpy()


def _torch_awq_dequant(t: dict, group_size: int) -> np.ndarray:
    """AutoAWQ's unpacking: shifts 0, 4, ..., 28 then the reverse order [0, 4, 1, 5, 2, 6, 3, 7]."""
    rev = [0, 4, 1, 5, 2, 6, 3, 7]
    shifts = torch.arange(0, 32, 4)

    def unpack(q):
        q = torch.from_numpy(q).to(torch.int64) & 0xFFFFFFFF
        v = (q[:, :, None] >> shifts[None, None, :]) & 0xF
        return v[:, :, rev].reshape(q.shape[0], -1)

    codes, zeros = unpack(t["qweight"]), unpack(t["qzeros"])
    scales = torch.from_numpy(t["scales"].astype(np.float32))
    g = torch.arange(codes.shape[0]) // group_size
    return (scales[g] * (codes - zeros[g]).float()).numpy()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 128, None])
def test_gptq_round_trip(bits, sym, group):
    q = jq.quantize(W, jq.IntScheme(bits=bits, group_size=group, symmetric=sym))
    t = to_gptq(q)
    k, n = q.shape
    assert t["qweight"].shape == (k * bits // 32, n) and t["qweight"].dtype == np.int32
    assert t["scales"].dtype == np.float16 and t["g_idx"].dtype == np.int32
    q2 = from_gptq(t, bits=bits, group_size=group or -1, sym=sym)
    assert _same_qarray(q, q2)
    want = np.asarray(jq.dequantize(q))
    assert np.array_equal(_torch_gptq_dequant(t, bits), want)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, None])
def test_awq_round_trip(sym, group):
    q = jq.quantize(W, jq.IntScheme(bits=4, group_size=group, symmetric=sym))
    t = to_awq(q)
    assert t["qweight"].shape == (256, 12) and t["qzeros"].shape == (256 // (group or 256), 12)
    q2 = from_awq(t, group_size=group or -1, sym=sym)
    assert _same_qarray(q, q2)
    assert np.array_equal(_torch_awq_dequant(t, group or 256), np.asarray(jq.dequantize(q)))


def test_act_order_g_idx():
    """An act-order checkpoint (groups formed in a permuted input order) imports as GroupIndexScheme, dequantizes
    through g_idx like the torch reference, and exports back to the same tensors."""
    rng = np.random.default_rng(0)
    k, n, g, bits = 256, 64, 32, 4
    perm = rng.permutation(k)
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = np.arange(k) // g
    t = {
        "qweight": pack_words(rng.integers(0, 16, (k, n)), bits),
        "qzeros": np.ascontiguousarray(pack_words(rng.integers(0, 15, (k // g, n)).T, bits).T),
        "scales": (rng.uniform(0.001, 0.01, (k // g, n))).astype(np.float16),
        "g_idx": g_idx,
    }
    q = from_gptq(t, bits=bits, group_size=g)
    assert isinstance(q.scheme, GroupIndexScheme)
    assert np.array_equal(np.asarray(jq.dequantize(q)), _torch_gptq_dequant(t, bits))
    t2 = to_gptq(q)
    for key in t:
        assert np.array_equal(t2[key], t[key]), key
    with pytest.raises(ValueError, match="act-order"):
        to_awq(q)
    with pytest.raises(ValueError, match="import"):
        jq.quantize(W, GroupIndexScheme())


def test_word_packing_inverse():
    rng = np.random.default_rng(1)
    for bits in (2, 3, 4, 5, 8):
        codes = rng.integers(0, 1 << bits, (64, 7))
        assert np.array_equal(unpack_words(pack_words(codes, bits), bits), codes)
    with pytest.raises(ValueError, match="32-bit words"):
        pack_words(np.zeros((5, 2), np.int64), 3)


def test_tensor_errors():
    with pytest.raises(ValueError, match="zero point 0"):
        to_gptq(jq.quantize(jnp.abs(W) + 0.1, jq.IntScheme(bits=4, group_size=32, symmetric=False)))
    with pytest.raises(ValueError, match="float16"):
        to_gptq(jq.quantize(W, jq.IntScheme(bits=4, group_size=32, scale_dtype="bfloat16")))
    with pytest.raises(ValueError, match="minmax"):
        to_gptq(jq.quantize(W, jq.IntScheme(bits=4, group_size=32, symmetric=False, range="minmax")))
    with pytest.raises(ValueError, match="GPTQ supports"):
        to_gptq(jq.quantize(W, jq.IntScheme(bits=6, group_size=32)))
    with pytest.raises(ValueError, match="4-bit"):
        to_awq(jq.quantize(W, jq.IntScheme(bits=3, group_size=32)))
    with pytest.raises(ValueError, match="divide"):
        to_awq(jq.quantize(W[:192], jq.IntScheme(bits=4, group_size=128)))
    with pytest.raises(ValueError, match="IntScheme"):
        to_gptq(jq.quantize(W, jq.NF4Scheme()))
    with pytest.raises(ValueError, match="missing GPTQ tensor"):
        from_gptq({"qweight": np.zeros((4, 8), np.int32)}, bits=4, group_size=32)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_checkpoint_folders(fmt, tiny_config, tiny_params, tmp_path):
    """A GGUF-layout (adjacent RoPE) model exported as an HF folder (half layout) and loaded back: the same
    logits; re-exporting the loaded params gives identical files' tensors."""
    model = Llama.from_params(tiny_config, tiny_params)
    scheme = jq.IntScheme(bits=4, group_size=64, symmetric=False)
    qp = jq.quantize_params(model_params(model), [(r"layers/\d+/(attn|mlp)/\w+_proj/kernel", scheme)])
    tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
    want = np.asarray(forward(with_params(model, qp), tokens))
    save, load = (
        (save_gptq_checkpoint, load_gptq_checkpoint) if fmt == "gptq" else (save_awq_checkpoint, load_awq_checkpoint)
    )
    out = save(tmp_path / "ckpt", tiny_config, qp)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == fmt and cfg["quantization_config"]["group_size"] == 64
    config2, params2, tok = load(out)
    assert config2.rope_style == "half" and tok is None
    got = np.asarray(forward(Llama.from_params(config2, params2), tokens))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    save(tmp_path / "again", config2, params2)
    rep1, rep2 = inspect_path(out), inspect_path(tmp_path / "again")
    assert [(r.name, r.type, r.shape, r.nbytes) for r in rep1.rows] == [
        (r.name, r.type, r.shape, r.nbytes) for r in rep2.rows
    ]
    row = next(r for r in rep1.rows if r.name == "model.layers.0.mlp.down_proj.weight")
    assert row.type == f"{fmt.upper()} int4" and row.shape == (256, 512)
    assert 4.0 < row.bits_per_weight < 4.8
    if fmt == "gptq":
        assert json.load(open(os.path.join(out, "quantize_config.json")))["bits"] == 4


def test_checkpoint_errors(tiny_config, tiny_params, tmp_path):
    model = Llama.from_params(tiny_config, tiny_params)
    p = model_params(model)
    with pytest.raises(ValueError, match="must be quantized"):
        save_gptq_checkpoint(tmp_path / "a", tiny_config, p)
    mixed = jq.quantize_params(
        p,
        [
            (r"layers/0/.*_proj/kernel", jq.IntScheme(bits=4, group_size=64)),
            (r"layers/1/.*_proj/kernel", jq.IntScheme(bits=4, group_size=128)),
        ],
    )
    with pytest.raises(ValueError, match="one quantization config"):
        save_gptq_checkpoint(tmp_path / "b", tiny_config, mixed)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(FileNotFoundError):
        load_gptq_checkpoint(tmp_path / "nothing")


def test_safetensors_header_checks(tmp_path):
    from safetensors.numpy import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": np.zeros((4, 4), np.float32)}, str(good))
    assert "a" in check_safetensors(str(good))
    data = good.read_bytes()
    cases = {
        "short": data[:5],
        "hugeheader": (2**60).to_bytes(8, "little") + data[8:],
        "notjson": len(b"{nope").to_bytes(8, "little") + b"{nope",
        "truncated": data[:-10],
    }
    for name, raw in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(raw)
        with pytest.raises(ValueError):
            check_safetensors(str(p))
        with pytest.raises(ValueError):
            inspect_path(p)


def test_kmajor_qarrays_export_as_their_kn_storage():
    """GPTQ/AWQ tensors hold codes packed along K: a K-major QArray exports exactly as its (K, N) twin."""
    kn = jq.quantize(W, jq.IntScheme(bits=4, group_size=32, symmetric=False))
    nk = jq.quantize(W, jq.IntScheme(bits=4, group_size=32, symmetric=False, layout="nk"))
    for export in (to_gptq, to_awq):
        a, b = export(nk), export(kn)
        assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
