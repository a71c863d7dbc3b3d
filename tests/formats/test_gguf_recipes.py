"""llama.cpp's per-tensor recipe choices (llama-quant.cpp) and their SPECs."""

from __future__ import annotations

import collections
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.formats.gguf_blocks import GGUFScheme
from jaxquant.formats.gguf_recipes import RECIPES, TensorRole, fallback_type, recipe_rules, recipe_types, tensor_type
from jaxquant.models import Llama, LlamaConfig, model_params
from jaxquant.specs import UnknownSpecError, list_specs, parse_spec

SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    hidden_dim=1536,
    norm_eps=1e-5,
    rope_theta=1e5,
    rope_style="adjacent",
    tie_embeddings=True,
    max_seq_len=8192,
)
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def _by(types, suffix):
    return {int(p.split("/")[1]): t for p, t in types.items() if p.endswith(suffix)}


def test_fallbacks():
    assert fallback_type("Q4_K", 576) == "Q5_0"
    assert fallback_type("Q5_K", 576) == "Q5_1"
    assert fallback_type("Q6_K", 576) == "Q8_0"
    for t in ("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"):
        assert fallback_type(t, 576) == "Q4_0"
    assert fallback_type("Q4_K", 1536) == "Q4_K"
    assert fallback_type("Q4_K", 100) == "F16"
    assert fallback_type("Q8_0", 96) == "Q8_0"


def test_smollm2_q4_k_m():
    """dim 576 is not a multiple of 256: only ffn_down (rows of 1536) gets K-quants; attn_v "more bits" layers
    get Q6_K -> Q8_0; the tied embedding is the output head: Q6_K -> Q8_0."""
    types = recipe_types("q4_k_m", SMOLLM2)
    down = _by(types, "down_proj/kernel")
    v = _by(types, "v_proj/kernel")
    assert {i for i, t in down.items() if t == "Q6_K"} == MORE_BITS_30
    assert {t for i, t in down.items() if i not in MORE_BITS_30} == {"Q4_K"}
    assert {i for i, t in v.items() if t == "Q8_0"} == MORE_BITS_30
    assert {t for i, t in v.items() if i not in MORE_BITS_30} == {"Q5_0"}
    assert types["embed/embedding"] == "Q8_0"
    rest = [t for p, t in types.items() if not p.endswith(("down_proj/kernel", "v_proj/kernel", "embedding"))]
    assert set(rest) == {"Q5_0"}
    assert len(types) == 30 * 7 + 1


def test_smollm2_other_recipes():
    c = collections.Counter
    assert c(recipe_types("q8_0", SMOLLM2).values()) == {"Q8_0": 211}
    assert c(recipe_types("q4_0", SMOLLM2).values()) == {"Q4_0": 210, "Q8_0": 1}
    assert c(recipe_types("q6_k", SMOLLM2).values()) == {"Q6_K": 30, "Q8_0": 181}
    assert c(recipe_types("q2_k", SMOLLM2).values()) == {"Q3_K": 30, "Q4_0": 180, "Q8_0": 1}
    t = recipe_types("q3_k_m", SMOLLM2)
    assert _by(t, "down_proj/kernel")[0] == "Q5_K" and set(list(_by(t, "down_proj/kernel").values())[1:]) == {"Q4_K"}
    assert _by(t, "v_proj/kernel")[0] == "Q5_1" and _by(t, "v_proj/kernel")[2] == "Q5_0"
    assert set(_by(t, "o_proj/kernel").values()) == {"Q5_0"} and set(_by(t, "q_proj/kernel").values()) == {"Q4_0"}
    t = recipe_types("q4_k_s", SMOLLM2)
    assert [_by(t, "down_proj/kernel")[i] for i in range(5)] == ["Q5_K"] * 3 + ["Q4_K"] * 2
    assert [_by(t, "v_proj/kernel")[i] for i in range(5)] == ["Q5_1"] * 4 + ["Q5_0"]
    assert c(recipe_types("tq2_0", SMOLLM2).values()) == {"TQ2_0": 30, "Q4_0": 180, "Q8_0": 1}


def test_widths_multiple_of_256_and_untied():
    cfg = dataclasses.replace(SMOLLM2, dim=1024, hidden_dim=2816, n_heads=16, n_kv_heads=4, tie_embeddings=False)
    types = recipe_types("q4_k_m", cfg)
    assert types["lm_head/kernel"] == "Q6_K"
    assert types["embed/embedding"] == "Q4_K"  # untied: the embedding keeps the base type
    assert _by(types, "v_proj/kernel")[0] == "Q6_K" and _by(types, "v_proj/kernel")[3] == "Q4_K"
    assert _by(types, "down_proj/kernel")[4] == "Q4_K"  # rows of 2816 = 11 * 256
    q2 = recipe_types("q2_k", cfg)
    assert set(_by(q2, "v_proj/kernel").values()) == {"Q4_K"}  # n_head / n_kv_head = 4
    assert set(_by(q2, "o_proj/kernel").values()) == {"Q3_K"}
    assert set(_by(q2, "q_proj/kernel").values()) == {"Q2_K"}
    assert tensor_type("tq1_0", TensorRole.TOKEN_EMBD, -1, 30, 1024, tied=False) == "Q4_K"
    with pytest.raises(ValueError, match="unknown GGUF recipe"):
        tensor_type("q9_k", TensorRole.ATTN_V, 0, 30, 1024)


def test_rules_and_specs(tiny_config, tiny_params):
    rules = recipe_rules("q4_k_m", tiny_config)
    assert all(s is None or isinstance(s, GGUFScheme) for _, s in rules)
    emb = dict(rules)["embed/embedding"]
    assert emb == GGUFScheme("Q6_K", transpose=False)
    names = list_specs()
    for r in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k", "tq2_0"):
        assert r in names
        assert parse_spec(r).build is not None
    assert parse_spec("Q5_K_S").name == "q5_k_s"
    assert parse_spec("gguf-q4_k").rules[0][1] == GGUFScheme("Q4_K")
    with pytest.raises(UnknownSpecError):
        parse_spec("gguf-q9_k")
    model = Llama.from_params(tiny_config, tiny_params)
    qp = parse_spec("q4_k_m").build(model, None, {})
    assert qp["layers"][1]["mlp"]["down_proj"]["kernel"].scheme == GGUFScheme("Q6_K")  # last layer: more bits
    assert qp["layers"][0]["mlp"]["down_proj"]["kernel"].scheme == GGUFScheme("Q4_K")
    assert qp["layers"][0]["attn"]["q_proj"]["kernel"].scheme == GGUFScheme("Q4_K")
    assert isinstance(qp["layers"][0]["attn_norm"]["scale"], jnp.ndarray | np.ndarray)
    assert set(RECIPES) >= {"q8_0", "q4_k_m", "tq2_0"}


def test_pure_spec_rejects_short_rows(tiny_config, make_params):
    cfg = dataclasses.replace(tiny_config, dim=96, n_heads=2, n_kv_heads=1, hidden_dim=256)
    model = Llama.from_params(cfg, make_params(cfg))
    from jaxquant.transform import quantize_params

    with pytest.raises(ValueError, match=r"layers/0/attn/\w_proj/kernel.*not a multiple of the 256-element block"):
        quantize_params(model_params(model), list(parse_spec("gguf-q4_k").rules))
