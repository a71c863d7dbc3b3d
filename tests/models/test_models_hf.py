"""HF safetensors checkpoints: tiny random round trips (single file, sharded, bf16) and clear errors."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxquant.models import (
    Llama,
    LlamaConfig,
    convert_rope_style,
    flat_params,
    load_hf,
    load_model,
    param_shapes,
    save_hf_checkpoint,
    unflatten_params,
)


def _cfg(**kw) -> LlamaConfig:
    base = dict(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, rope_theta=5e4)
    base.update(kw)
    return LlamaConfig(**base)


def _params(config: LlamaConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    flat = {}
    for k, s in param_shapes(config).items():
        base = 1.0 if k.endswith("scale") else 0.0
        flat[k] = (base + 0.2 * rng.standard_normal(s)).astype(np.float32)
    return unflatten_params(flat)


TOKENS = np.array([[3, 17, 52, 0, 9, 9, 41, 12]], np.int32)


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_single_file(tmp_path, tie: bool) -> None:
    c = _cfg(tie_embeddings=tie)
    p = _params(c)
    folder = save_hf_checkpoint(p, c, tmp_path / "ckpt")
    files = sorted(f.name for f in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is tie
    raw = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert raw["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 8, 32)  # (out, in)
    assert raw["model.layers.0.mlp.down_proj.weight"].shape == (32, 40)
    assert ("lm_head.weight" in raw) is (not tie)
    c2, p2, tok = load_hf(folder)
    assert tok is None
    assert c2 == c
    f1, f2 = flat_params(p), flat_params(p2)
    assert set(f1) == set(f2)
    for k in f1:
        np.testing.assert_array_equal(f1[k], f2[k])


def test_adjacent_model_is_unpermuted_on_save(tmp_path) -> None:
    c = _cfg(rope_style="half")
    p = _params(c, seed=1)
    ref = np.asarray(Llama.from_params(c, p)(TOKENS))
    ca, pa = convert_rope_style(p, c, "adjacent")
    save_hf_checkpoint(Llama.from_params(ca, pa), None, tmp_path / "ckpt")
    c2, p2, _ = load_hf(tmp_path / "ckpt")
    assert c2.rope_style == "half"
    np.testing.assert_array_equal(
        np.asarray(flat_params(p2)["layers/0/attn/q_proj/kernel"]),
        flat_params(p)["layers/0/attn/q_proj/kernel"],
    )
    np.testing.assert_array_equal(np.asarray(Llama.from_params(c2, p2)(TOKENS)), ref)


def test_sharded_and_bf16(tmp_path) -> None:
    c = _cfg()
    p = _params(c, seed=2)
    save_hf_checkpoint(p, c, tmp_path / "sharded", max_shard_bytes=20_000)
    names = sorted(f.name for f in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 2
    _, p2, _ = load_hf(tmp_path / "sharded")
    for k, v in flat_params(p).items():
        np.testing.assert_array_equal(flat_params(p2)[k], v)
    # re-saving unsharded into the same folder removes the stale shards and index
    save_hf_checkpoint(p, c, tmp_path / "sharded")
    assert sorted(f.name for f in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]

    save_hf_checkpoint(p, c, tmp_path / "bf16", dtype="bfloat16")
    raw = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert raw["model.norm.weight"].dtype == ml_dtypes.bfloat16
    _, p3, _ = load_hf(tmp_path / "bf16")
    for k, v in flat_params(p).items():
        got = flat_params(p3)[k]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, v.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_load_model_dispatch_and_tokenizer_folder(tmp_path) -> None:
    c = _cfg()
    save_hf_checkpoint(_params(c), c, tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    assert isinstance(model, Llama) and tok is None
    assert model(TOKENS).shape == (1, 8, c.vocab_size)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")


def _write_ckpt(folder, config_dict, tensors) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict))
    save_file(tensors, str(folder / "model.safetensors"))


def _good(tmp_path):
    c = _cfg()
    save_hf_checkpoint(_params(c), c, tmp_path / "good")
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "good" / "model.safetensors"))
    return cfg, tensors


def test_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hf(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        load_hf(tmp_path / "afile")

    cfg, tensors = _good(tmp_path)
    _write_ckpt(tmp_path / "mistral", {**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, tensors)
    with pytest.raises(ValueError, match="not a Llama model"):
        load_hf(tmp_path / "mistral")
    _write_ckpt(tmp_path / "scaled", {**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, tensors)
    with pytest.raises(ValueError, match="rope_scaling"):
        load_hf(tmp_path / "scaled")
    broken = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    _write_ckpt(tmp_path / "missing_w", cfg, broken)
    with pytest.raises(ValueError, match=r"missing weights.*layers/1/mlp/up_proj/kernel"):
        load_hf(tmp_path / "missing_w")
    wrong = dict(tensors)
    wrong["model.norm.weight"] = np.ones(7, np.float32)
    _write_ckpt(tmp_path / "wrong_shape", cfg, wrong)
    with pytest.raises(ValueError, match="norm/scale has shape"):
        load_hf(tmp_path / "wrong_shape")
    cut = tmp_path / "truncated"
    _write_ckpt(cut, cfg, tensors)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read"):
        load_hf(cut)
    nocfg = {k: v for k, v in cfg.items() if k != "hidden_size"}
    _write_ckpt(tmp_path / "nocfg", nocfg, tensors)
    with pytest.raises(ValueError, match="hidden_size"):
        load_hf(tmp_path / "nocfg")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_hf(tmp_path / "noweights")
