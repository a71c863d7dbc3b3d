"""Llama-family model (Flax NNX, every linear through ``jaxquant.qdot``) and its loaders.

::

    from jaxquant.models import load_model, forward, model_params, with_params
    model, tok = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")      # or an HF checkpoint folder
    logits = forward(model, jnp.array([tok.encode("The capital of France is")]))
    qmodel = with_params(model, jq.quantize_params(model_params(model), rules))

Parameter paths (``model_params`` dict, joined with "/"): ``embed/embedding``,
``layers/{i}/attn/q_proj/kernel`` (k/v/o likewise), ``layers/{i}/mlp/gate_proj/kernel`` (up/down likewise),
``layers/{i}/attn_norm/scale``, ``layers/{i}/mlp_norm/scale``, ``norm/scale``, ``lm_head/kernel`` (untied
only). See :mod:`.llama`.
"""

from __future__ import annotations

import os

from jaxquant.models.gguf_loader import config_from_gguf, load_gguf, load_gguf_model
from jaxquant.models.hf_loader import config_from_hf, config_to_hf, load_hf, load_hf_model, save_hf_checkpoint
from jaxquant.models.llama import (
    Llama,
    LlamaConfig,
    apply,
    convert_rope_style,
    flat_params,
    forward,
    model_params,
    param_path,
    param_shapes,
    permute_adjacent_to_half,
    permute_half_to_adjacent,
    unflatten_params,
    with_params,
)
from jaxquant.models.tokenizer import TextTokenizer, tokenizer_from_gguf

__all__ = [
    "Llama",
    "LlamaConfig",
    "TextTokenizer",
    "apply",
    "config_from_gguf",
    "config_from_hf",
    "config_to_hf",
    "convert_rope_style",
    "flat_params",
    "forward",
    "load_gguf",
    "load_gguf_model",
    "load_hf",
    "load_hf_model",
    "load_model",
    "model_params",
    "param_path",
    "param_shapes",
    "permute_adjacent_to_half",
    "permute_half_to_adjacent",
    "save_hf_checkpoint",
    "tokenizer_from_gguf",
    "unflatten_params",
    "with_params",
]


def load_model(path: str | os.PathLike[str]) -> tuple[Llama, TextTokenizer | None]:
    """Load ``(model, tokenizer)`` from a ``.gguf`` file or an HF checkpoint folder.

    A folder is read with :func:`load_hf_model` (tokenizer ``None`` if it has no ``tokenizer.json``); a file
    with :func:`load_gguf_model`. Raises ``FileNotFoundError`` if ``path`` does not exist.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_hf_model(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model file or folder at {path}")
    return load_gguf_model(path)
