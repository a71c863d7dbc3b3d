"""Streaming quantization of sharded safetensors checkpoints (jaxquant.io.streaming)."""

import json
import os

import jax
import numpy as np
import pytest

from jaxquant.algorithms.gptq import gptq_model
from jaxquant.core.qarray import QArray
from jaxquant.io.streaming import (
    HFSource,
    _gptq_config,
    is_streamed,
    load_streamed,
    load_streamed_params,
    peak_rss_bytes,
    reset_peak_rss,
    stream_quantize,
    synthetic_checkpoint,
)
from jaxquant.models import Llama, LlamaConfig, flat_params, forward, load_hf
from jaxquant.specs import parse_spec
from jaxquant.transform import quantize_params

CFG = LlamaConfig(vocab_size=256, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream") / "src"
    nbytes = synthetic_checkpoint(d, CFG, max_shard_bytes=200_000)
    assert nbytes > 0
    return d


def _assert_same_bits(got, ref):
    fg, fr = flat_params(got), flat_params(ref)
    assert fg.keys() == fr.keys()
    for k in fr:
        a, b = fg[k], fr[k]
        assert isinstance(a, QArray) == isinstance(b, QArray), k
        if isinstance(a, QArray):
            assert (a.scheme, a.shape, a.dtype) == (b.scheme, b.shape, b.dtype), k
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb), k
        for x, y in zip(la, lb):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def test_synthetic_checkpoint_is_sharded_and_loads(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    config, params, tok = load_hf(src)
    assert config.replace(rope_style="half") == config and config.n_layers == 3
    assert np.asarray(params["layers"][2]["mlp"]["down_proj"]["kernel"]).shape == (256, 128)
    s = HFSource(src)
    blk = s.block(1)
    np.testing.assert_array_equal(blk["attn/q_proj/kernel"], params["layers"][1]["attn"]["q_proj"]["kernel"])
    assert s.file_bytes > 0 and tok is None


@pytest.mark.parametrize("spec", ["int4-g128", "nf4", "fp8-e4m3", "int4-g64-asym"])
def test_stream_rtn_equals_in_memory_bit_for_bit(src, tmp_path, spec):
    res = stream_quantize(src, tmp_path / "out", spec, progress=False)
    assert res.n_quantized == 7 * CFG.n_layers and res.method == "rules" and len(res.layer_seconds) == 3
    assert is_streamed(res.path) and res.peak_rss_bytes > 0
    got, meta = load_streamed_params(res.path)
    assert meta["spec"] == spec and meta["streamed"]
    _, params, _ = load_hf(src)
    _assert_same_bits(got, quantize_params(params, list(parse_spec(spec).rules), strict=True))
    # one file per block plus the head
    assert len(os.listdir(res.path / "shards")) == CFG.n_layers + 1


def test_streamed_model_loads_and_runs(src, tmp_path):
    stream_quantize(src, tmp_path / "out", "int4-g128", progress=False)
    model, tok, meta = load_streamed(tmp_path / "out")
    assert tok is None and meta["spec"] == "int4-g128"
    _, params, _ = load_hf(src)
    ref = Llama.from_params(CFG, quantize_params(params, list(parse_spec("int4-g128").rules)))
    toks = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(forward(model, toks)), np.asarray(forward(ref, toks)))


def test_stream_gptq_equals_gptq_model_bit_for_bit(src, tmp_path):
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, 4000)
    opts = {"calib_samples": 4, "calib_seq_len": 32}
    res = stream_quantize(src, tmp_path / "out", "gptq-int4-g64", calib_tokens=toks, options=opts, progress=False)
    assert res.method == "gptq" and res.n_quantized == 7 * CFG.n_layers
    got, _ = load_streamed_params(res.path)
    _, p, _ = load_hf(src)
    ref, _ = gptq_model(Llama.from_params(CFG, p), toks, _gptq_config("gptq-int4-g64", opts), progress=False)
    _assert_same_bits(got, ref)


def test_stream_errors_and_atomicity(src, tmp_path):
    with pytest.raises(ValueError, match="cannot be streamed"):
        stream_quantize(src, tmp_path / "o", "awq-int4-g128", calib_tokens=np.arange(100), progress=False)
    with pytest.raises(ValueError, match="calibration tokens"):
        stream_quantize(src, tmp_path / "o", "gptq-int4-g128", progress=False)
    with pytest.raises(ValueError, match="quantizes nothing"):
        stream_quantize(src, tmp_path / "o", "fp32", progress=False)
    with pytest.raises(ValueError, match="matched no"):
        stream_quantize(src, tmp_path / "o", [(r"nothing/.*", None)], progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o.tmp")]  # temporary folder removed
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        stream_quantize(src, tmp_path / "busy", "int8", progress=False)
    # an existing streamed output is replaced
    stream_quantize(src, tmp_path / "o", "int8", progress=False)
    stream_quantize(src, tmp_path / "o", "nf4", progress=False)
    assert load_streamed_params(tmp_path / "o")[1]["spec"] == "nf4"


def test_peak_rss_reset():
    big = np.ones(64 << 20, np.uint8)  # 64 MiB touched
    before = peak_rss_bytes()
    del big
    if reset_peak_rss():
        assert peak_rss_bytes() < before
    assert peak_rss_bytes() > 0


def test_gptq_options_follow_the_spec():
    from jaxquant.algorithms.specs import GPTQ_DEFAULTS

    c = _gptq_config("gptq-int4-g64-asym", {"calib_samples": 4, "batch_size": 2, "clip_search": True})
    assert (c.n_samples, c.batch_size, c.clip_search) == (4, 2, True)
    assert c.scheme.group_size == 64 and not c.scheme.symmetric
    assert c.first_token_weight == GPTQ_DEFAULTS["first_token_weight"]
    with pytest.raises(ValueError, match="batch_size"):
        _gptq_config("gptq-int4-g128", {"batch_size": 0})
    with pytest.raises(ValueError, match="do not apply"):
        _gptq_config("gptq-int4-g128", {"alpha": 0.5})
