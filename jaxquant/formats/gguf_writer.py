"""Write a complete llama-architecture GGUF file (llama.cpp's format) from a jaxquant model.

The container is written by gguf-py's ``gguf.GGUFWriter``; the quantization is jaxquant's own: tensors that are
QArrays of :class:`~jaxquant.formats.gguf_blocks.GGUFScheme` are written as their bytes, float tensors as F32
(or F16). Conventions are llama.cpp's:

* tensor names ``token_embd.weight``, ``blk.{i}.attn_q.weight`` ... ``output_norm.weight``, ``output.weight``
  (absent for tied embeddings), numpy shape ``(out_features, in_features)``;
* ``attn_q``/``attn_k`` rows in llama.cpp's adjacent-pair RoPE order: a model in the Hugging Face half-split
  layout (``config.rope_style == "half"``) has its q/k rows permuted on the way out (whole GGUF rows, so a
  quantized kernel's blocks are moved, not re-quantized);
* metadata ``general.architecture = llama``, ``llama.*`` hyper-parameters, ``general.file_type``,
  ``general.quantization_version = 2`` and the tokenizer (``tokenizer.ggml.*``: copied from a source GGUF, or
  rebuilt from a :class:`~jaxquant.models.TextTokenizer`'s vocabulary, merges and special tokens).

The file is written to a temporary name beside ``path`` and renamed into place (atomic).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxquant.core.qarray import QArray
from jaxquant.formats.gguf_blocks import GGUFScheme
from jaxquant.formats.gguf_recipes import RECIPES, gguf_name

__all__ = ["tokenizer_metadata", "write_gguf", "write_gguf_model"]

_GGUF_TOKEN_NORMAL, _GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER = 1, 3, 4


def _infer_pre(pre_tok: Any) -> str:
    """GGUF ``tokenizer.ggml.pre`` name for a ``tokenizers`` pre-tokenizer JSON (the ones jaxquant builds)."""
    if not isinstance(pre_tok, dict):
        raise ValueError("tokenizer has no pre-tokenizer; cannot name its GGUF pre-tokenizer")
    kind = pre_tok.get("type")
    if kind == "ByteLevel":
        return "gpt2"
    if kind == "Sequence":
        parts = pre_tok.get("pretokenizers") or []
        types = [p.get("type") for p in parts]
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
        if types == ["Split", "ByteLevel"]:
            pattern = json.dumps(parts[0].get("pattern", ""))
            if "{1,3}" in pattern:
                return "llama-bpe"
    raise ValueError(f"cannot map the tokenizer's pre-tokenizer {pre_tok!r} to a GGUF tokenizer.ggml.pre name")


def tokenizer_metadata(tokenizer: Any) -> dict[str, Any]:
    """``tokenizer.ggml.*`` values for a byte-level BPE :class:`~jaxquant.models.TextTokenizer`.

    Returns a dict with ``tokens`` (strings in id order), ``token_types``, ``merges`` (``"left right"``),
    ``pre``, ``bos_id``, ``eos_id``, ``add_bos``. Raises ``ValueError`` for a non-BPE tokenizer or a vocabulary
    with gaps in its ids.
    """
    j = json.loads(tokenizer.hf.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers can be written to GGUF, got {model.get('type')!r}")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    types: dict[int, int] = {}
    for a in j.get("added_tokens") or []:
        vocab.setdefault(a["content"], int(a["id"]))
        types[int(a["id"])] = _GGUF_TOKEN_CONTROL if a.get("special") else _GGUF_TOKEN_USER
    n = max(vocab.values()) + 1 if vocab else 0
    tokens: list[str | None] = [None] * n
    for t, i in vocab.items():
        if tokens[i] is None:
            tokens[i] = t
    gaps = [i for i, t in enumerate(tokens) if t is None]
    if gaps:
        raise ValueError(f"tokenizer vocabulary has no token for ids {gaps[:8]}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {
        "tokens": tokens,
        "token_types": [types.get(i, _GGUF_TOKEN_NORMAL) for i in range(n)],
        "merges": merges,
        "pre": _infer_pre(j.get("pre_tokenizer")),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "add_bos": bool(tokenizer.add_bos),
    }


#: metadata copied from a source GGUF (the rest is written from the config)
_COPIED_PREFIXES = ("tokenizer.", "general.")
_NOT_COPIED = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


def _copy_fields(writer: Any, source: str, prefixes: tuple[str, ...], skip: set[str]) -> set[str]:
    import gguf

    from jaxquant.formats.gguf_reader import _open

    reader = _open(source)
    copied = set()
    for key, field in reader.fields.items():
        if not key.startswith(prefixes) or key in skip:
            continue
        types = list(field.types)
        value = field.contents()
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, types[0], sub_type=types[-1])
        else:
            writer.add_key_value(key, value, types[0])
        copied.add(key)
    return copied


def _rope_rows(n_out: int, n_heads: int) -> np.ndarray:
    """Row order turning half-split q/k rows into llama.cpp's adjacent-pair order: new row j = old row idx[j]."""
    from jaxquant.models.llama import permute_half_to_adjacent

    return np.asarray(permute_half_to_adjacent(np.arange(n_out)[None, :], n_heads))[0]


def _tensor_payload(path: str, value: Any, float_type: str, perm: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """(numpy array to write, raw ggml type or None) for one parameter."""
    import gguf

    is_kernel = path.endswith("/kernel")
    if isinstance(value, QArray):
        s = value.scheme
        if not isinstance(s, GGUFScheme):
            raise ValueError(
                f"{path}: a QArray of {type(s).__name__} ({s.describe()}) has no GGUF encoding; quantize with a "
                "GGUF SPEC (q4_k_m, q8_0, gguf-q4_0...) or pass float weights"
            )
        if s.transpose != is_kernel:
            raise ValueError(f"{path}: GGUFScheme(transpose={s.transpose}) does not match this tensor's layout")
        data = np.asarray(value.data, dtype=np.uint8)
        if perm is not None:
            data = data[perm]
        return np.ascontiguousarray(data), gguf.GGMLQuantizationType[s.qtype]
    w = np.asarray(value, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{path}: NaN/Inf values cannot be written")
    if is_kernel:
        w = w.T
        if perm is not None:
            w = w[perm]
    if w.ndim == 1 or float_type == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), None
    return np.ascontiguousarray(w.astype(np.float16)), None


def write_gguf(
    path: str | os.PathLike[str],
    config: Any,
    params: Mapping[str, Any],
    tokenizer: Any = None,
    *,
    source: str | os.PathLike[str] | None = None,
    name: str | None = None,
    recipe: str | None = None,
    float_type: str = "F32",
) -> str:
    """Write a llama GGUF file.

    Args:
      path: output file (``.gguf``); written atomically.
      config: the model's :class:`~jaxquant.models.LlamaConfig`.
      params: nested params (as :func:`jaxquant.models.model_params`): float arrays and/or QArrays of
        :class:`GGUFScheme` (kernels ``transpose=True``, embedding ``transpose=False``).
      tokenizer: a :class:`~jaxquant.models.TextTokenizer` to store (ignored when ``source`` is given).
      source: a GGUF file to copy the tokenizer (``tokenizer.*``) and descriptive ``general.*`` metadata from.
      name: ``general.name`` (default: the source's, else "jaxquant model"); overrides the source's.
      recipe: the llama.cpp recipe name used (sets ``general.file_type``); default inferred: 0 (all F32) or
        1 (F16) when nothing is quantized, else 7 (Q8_0) ... as the most common block type suggests.
      float_type: "F32" (default) or "F16" for float 2-D tensors; 1-D tensors are always F32.

    Returns:
      ``path`` as a string.

    Raises:
      ValueError: a QArray of a non-GGUF scheme, NaN/Inf, unknown parameter names, bad arguments.
    """
    import gguf

    from jaxquant.models.llama import flat_params, param_shapes

    if float_type not in ("F32", "F16"):
        raise ValueError(f"float_type must be 'F32' or 'F16', got {float_type!r}")
    path = os.fspath(path)
    flat = flat_params(params)
    want = param_shapes(config)
    if set(flat) != set(want):
        raise ValueError(
            f"params do not match the config: missing {sorted(set(want) - set(flat))[:6]}, "
            f"unexpected {sorted(set(flat) - set(want))[:6]}"
        )
    if recipe is not None and recipe.lower() not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")

    qtypes = [v.scheme.qtype for v in flat.values() if isinstance(v, QArray) and isinstance(v.scheme, GGUFScheme)]
    if recipe is not None:
        file_type = RECIPES[recipe.lower()].file_type
    elif not qtypes:
        file_type = 0 if float_type == "F32" else 1
    else:
        common = max(set(qtypes), key=qtypes.count)
        file_type = {r.base: r.file_type for r in reversed(list(RECIPES.values()))}.get(common, 0)

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        copied: set[str] = set()
        if source is not None:
            skip = _NOT_COPIED | ({"general.name"} if name is not None else set())
            copied = _copy_fields(w, os.fspath(source), _COPIED_PREFIXES, skip)
        if "general.name" not in copied:
            w.add_name(name or "jaxquant model")
        c = config
        w.add_context_length(int(c.max_seq_len))
        w.add_embedding_length(int(c.dim))
        w.add_block_count(int(c.n_layers))
        w.add_feed_forward_length(int(c.hidden_dim))
        w.add_head_count(int(c.n_heads))
        w.add_head_count_kv(int(c.n_kv_heads))
        w.add_rope_freq_base(float(c.rope_theta))
        w.add_layer_norm_rms_eps(float(c.norm_eps))
        w.add_rope_dimension_count(int(c.head_dim))
        if c.head_dim != c.dim // c.n_heads:
            w.add_key_length(int(c.head_dim))
            w.add_value_length(int(c.head_dim))
        w.add_vocab_size(int(c.vocab_size))
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source is None and tokenizer is not None:
            meta = tokenizer_metadata(tokenizer)
            if len(meta["tokens"]) != c.vocab_size:
                raise ValueError(f"tokenizer has {len(meta['tokens'])} tokens, the model {c.vocab_size}")
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(meta["pre"])
            w.add_token_list(meta["tokens"])
            w.add_token_types(meta["token_types"])
            w.add_token_merges(meta["merges"])
            if meta["bos_id"] is not None:
                w.add_bos_token_id(int(meta["bos_id"]))
            if meta["eos_id"] is not None:
                w.add_eos_token_id(int(meta["eos_id"]))
            w.add_add_bos_token(meta["add_bos"])

        order = ["embed/embedding", "norm/scale"]
        if not c.tie_embeddings:
            order.append("lm_head/kernel")
        order += [k for k in want if k.startswith("layers/")]
        perms = {}
        if c.rope_style == "half":
            perms["attn/q_proj"] = _rope_rows(c.n_heads * c.head_dim, c.n_heads)
            perms["attn/k_proj"] = _rope_rows(c.n_kv_heads * c.head_dim, c.n_kv_heads)
        elif c.rope_style != "adjacent":
            raise ValueError(f"unknown rope_style {c.rope_style!r}")
        for p in order:
            perm = next((v for k, v in perms.items() if f"/{k}/" in p), None)
            arr, raw = _tensor_payload(p, flat[p], float_type, perm)
            tname = gguf_name(p)[0]
            if raw is None:
                w.add_tensor(tname, arr)
            else:
                w.add_tensor(tname, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_gguf_model(path: str | os.PathLike[str], model: Any, params: Mapping[str, Any] | None = None, **kw) -> str:
    """:func:`write_gguf` for a :class:`~jaxquant.models.Llama` (its parameters unless ``params`` is given)."""
    from jaxquant.models import model_params

    return write_gguf(path, model.config, model_params(model) if params is None else params, **kw)
