"""GGUF writer and QArray reader: files read back by gguf-py with the same tensors and metadata, by our loaders
with identical logits; real K-quant blocks; corrupt files."""

from __future__ import annotations

import dataclasses
import os
import struct

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.formats.gguf_blocks import GGUFScheme, decode_rows
from jaxquant.formats.gguf_reader import (
    check_gguf_file,
    load_gguf_quantized,
    load_gguf_quantized_model,
    read_gguf_tensors,
)
from jaxquant.formats.gguf_writer import tokenizer_metadata, write_gguf, write_gguf_model
from jaxquant.formats.inspect import inspect_path
from jaxquant.formats.specs import apply_recipe
from jaxquant.models import (
    Llama,
    convert_rope_style,
    forward,
    load_gguf,
    load_gguf_model,
    model_params,
    with_params,
)

TOKENS = jnp.array([[1, 5, 9, 2, 33, 17, 8, 60, 4, 4, 12, 0]], jnp.int32)


def _logits(model, tokens=TOKENS):
    return np.asarray(forward(model, tokens))


@pytest.fixture(scope="module")
def tiny_q4_k_m(tiny_config, tiny_params, tmp_path_factory):
    """(model, quantized params, path of the GGUF written from them)."""
    model = Llama.from_params(tiny_config, tiny_params)
    qp = apply_recipe("q4_k_m", model)
    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_k_m.gguf"
    write_gguf_model(path, model, qp, name="tiny", recipe="q4_k_m")
    return model, qp, path


def test_written_file_reads_back_in_gguf_py(tiny_q4_k_m, tiny_config):
    _, qp, path = tiny_q4_k_m
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "llama" and f["general.name"] == "tiny"
    assert f["general.file_type"] == 15 and f["general.quantization_version"] == 2
    assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == 256
    assert f["llama.feed_forward_length"] == 512 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 64
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied
    assert len(tensors) == 2 * 9 + 2
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == "Q6_K" and list(t.shape) == [512, 256]
    q = qp["layers"][1]["mlp"]["down_proj"]["kernel"]
    assert np.array_equal(np.asarray(t.data), np.asarray(q.data))
    assert tensors["token_embd.weight"].tensor_type.name == "Q6_K"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_K"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    # K-quant blocks written by us: gguf-py's dequantization == ours, bit for bit
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        tt = tensors[name]
        ref = gguf.quants.dequantize(tt.data, tt.tensor_type)
        ours = np.asarray(decode_rows(jnp.asarray(np.asarray(tt.data)), tt.tensor_type.name))
        assert np.array_equal(ref.view(np.uint32), ours.view(np.uint32))


def test_loaders_give_identical_logits(tiny_q4_k_m, tiny_config):
    model, qp, path = tiny_q4_k_m
    want = _logits(with_params(model, qp))
    mq, tok = load_gguf_quantized_model(path)
    assert tok is None
    assert model_params(mq)["layers"][0]["attn"]["q_proj"]["kernel"].scheme == GGUFScheme("Q4_K")
    assert np.array_equal(_logits(mq), want)
    mf, _ = load_gguf_model(path)  # the float loader (gguf-py dequantization)
    assert np.array_equal(_logits(mf), want)
    tensors = read_gguf_tensors(path)
    assert isinstance(tensors["token_embd.weight"], jq.QArray) and tensors["output_norm.weight"].dtype == np.float32


def test_half_rope_model_written_in_gguf_layout(tiny_config, tiny_params, tmp_path):
    """A model in the HF (half-split) q/k layout is written with llama.cpp's row order: same logits."""
    cfg_h, params_h = convert_rope_style(tiny_params, tiny_config, "half")
    model_h = Llama.from_params(cfg_h, params_h)
    qp = apply_recipe("q8_0", model_h)
    want = _logits(with_params(model_h, qp))
    write_gguf(tmp_path / "h.gguf", cfg_h, qp)
    m, _ = load_gguf_quantized_model(tmp_path / "h.gguf")
    assert m.config.rope_style == "adjacent"
    np.testing.assert_allclose(_logits(m), want, rtol=0, atol=1e-5)
    write_gguf(tmp_path / "f.gguf", cfg_h, params_h, float_type="F32")
    mf, _ = load_gguf_model(tmp_path / "f.gguf")
    np.testing.assert_allclose(_logits(mf), _logits(model_h), rtol=0, atol=1e-5)


def test_writer_errors(tiny_config, tiny_params, tmp_path):
    model = Llama.from_params(tiny_config, tiny_params)
    p = model_params(model)
    p["layers"][0]["attn"]["q_proj"]["kernel"] = jq.quantize(p["layers"][0]["attn"]["q_proj"]["kernel"], jq.NF4Scheme())
    with pytest.raises(ValueError, match=r"NF4Scheme.*has no GGUF encoding"):
        write_gguf(tmp_path / "x.gguf", tiny_config, p)
    assert not os.listdir(tmp_path)  # nothing half-written left behind
    with pytest.raises(ValueError, match="do not match the config"):
        write_gguf(tmp_path / "x.gguf", dataclasses.replace(tiny_config, n_layers=3), model_params(model))
    with pytest.raises(ValueError, match="float_type"):
        write_gguf(tmp_path / "x.gguf", tiny_config, model_params(model), float_type="Q8")


def _corrupt(path, tmp_path, name, fn):
    data = bytearray(open(path, "rb").read())
    fn(data)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out


def test_corrupt_files(tiny_q4_k_m, tmp_path):
    _, _, path = tiny_q4_k_m
    size = os.path.getsize(path)
    cases = {
        "magic.gguf": (lambda d: d.__setitem__(slice(0, 4), b"GGML"), "not a GGUF file"),
        "version.gguf": (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 99)), "unsupported GGUF version"),
        "ntensors.gguf": (lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 2**62)), "cannot fit"),
        "nkv.gguf": (lambda d: d.__setitem__(slice(16, 24), struct.pack("<Q", 10**15)), "cannot fit"),
        "header.gguf": (lambda d: d.__delitem__(slice(20, None)), "truncated"),
        "data.gguf": (lambda d: d.__delitem__(slice(size - 1000, None)), "truncated|corrupt"),
        "meta.gguf": (lambda d: d.__delitem__(slice(200, None)), "corrupt|truncated"),
    }
    for name, (fn, msg) in cases.items():
        bad = _corrupt(path, tmp_path, name, fn)
        for reader in (load_gguf_quantized, inspect_path):
            with pytest.raises(ValueError, match=msg):
                reader(bad)
    # a tensor offset pointing far beyond the file: patch the first tensor info's offset field
    r = gguf.GGUFReader(path)
    t0 = r.tensors[0]
    off_field_pos = int(t0.field.offset) + sum(int(p.nbytes) for p in t0.field.parts[:-1])
    bad = _corrupt(
        path,
        tmp_path,
        "offset.gguf",
        lambda d: d.__setitem__(slice(off_field_pos, off_field_pos + 8), struct.pack("<Q", 2**50)),
    )
    with pytest.raises(ValueError, match=r"truncated|beyond|corrupt"):
        load_gguf_quantized(bad)
    with pytest.raises(FileNotFoundError):
        check_gguf_file(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_smollm2_round_trip_byte_identical(gguf_path, smollm_float, tmp_path):
    """SmolLM2 read as QArrays (no dequantization) and written back: identical tensor bytes and metadata;
    the QArray model's logits equal the float loader's exactly; the file written from it too."""
    mq, tok = load_gguf_quantized_model(gguf_path)
    out = tmp_path / "rt.gguf"
    write_gguf_model(out, mq, source=gguf_path, recipe="q4_1")
    r0, r1 = gguf.GGUFReader(gguf_path), gguf.GGUFReader(out)
    t0 = {t.name: t for t in r0.tensors}
    t1 = {t.name: t for t in r1.tensors}
    assert set(t0) == set(t1)
    for k in t0:
        assert t0[k].tensor_type == t1[k].tensor_type, k
        assert np.array_equal(np.asarray(t0[k].data), np.asarray(t1[k].data)), k
    f0 = {k: f.contents() for k, f in r0.fields.items() if not k.startswith("GGUF.")}
    f1 = {k: f.contents() for k, f in r1.fields.items() if not k.startswith("GGUF.")}
    assert f0 == f1
    assert os.path.getsize(out) == os.path.getsize(gguf_path)
    ids = jnp.array([tok.encode("The capital of France is Paris, and the capital of Germany is")])
    config, params, _ = smollm_float  # the float loader's reading of the original file
    want = np.asarray(forward(Llama.from_params(config, params), ids))
    assert np.array_equal(np.asarray(forward(mq, ids)), want)
    m2, tok2 = load_gguf_model(out)
    assert np.array_equal(np.asarray(forward(m2, ids)), want)
    text = "Hello world 12345 <|im_start|>user\nCafé naïve"
    assert tok2.encode(text) == tok.encode(text)


@pytest.mark.slow
def test_smollm2_tokenizer_rebuilt_from_vocab(smollm_float, tmp_path, tiny_config, make_params):
    """Without a source GGUF, the tokenizer is written from its own vocabulary/merges and reads back equal."""
    _, _, tok = smollm_float
    meta = tokenizer_metadata(tok)
    assert meta["pre"] == "smollm" and len(meta["tokens"]) == 49152 and meta["token_types"].count(3) > 0
    cfg = dataclasses.replace(tiny_config, vocab_size=49152, dim=64, n_heads=2, n_kv_heads=1, hidden_dim=64)
    write_gguf(tmp_path / "tok.gguf", cfg, make_params(cfg), tokenizer=tok, name="tok")
    _, _, tok2 = load_gguf(tmp_path / "tok.gguf")
    for text in ("Hello world 12345", "<|im_start|>user\nCafé naïve\t  x<|im_end|>", "  spaces   and\n\nlines"):
        assert tok2.encode(text) == tok.encode(text)
    assert (tok2.bos_id, tok2.eos_id, tok2.add_bos) == (tok.bos_id, tok.eos_id, tok.add_bos)
