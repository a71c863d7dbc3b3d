"""Load a llama-architecture GGUF file (llama.cpp's format) into a :class:`~jaxquant.models.llama.Llama`.

Every tensor is dequantized to float32 with gguf-py (``gguf.quants.dequantize``), whatever its GGUF type
(F32/F16/BF16, Q8_0, Q4_0/Q4_1/Q5_x, K-quants...). GGUF stores a weight of ``in`` inputs and ``out`` outputs
as a numpy ``(out, in)`` array (its ``ne = [in, out]``); we transpose to ``(in, out)`` kernels.

Name mapping (GGUF -> :func:`~jaxquant.models.llama.model_params` path)::

    token_embd.weight            embed/embedding            (vocab, dim), not transposed
    output_norm.weight           norm/scale
    output.weight                lm_head/kernel             absent -> tied embeddings
    blk.{i}.attn_norm.weight     layers/{i}/attn_norm/scale
    blk.{i}.attn_q.weight        layers/{i}/attn/q_proj/kernel
    blk.{i}.attn_k.weight        layers/{i}/attn/k_proj/kernel
    blk.{i}.attn_v.weight        layers/{i}/attn/v_proj/kernel
    blk.{i}.attn_output.weight   layers/{i}/attn/o_proj/kernel
    blk.{i}.ffn_norm.weight      layers/{i}/mlp_norm/scale
    blk.{i}.ffn_gate.weight      layers/{i}/mlp/gate_proj/kernel
    blk.{i}.ffn_up.weight        layers/{i}/mlp/up_proj/kernel
    blk.{i}.ffn_down.weight      layers/{i}/mlp/down_proj/kernel

GGUF's ``attn_q``/``attn_k`` rows are permuted for llama.cpp's adjacent-pair RoPE, so the model is returned
with ``rope_style="adjacent"`` and the weights exactly as stored; :func:`~jaxquant.models.llama.
convert_rope_style` (or :func:`~jaxquant.models.hf_loader.save_hf_checkpoint`) turns it into the HF layout.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from jaxquant.models._gguf import GGUFError, get_field, open_gguf
from jaxquant.models.llama import Llama, LlamaConfig, param_shapes, unflatten_params
from jaxquant.models.tokenizer import TextTokenizer, tokenizer_from_gguf

__all__ = ["config_from_gguf", "load_gguf", "load_gguf_model"]

_BLOCK_MAP = {
    "attn_norm": ("attn_norm", "scale"),
    "attn_q": ("attn/q_proj", "kernel"),
    "attn_k": ("attn/k_proj", "kernel"),
    "attn_v": ("attn/v_proj", "kernel"),
    "attn_output": ("attn/o_proj", "kernel"),
    "ffn_norm": ("mlp_norm", "scale"),
    "ffn_gate": ("mlp/gate_proj", "kernel"),
    "ffn_up": ("mlp/up_proj", "kernel"),
    "ffn_down": ("mlp/down_proj", "kernel"),
}
_BLK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def config_from_gguf(reader: Any, *, path: str = "GGUF") -> LlamaConfig:
    """:class:`LlamaConfig` from the ``llama.*`` metadata of an open ``gguf.GGUFReader``.

    Raises ``ValueError`` if the architecture is not ``llama`` or a required key is missing/unsupported.
    """
    arch = get_field(reader, "general.architecture", None, path=path)
    if arch != "llama":
        raise GGUFError(
            f"{path}: general.architecture is {arch!r}; only 'llama' GGUF models are supported by jaxquant.models"
        )

    def key(name: str, default: Any = ...) -> Any:
        if default is ...:
            return get_field(reader, f"llama.{name}", path=path)
        return get_field(reader, f"llama.{name}", default, path=path)

    dim = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_heads))
    head_dim = int(key("attention.key_length", dim // n_heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: attention key and value head widths differ; not supported")
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(
            f"{path}: partial RoPE (rope.dimension_count={rope_dim} != head_dim={head_dim}) is not supported"
        )
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", "", None):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", None)
    if vocab is None:
        if tokens is not None:
            vocab = len(tokens.data)
        else:
            vocab = _tensor_shape(reader, "token_embd.weight")[0]
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=_f32_clean(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_clean(key("rope.freq_base", 10000.0)),
        rope_style="adjacent",
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(key("context_length", 2048)),
        head_dim_override=None if head_dim == dim // n_heads else head_dim,
    )


def _f32_clean(x: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _tensor_shape(reader: Any, name: str) -> tuple[int, ...]:
    """Numpy-order shape ``(out, in)`` of tensor ``name`` (GGUF ``ne`` reversed)."""
    for t in reader.tensors:
        if t.name == name:
            return tuple(int(n) for n in reversed(list(t.shape)))
    raise GGUFError(f"tensor {name!r} not found")


def _dequantize(t: Any, path: str) -> np.ndarray:
    import gguf

    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise GGUFError(f"{path}: cannot dequantize tensor {t.name!r} of type {t.tensor_type!r}: {e}") from None
    w = np.array(w, dtype=np.float32, copy=True)  # detach from the memory map
    want = tuple(int(n) for n in reversed(list(t.shape)))
    if w.shape != want:
        w = w.reshape(want)
    if not np.all(np.isfinite(w)):
        raise GGUFError(f"{path}: tensor {t.name!r} holds NaN/Inf values")
    return w


def _read_params(reader: Any, config: LlamaConfig, path: str) -> dict[str, Any]:
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        name = t.name
        if name == "token_embd.weight":
            flat["embed/embedding"] = _dequantize(t, path)
        elif name == "output_norm.weight":
            flat["norm/scale"] = _dequantize(t, path)
        elif name == "output.weight":
            flat["lm_head/kernel"] = _dequantize(t, path).T
        elif (m := _BLK_RE.fullmatch(name)) and m.group(2) in _BLOCK_MAP:
            sub, leaf = _BLOCK_MAP[m.group(2)]
            w = _dequantize(t, path)
            flat[f"layers/{int(m.group(1))}/{sub}/{leaf}"] = w.T if leaf == "kernel" else w
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(f"{path}: tensors not understood by the llama loader: {unknown[:8]}")
    want = param_shapes(config)
    missing = sorted(set(want) - set(flat))
    if missing:
        raise GGUFError(f"{path}: missing tensors for {len(missing)} parameters, e.g. {missing[:6]}")
    extra = sorted(set(flat) - set(want))
    if extra:
        raise GGUFError(f"{path}: tensors beyond llama.block_count / unexpected output weights: {extra[:6]}")
    for k, s in want.items():
        if flat[k].shape != s:
            raise GGUFError(f"{path}: parameter {k} has shape {flat[k].shape}, config implies {s}")
        flat[k] = np.ascontiguousarray(flat[k])
    return unflatten_params(flat)


def load_gguf(path: str | os.PathLike[str]) -> tuple[LlamaConfig, dict[str, Any], TextTokenizer | None]:
    """Read a llama GGUF file: hyper-parameters, float32 weights and tokenizer.

    Args:
      path: the ``.gguf`` file.

    Returns:
      ``(config, params, tokenizer)``: ``config.rope_style == "adjacent"``; ``params`` is a nested dict of
      float32 numpy arrays in :func:`~jaxquant.models.llama.model_params` layout (build the model with
      ``Llama.from_params(config, params)``); ``tokenizer`` a :class:`TextTokenizer` (``None`` when the file
      has no ``tokenizer.ggml.model``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a GGUF file, truncated/corrupt, not ``general.architecture == "llama"``, missing or
        mis-shaped tensors, unsupported features (RoPE scaling, partial RoPE, SentencePiece vocabularies).
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path=path)
    params = _read_params(reader, config, path)
    tokenizer = None
    if "tokenizer.ggml.model" in reader.fields:
        tokenizer = tokenizer_from_gguf(reader, name=path)
    del reader
    return config, params, tokenizer


def load_gguf_model(path: str | os.PathLike[str]) -> tuple[Llama, TextTokenizer | None]:
    """``(Llama model, tokenizer)`` from a GGUF file (see :func:`load_gguf`)."""
    config, params, tokenizer = load_gguf(path)
    return Llama.from_params(config, params), tokenizer
