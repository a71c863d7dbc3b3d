"""llama.cpp's quantization recipes ("file types" such as Q4_K_M): the per-tensor type choice of
``llama-quantize`` (``src/llama-quant.cpp``) for llama-architecture models, as jaxquant rules.

A recipe has a base type and promotes or demotes some tensors by role and layer (this module follows the
rules llama.cpp applies to dense, non-Falcon models without an importance matrix):

* ``output.weight`` -- or, with tied embeddings, ``token_embd.weight``, which then serves as the output
  head -- becomes Q6_K (Q8_0 for the q8_0 recipe, or when its row length is not a multiple of the base
  type's block).
* ``token_embd.weight`` (untied) keeps the base type; Q4_K for the ternary recipes.
* ``attn_v``: Q2_K -> Q3_K (Q4_K if ``n_head/n_kv_head >= 4``); Q3_K_M -> Q5_K in layers 0-1, else Q4_K;
  Q3_K_L -> Q5_K; Q4_K_M and Q5_K_M -> Q6_K in the "more bits" layers; Q4_K_S -> Q5_K in layers 0-3.
* ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K in the first n/16 layers, else Q4_K; Q3_K_L -> Q5_K;
  Q4_K_M and Q5_K_M -> Q6_K in the "more bits" layers; Q4_K_S -> Q5_K in the first n/8 layers.
* ``attn_output``: Q2_K -> Q3_K; Q3_K_M -> Q4_K; Q3_K_L -> Q5_K.

"More bits" layers (``use_more_bits``) are ``i < n/8``, ``i >= 7n/8`` and every third layer in between
(``(i - n/8) % 3 == 2``), with integer division; for SmolLM2's 30 layers: 0-2, 5, 8, 11, 14, 17, 20, 23, 26-29.

**Fallbacks.** A block type needs rows (``in_features``) that are a multiple of its block: 256 for the K-quants
and ternary types, 32 for the others. llama.cpp then falls back: Q2_K, Q3_K, TQ1_0, TQ2_0 -> Q4_0;
Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and to F16 if even 32 does not divide. SmolLM2-135M has
``dim = 576 = 2.25 * 256``: every tensor whose rows have 576 weights (q/k/v/o, gate, up and the embedding)
falls back, and only ``ffn_down`` (rows of 1536 = 6 * 256) gets real K-quants. So ``q4_k_m`` on SmolLM2 is
mostly Q5_0 with Q4_K/Q6_K ``ffn_down`` -- exactly what ``llama-quantize`` produces for it.

Layer counters: llama.cpp counts ``attn_v``/``ffn_down`` tensors in the order its loader sorts them (by layer
number), so the counter equals the layer index; the model-size special case for 70B models (8 kv-groups) and
the mixture-of-experts rules are not reproduced.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxquant.core.qarray import Scheme
from jaxquant.formats.gguf_blocks import GGUF_TYPES, GGUFScheme

__all__ = [
    "RECIPES",
    "Recipe",
    "TensorRole",
    "fallback_type",
    "gguf_name",
    "recipe_rules",
    "recipe_types",
    "tensor_type",
]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A llama.cpp file type: name (``"q4_k_m"``), base block type, ``general.file_type`` number, description."""

    name: str
    base: str
    file_type: int
    description: str


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("q8_0", "Q8_0", 7, "llama.cpp Q8_0: 8-bit blocks of 32"),
        Recipe("q4_0", "Q4_0", 2, "llama.cpp Q4_0: symmetric 4-bit blocks of 32, Q8_0/Q6_K output"),
        Recipe("q4_1", "Q4_1", 3, "llama.cpp Q4_1: 4-bit min/max blocks of 32"),
        Recipe("q5_0", "Q5_0", 8, "llama.cpp Q5_0: symmetric 5-bit blocks of 32"),
        Recipe("q5_1", "Q5_1", 9, "llama.cpp Q5_1: 5-bit min/max blocks of 32"),
        Recipe("q2_k", "Q2_K", 10, "llama.cpp Q2_K mix: Q2_K, attn_v/attn_output/ffn_down Q3_K"),
        Recipe("q3_k_s", "Q3_K", 11, "llama.cpp Q3_K_S: Q3_K everywhere"),
        Recipe("q3_k_m", "Q3_K", 12, "llama.cpp Q3_K_M mix: Q3_K, attn_v/ffn_down Q4_K-Q5_K, attn_output Q4_K"),
        Recipe("q3_k_l", "Q3_K", 13, "llama.cpp Q3_K_L mix: Q3_K, attn_v/ffn_down/attn_output Q5_K"),
        Recipe("q4_k_s", "Q4_K", 14, "llama.cpp Q4_K_S mix: Q4_K, first attn_v/ffn_down Q5_K"),
        Recipe("q4_k_m", "Q4_K", 15, "llama.cpp Q4_K_M mix: Q4_K, half of attn_v/ffn_down Q6_K"),
        Recipe("q5_k_s", "Q5_K", 16, "llama.cpp Q5_K_S: Q5_K everywhere"),
        Recipe("q5_k_m", "Q5_K", 17, "llama.cpp Q5_K_M mix: Q5_K, half of attn_v/ffn_down Q6_K"),
        Recipe("q6_k", "Q6_K", 18, "llama.cpp Q6_K: 6-bit super-blocks everywhere"),
        Recipe("tq1_0", "TQ1_0", 36, "llama.cpp TQ1_0: ternary, 1.69 bpw (BitNet b1.58 models)"),
        Recipe("tq2_0", "TQ2_0", 37, "llama.cpp TQ2_0: ternary, 2.06 bpw (BitNet b1.58 models)"),
    )
}

_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1"}
_FALLBACK["Q6_K"] = "Q8_0"


class TensorRole:
    """Tensor categories of llama.cpp's recipe logic."""

    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_OUTPUT = "attn_output"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"


def fallback_type(qtype: str, row_len: int) -> str:
    """The type llama.cpp uses when ``row_len`` is not a multiple of ``qtype``'s block ("F16" as last resort)."""
    if qtype in ("F16", "F32"):
        return qtype
    if row_len % GGUF_TYPES[qtype].block_size == 0:
        return qtype
    fb = _FALLBACK.get(qtype)
    if fb is None:
        raise ValueError(f"no fallback type for {qtype} (rows of {row_len} weights)")
    return fb if row_len % GGUF_TYPES[fb].block_size == 0 else "F16"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _recipe(name: str) -> Recipe:
    key = name.lower()
    if key not in RECIPES:
        raise ValueError(f"unknown GGUF recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[key]


def tensor_type(
    recipe: str, role: str, layer: int, n_layers: int, row_len: int, *, n_gqa: int = 1, tied: bool = True
) -> str:
    """The GGUF type llama.cpp's ``recipe`` gives one tensor (after the shape fallback).

    Args:
      recipe: a :data:`RECIPES` name (``"q4_k_m"``).
      role: a :class:`TensorRole` value.
      layer: block index (ignored for embeddings/output).
      n_layers: number of blocks.
      row_len: GGUF ``ne[0]``: ``in_features`` of a linear layer, ``dim`` for the embedding.
      n_gqa: ``n_heads / n_kv_heads``.
      tied: the model has no separate ``output.weight`` (the embedding is the output head).

    Returns:
      a block type name (``"Q6_K"``...) or ``"F16"``.
    """
    r = _recipe(recipe)
    name = r.name
    new = r.base
    i, n = layer, n_layers
    if role == TensorRole.OUTPUT or (tied and role == TensorRole.TOKEN_EMBD):
        if row_len % GGUF_TYPES[new].block_size != 0:
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif role == TensorRole.TOKEN_EMBD:
        if name in ("tq1_0", "tq2_0"):
            new = "Q4_K"
    elif role == TensorRole.ATTN_V:
        if name == "q2_k":
            new = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif name == "q3_k_m":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif name == "q3_k_l":
            new = "Q5_K"
        elif name in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            new = "Q6_K"
        elif name == "q4_k_s" and i < 4:
            new = "Q5_K"
    elif role == TensorRole.FFN_DOWN:
        if name == "q2_k":
            new = "Q3_K"
        elif name == "q3_k_m":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif name == "q3_k_l":
            new = "Q5_K"
        elif name == "q4_k_m":
            if _use_more_bits(i, n):
                new = "Q6_K"
        elif name == "q5_k_m" and _use_more_bits(i, n):
            new = "Q6_K"
        elif name == "q4_k_s" and i < n // 8:
            new = "Q5_K"
    elif role == TensorRole.ATTN_OUTPUT:
        new = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(name, new)
    return fallback_type(new, row_len)


# jaxquant parameter path <-> GGUF tensor name / role
_BLOCK = {
    "attn/q_proj/kernel": ("attn_q", TensorRole.ATTN_Q),
    "attn/k_proj/kernel": ("attn_k", TensorRole.ATTN_K),
    "attn/v_proj/kernel": ("attn_v", TensorRole.ATTN_V),
    "attn/o_proj/kernel": ("attn_output", TensorRole.ATTN_OUTPUT),
    "mlp/gate_proj/kernel": ("ffn_gate", TensorRole.FFN_GATE),
    "mlp/up_proj/kernel": ("ffn_up", TensorRole.FFN_UP),
    "mlp/down_proj/kernel": ("ffn_down", TensorRole.FFN_DOWN),
    "attn_norm/scale": ("attn_norm", None),
    "mlp_norm/scale": ("ffn_norm", None),
}
_LAYER_RE = re.compile(r"layers/(\d+)/(.+)")


def gguf_name(path: str) -> tuple[str, str | None, int]:
    """``(GGUF tensor name, role or None, layer)`` of a :func:`jaxquant.models.model_params` path.

    Raises ``ValueError`` for a path that has no GGUF counterpart.
    """
    if path == "embed/embedding":
        return "token_embd.weight", TensorRole.TOKEN_EMBD, -1
    if path == "lm_head/kernel":
        return "output.weight", TensorRole.OUTPUT, -1
    if path == "norm/scale":
        return "output_norm.weight", None, -1
    m = _LAYER_RE.fullmatch(path)
    if m and m.group(2) in _BLOCK:
        base, role = _BLOCK[m.group(2)]
        return f"blk.{int(m.group(1))}.{base}.weight", role, int(m.group(1))
    raise ValueError(f"parameter {path!r} has no GGUF tensor name")


def recipe_types(recipe: str, config: Any) -> dict[str, str]:
    """``{param path: GGUF type}`` for every tensor ``recipe`` quantizes in a model with ``config``
    (a :class:`jaxquant.models.LlamaConfig`); norms are absent (they stay float32)."""
    from jaxquant.models.llama import param_shapes

    _recipe(recipe)
    out = {}
    n_gqa = config.n_heads // config.n_kv_heads
    for path, shape in param_shapes(config).items():
        _, role, layer = gguf_name(path)
        if role is None:
            continue
        row_len = shape[1] if role == TensorRole.TOKEN_EMBD else shape[0]
        out[path] = tensor_type(recipe, role, layer, config.n_layers, row_len, n_gqa=n_gqa, tied=config.tie_embeddings)
    return out


def recipe_rules(recipe: str, config: Any) -> list[tuple[str, Scheme | None]]:
    """:func:`jaxquant.quantize_params` rules (one exact-path rule per tensor) applying ``recipe`` to a model
    with ``config``. Embeddings use ``GGUFScheme(..., transpose=False)``; "F16" fallbacks keep the tensor float."""
    rules: list[tuple[str, Scheme | None]] = []
    for path, qtype in recipe_types(recipe, config).items():
        if qtype in GGUF_TYPES:
            scheme = GGUFScheme(qtype, transpose=path != "embed/embedding")
        else:
            scheme = None
        rules.append((re.escape(path), scheme))
    return rules
