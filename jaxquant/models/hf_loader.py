"""Hugging Face Llama checkpoints (``config.json`` + ``*.safetensors``) in and out.

Reading uses the ``safetensors`` package with its numpy framework (bfloat16 through ``ml_dtypes``); sharded
checkpoints (``model.safetensors.index.json``) are supported. Weights are converted to float32.

Layout: HF ``nn.Linear`` weights are ``(out, in)``; we transpose to ``(in, out)`` kernels. Names::

    model.embed_tokens.weight                          embed/embedding
    model.layers.{i}.input_layernorm.weight            layers/{i}/attn_norm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers/{i}/attn/{q,k,v,o}_proj/kernel
    model.layers.{i}.post_attention_layernorm.weight   layers/{i}/mlp_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers/{i}/mlp/{gate,up,down}_proj/kernel
    model.norm.weight                                  norm/scale
    lm_head.weight                                     lm_head/kernel (absent or ignored when tied)

HF q/k weights are in the "half" RoPE layout, so loaded models use ``rope_style="half"``. Writing a model
whose ``rope_style`` is ``"adjacent"`` (e.g. loaded from GGUF) un-permutes the q/k output columns first:
inside each head of width ``d``, adjacent-layout column ``2i + s`` becomes half-layout column
``s * d/2 + i`` (``s`` in {0, 1}), the inverse of the permutation llama.cpp applies when converting
HF -> GGUF (see :func:`jaxquant.models.llama.permute_adjacent_to_half`). The written checkpoint computes the
same logits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # registers bfloat16 with numpy so safetensors' numpy framework can read it
import numpy as np

from jaxquant.core.api import dequantize
from jaxquant.core.qarray import QArray
from jaxquant.models.llama import (
    Llama,
    LlamaConfig,
    convert_rope_style,
    flat_params,
    model_params,
    param_shapes,
    unflatten_params,
)
from jaxquant.models.tokenizer import TextTokenizer

__all__ = ["config_from_hf", "config_to_hf", "load_hf", "load_hf_model", "save_hf_checkpoint"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_LAYER_MAP = {
    "input_layernorm": "attn_norm/scale",
    "self_attn.q_proj": "attn/q_proj/kernel",
    "self_attn.k_proj": "attn/k_proj/kernel",
    "self_attn.v_proj": "attn/v_proj/kernel",
    "self_attn.o_proj": "attn/o_proj/kernel",
    "post_attention_layernorm": "mlp_norm/scale",
    "mlp.gate_proj": "mlp/gate_proj/kernel",
    "mlp.up_proj": "mlp/up_proj/kernel",
    "mlp.down_proj": "mlp/down_proj/kernel",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.weight")
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class HFCheckpointError(ValueError):
    """An HF checkpoint folder is incomplete, inconsistent, or describes an unsupported model."""


# ---------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------


def config_from_hf(cfg: Mapping[str, Any], *, where: str = "config.json") -> LlamaConfig:
    """:class:`LlamaConfig` (``rope_style="half"``) from an HF ``config.json`` dict."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        raise HFCheckpointError(f"{where}: model_type {model_type!r} / architectures {archs} is not a Llama model")
    if cfg.get("rope_scaling"):
        raise HFCheckpointError(f"{where}: rope_scaling {cfg['rope_scaling']!r} is not supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise HFCheckpointError(f"{where}: attention/MLP biases are not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HFCheckpointError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    try:
        dim = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or dim // n_heads
        return LlamaConfig(
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_style="half",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            head_dim_override=None if int(head_dim) == dim // n_heads else int(head_dim),
        )
    except KeyError as e:
        raise HFCheckpointError(f"{where}: required key {e.args[0]!r} is missing") from None


def config_to_hf(config: LlamaConfig, *, torch_dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    """An HF ``LlamaForCausalLM`` ``config.json`` dict for ``config`` (``extra`` keys are added as is)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_seq_len,
        "torch_dtype": torch_dtype,
    }
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, _INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise HFCheckpointError(f"{index}: unreadable safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise HFCheckpointError(f"{folder}: shard {name!r} listed in {_INDEX} is missing")
        return [os.path.join(folder, n) for n in files]
    single = os.path.join(folder, _SINGLE)
    if os.path.isfile(single):
        return [single]
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise HFCheckpointError(f"{folder}: no *.safetensors weight files")
    return [os.path.join(folder, n) for n in files]


def _read_tensors(files: list[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    out[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
        except Exception as e:
            msg = f"{path}: cannot read safetensors file: {type(e).__name__}: {e}"
            raise HFCheckpointError(msg) from None
    return out


def load_hf(folder: str | os.PathLike[str]) -> tuple[LlamaConfig, dict[str, Any], TextTokenizer | None]:
    """Read an HF Llama checkpoint folder.

    Returns:
      ``(config, params, tokenizer)``: ``config.rope_style == "half"``; ``params`` a nested dict of float32
      numpy arrays (:func:`~jaxquant.models.llama.model_params` layout); ``tokenizer`` a
      :class:`TextTokenizer` if the folder has a ``tokenizer.json``, else ``None``.

    Raises:
      FileNotFoundError: ``folder`` or its ``config.json`` does not exist.
      ValueError: unsupported config, unreadable/missing/mis-shaped weights.
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"HF checkpoint folder not found: {folder}")
    if not os.path.isdir(folder):
        raise HFCheckpointError(f"{folder} is not a folder (expected config.json + *.safetensors)")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise HFCheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    config = config_from_hf(cfg, where=cfg_path)
    tensors = _read_tensors(_weight_files(folder))

    flat: dict[str, np.ndarray] = {}
    unknown = []
    for name, w in tensors.items():
        if name == "model.embed_tokens.weight":
            flat["embed/embedding"] = w
        elif name == "model.norm.weight":
            flat["norm/scale"] = w
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                flat["lm_head/kernel"] = w.T
        elif (m := _LAYER_RE.fullmatch(name)) and m.group(2) in _LAYER_MAP:
            leaf = _LAYER_MAP[m.group(2)]
            flat[f"layers/{int(m.group(1))}/{leaf}"] = w.T if leaf.endswith("kernel") else w
        elif not _IGNORED_RE.fullmatch(name):
            unknown.append(name)
    if unknown:
        raise HFCheckpointError(f"{folder}: tensors not understood by the llama loader: {unknown[:8]}")
    want = param_shapes(config)
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise HFCheckpointError(f"{folder}: missing weights {missing[:6]}, unexpected weights {extra[:6]}")
    for k, s in want.items():
        if flat[k].shape != s:
            msg = f"{folder}: weight {k} has shape {flat[k].shape}, config.json implies {s}"
            raise HFCheckpointError(msg)
        flat[k] = np.ascontiguousarray(flat[k])

    tokenizer = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = TextTokenizer.from_folder(folder, bos_id=cfg.get("bos_token_id"), eos_id=cfg.get("eos_token_id"))
    return config, unflatten_params(flat), tokenizer


def load_hf_model(folder: str | os.PathLike[str]) -> tuple[Llama, TextTokenizer | None]:
    """``(Llama model, tokenizer or None)`` from an HF checkpoint folder (see :func:`load_hf`)."""
    config, params, tokenizer = load_hf(folder)
    return Llama.from_params(config, params), tokenizer


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def _to_hf_tensors(flat: Mapping[str, Any], dtype: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    inverse = {v: k for k, v in _LAYER_MAP.items()}
    for path, v in flat.items():
        w = np.asarray(dequantize(v) if isinstance(v, QArray) else v, dtype=np.float32)
        if path == "embed/embedding":
            name = "model.embed_tokens.weight"
        elif path == "norm/scale":
            name = "model.norm.weight"
        elif path == "lm_head/kernel":
            name, w = "lm_head.weight", w.T
        else:
            m = re.fullmatch(r"layers/(\d+)/(.+)", path)
            if not m or m.group(2) not in inverse:
                raise ValueError(f"save_hf_checkpoint: unexpected parameter {path!r}")
            name = f"model.layers.{m.group(1)}.{inverse[m.group(2)]}.weight"
            if m.group(2).endswith("kernel"):
                w = w.T
        out[name] = np.ascontiguousarray(w.astype(dtype))
    return out


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
    if not max_shard_bytes:
        return [tensors]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, w in tensors.items():
        if shards[-1] and size + w.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    return shards


def save_hf_checkpoint(
    params: Llama | Mapping[str, Any],
    config: LlamaConfig | None,
    folder: str | os.PathLike[str],
    *,
    tokenizer: TextTokenizer | None = None,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> str:
    """Write an HF ``LlamaForCausalLM`` checkpoint (``config.json`` + safetensors) into ``folder``.

    Args:
      params: a :class:`Llama` or a :func:`~jaxquant.models.llama.model_params` dict. QArrays are
        dequantized (the checkpoint is float).
      config: the model's config (``None``: taken from ``params.config`` when a model is given). An
        ``"adjacent"`` RoPE model has its q/k columns un-permuted to the HF layout (module docstring).
      folder: output folder (created; existing files of the same names are replaced).
      tokenizer: optional :class:`TextTokenizer` to write as ``tokenizer.json``.
      dtype: storage dtype, ``"float32"`` (default, lossless), ``"bfloat16"`` or ``"float16"``.
      max_shard_bytes: split into ``model-0000k-of-0000n.safetensors`` shards with an index when the weights
        exceed this many bytes (default: one ``model.safetensors``).

    Every file is written to a temporary name and moved into place with ``os.replace`` (``config.json`` last).

    Returns:
      ``folder`` as a string.
    """
    from safetensors.numpy import save_file

    if isinstance(params, Llama):
        config = config if config is not None else params.config
        params = model_params(params)
    if config is None:
        raise ValueError("save_hf_checkpoint: config is required when params is a dict")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    flat = {
        k: (np.asarray(dequantize(v), np.float32) if isinstance(v, QArray) else np.asarray(v, np.float32))
        for k, v in flat_params(params).items()
    }
    config, params = convert_rope_style(unflatten_params(flat), config, "half")
    tensors = _to_hf_tensors(flat_params(params), _DTYPES[dtype])
    shards = _shards(tensors, max_shard_bytes)

    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        written = []
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmpdir, _SINGLE), metadata={"format": "pt"})
            written.append(_SINGLE)
        else:
            n = len(shards)
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                name = f"model-{k:05d}-of-{n:05d}.safetensors"
                save_file(shard, os.path.join(tmpdir, name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
                written.append(name)
            total = sum(w.nbytes for w in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(os.path.join(tmpdir, _INDEX), "w") as f:
                json.dump(index, f, indent=1)
            written.append(_INDEX)
        if tokenizer is not None:
            tokenizer.save(tmpdir)
            written += ["tokenizer.json", "jaxquant_tokenizer.json"]
        extra = {}
        if tokenizer is not None:
            extra = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        with open(os.path.join(tmpdir, "config.json"), "w") as f:
            json.dump(config_to_hf(config, torch_dtype=dtype, **extra), f, indent=1)
        written.append("config.json")

        if not os.path.exists(folder):
            os.replace(tmpdir, folder)
            return folder
        if not os.path.isdir(folder):
            raise FileExistsError(f"save_hf_checkpoint: {folder} exists and is not a folder")
        stale = [n for n in os.listdir(folder) if (n.endswith(".safetensors") or n == _INDEX) and n not in written]
        for name in written[:-1]:
            os.replace(os.path.join(tmpdir, name), os.path.join(folder, name))
        for name in stale:
            os.remove(os.path.join(folder, name))
        # config.json last: a folder with the new config.json is complete
        os.replace(os.path.join(tmpdir, "config.json"), os.path.join(folder, "config.json"))
        return folder
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
