"""Hugging Face GPTQ checkpoints (AutoGPTQ / transformers "gptq" format, v1 packing), both directions.

Per linear layer with ``K`` inputs, ``N`` outputs, ``b`` bits and groups of ``g`` inputs::

    qweight  int32 [K*b/32, N]    codes packed along K, a little-endian bit stream per column (low bits first;
                                  3-bit codes straddle words)
    qzeros   int32 [G, N*b/32]    (zero - 1) packed along N the same way (the v1 convention)
    scales   fp16  [G, N]
    g_idx    int32 [K]            group of input k: k // g, or a permutation-derived index with act-order

    w[k, n] = scales[g_idx[k], n] * (code[k, n] - (stored_zero[g_idx[k], n] + 1))

``G = ceil(K/g)`` (``g = -1``: one group per column). Exported QArrays are :class:`~jaxquant.IntScheme`
(group or channel granularity, float16 scales, symmetric or integer zero point): a symmetric grid is written
as GPTQ ``sym=True`` with zero ``2^(b-1)``. A zero point of 0 cannot be written in v1 (it would be stored as -1
and read back as ``2^b``), so it raises. Import gives an IntScheme QArray when ``g_idx`` is ``k // g``; an
act-order checkpoint (any other ``g_idx``) gives a :class:`GroupIndexScheme` QArray that keeps ``g_idx`` and
dequantizes through it -- both bit-exact to the checkpoint's dequantized weights.

Checkpoint folders: ``model.safetensors`` (``model.layers.{i}.self_attn.q_proj.qweight`` ...; embedding, norms
and an untied ``lm_head`` in float32), ``config.json`` with ``quantization_config``, ``quantize_config.json``
(AutoGPTQ), optionally ``tokenizer.json``. Weights are in the HF q/k layout (a GGUF-layout model's q/k output
columns are permuted at the integer level, exactly).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import packing
from jaxquant.core.qarray import QArray, Scheme
from jaxquant.formats._hf_common import (
    HF_LINEAR_RE,
    IntCodes,
    codes_of,
    float_param_path,
    float_tensor_names,
    hf_module,
    int_qarray,
    pack_words,
    param_path,
    read_safetensors,
    unpack_words,
    write_checkpoint_folder,
    write_json,
)

__all__ = [
    "GroupIndexScheme",
    "from_gptq",
    "load_gptq_checkpoint",
    "save_gptq_checkpoint",
    "to_gptq",
]


@dataclasses.dataclass(frozen=True)
class GroupIndexScheme(Scheme):
    """Integer codes with an arbitrary per-input group index (GPTQ act-order checkpoints); import only.

    ``data``: codes packed along K (:func:`jaxquant.core.packing.pack`); ``scale`` (G, N) float16; ``zero``
    (G, N) uint8; ``aux["g_idx"]`` (K,) int32. ``w[k, n] = scale[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])``.
    """

    bits: int = 4
    group_size: int = 128

    kind = "gptq-act-order"

    def describe(self) -> str:
        return f"int{self.bits} g{self.group_size} act-order (GPTQ g_idx)"

    def _quantize(self, w):
        raise ValueError("GroupIndexScheme only describes imported act-order GPTQ checkpoints; quantize with jq.gptq")

    def _dequantize(self, q: QArray) -> jax.Array:
        k, _ = q.shape
        codes = packing.unpack(q.data, self.bits, k).astype(jnp.float32)
        g = q.aux["g_idx"]
        z = jnp.take(q.zero.astype(jnp.float32), g, axis=0)
        s = jnp.take(q.scale.astype(jnp.float32), g, axis=0)
        return ((codes - z) * s).astype(q.dtype)


def _check_bits(bits: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ supports 2, 3, 4 or 8 bits, got {bits}")


def to_gptq(q: QArray, *, where: str = "QArray") -> dict[str, np.ndarray]:
    """The GPTQ v1 tensors ``{"qweight", "qzeros", "scales", "g_idx"}`` of an integer QArray (module docstring).

    Raises ``ValueError`` for other schemes, non-float16 scales, bit widths other than 2/3/4/8, shapes that do
    not fill whole 32-bit words, or zero points of 0 (not representable in v1).
    """
    return _to_gptq_codes(codes_of(q, where), where)


def _to_gptq_codes(c: IntCodes, where: str) -> dict[str, np.ndarray]:
    _check_bits(c.bits)
    k, n = c.codes.shape
    if (k * c.bits) % 32 or (n * c.bits) % 32:
        raise ValueError(f"{where}: a ({k}, {n}) kernel at {c.bits} bits does not fill whole 32-bit words")
    if np.any(c.zeros == 0):
        raise ValueError(
            f"{where}: {int(np.sum(c.zeros == 0))} group(s) have zero point 0, which GPTQ v1 (stores zero - 1) "
            "cannot represent; use a symmetric scheme or groups whose minimum is negative"
        )
    mask = (1 << c.bits) - 1
    return {
        "qweight": pack_words(c.codes, c.bits),
        "qzeros": np.ascontiguousarray(pack_words(((c.zeros - 1) & mask).T, c.bits).T),
        "scales": np.ascontiguousarray(c.scales.astype(np.float16)),
        "g_idx": c.g_idx.astype(np.int32),
    }


def _codes_from_gptq(t: Mapping[str, np.ndarray], bits: int, group_size: int, sym: bool, where: str) -> IntCodes:
    _check_bits(bits)
    try:
        qweight, qzeros, scales = (np.asarray(t[x]) for x in ("qweight", "qzeros", "scales"))
    except KeyError as e:
        raise ValueError(f"{where}: missing GPTQ tensor {e}") from None
    if qweight.ndim != 2 or qzeros.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"{where}: qweight/qzeros/scales must be 2-D")
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    g = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (g, n * bits // 32):
        raise ValueError(
            f"{where}: inconsistent shapes qweight {qweight.shape}, qzeros {qzeros.shape}, scales {scales.shape}"
        )
    g_idx = t.get("g_idx")
    trivial = (np.arange(k) // group_size if group_size > 0 else np.zeros(k)).astype(np.int32)
    g_idx = trivial if g_idx is None else np.asarray(g_idx).astype(np.int32)
    if g_idx.shape != (k,) or g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= g:
        raise ValueError(f"{where}: g_idx must be {k} group indices in [0, {g})")
    codes = unpack_words(qweight.astype(np.int32), bits, k)
    zeros = unpack_words(np.ascontiguousarray(qzeros.astype(np.int32).T), bits, n).T + 1
    return IntCodes(codes, scales.astype(np.float16), zeros, g_idx, bits, group_size, sym)


def from_gptq(
    tensors: Mapping[str, np.ndarray], *, bits: int, group_size: int, sym: bool = False, dtype: str = "float32"
) -> QArray:
    """A QArray from one layer's GPTQ v1 tensors (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``).

    ``group_size = -1`` means one group per column. With the trivial ``g_idx`` the result is an
    :class:`~jaxquant.IntScheme` QArray (symmetric when ``sym`` and the codes fit the symmetric range), else a
    :class:`GroupIndexScheme` QArray.
    """
    c = _codes_from_gptq(tensors, bits, group_size, sym, "GPTQ layer")
    return _codes_to_qarray(c, dtype)


def _codes_to_qarray(c: IntCodes, dtype: str) -> QArray:
    k = c.codes.shape[0]
    trivial = (np.arange(k) // c.group_size if c.group_size > 0 else np.zeros(k)).astype(np.int32)
    if np.array_equal(c.g_idx, trivial) and (c.group_size > 0 or c.scales.shape[0] == 1):
        return int_qarray(c, dtype)
    if np.any(c.zeros > 255):
        raise ValueError("zero points above 255 cannot be stored")
    return QArray(
        data=packing.pack(jnp.asarray(c.codes.astype(np.uint8)), c.bits),
        scale=jnp.asarray(c.scales, jnp.float16),
        zero=jnp.asarray(c.zeros.astype(np.uint8)),
        aux={"g_idx": jnp.asarray(c.g_idx)},
        scheme=GroupIndexScheme(bits=c.bits, group_size=c.group_size),
        shape=c.codes.shape,
        dtype=dtype,
    )


# ------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------


def _rope_perm(config: Any, path: str) -> np.ndarray | None:
    """Column order turning adjacent-layout q/k outputs into the HF half layout (None for other layers)."""
    from jaxquant.models.llama import permute_adjacent_to_half

    if config.rope_style != "adjacent":
        return None
    if path.endswith("attn/q_proj/kernel"):
        heads = config.n_heads
    elif path.endswith("attn/k_proj/kernel"):
        heads = config.n_kv_heads
    else:
        return None
    n = heads * config.head_dim
    return np.asarray(permute_adjacent_to_half(np.arange(n)[None, :], heads))[0]


def export_layers(config: Any, params: Mapping[str, Any], convert) -> tuple[dict[str, np.ndarray], IntCodes]:
    """(HF tensors, codes of the first layer) for all parameters; ``convert(codes, where)`` gives a layer's
    quantized tensors. Float parameters (embedding, norms, lm_head) are stored as float32."""
    from jaxquant.models.llama import flat_params

    flat = flat_params(params)
    tensors: dict[str, np.ndarray] = {}
    first: IntCodes | None = None
    floats = {}
    for path, v in flat.items():
        names = float_tensor_names(path)
        if names is not None:
            if isinstance(v, QArray):
                raise ValueError(f"{path}: a quantized {path} has no place in a GPTQ/AWQ checkpoint")
            floats[path] = np.asarray(v, np.float32)
            continue
        if not isinstance(v, QArray):
            raise ValueError(f"{path}: every block linear must be quantized (float kernel found)")
        c = codes_of(v, path)
        perm = _rope_perm(config, path)
        if perm is not None:
            c = c.permute_columns(perm)
        if first is None:
            first = c
        elif (c.bits, c.group_size, c.sym) != (first.bits, first.group_size, first.sym):
            raise ValueError(
                f"{path}: {c.bits} bits, group {c.group_size}, sym={c.sym} differs from the other layers' "
                f"{first.bits}/{first.group_size}/{first.sym}; a checkpoint has one quantization config"
            )
        module = hf_module(path)
        for key, arr in convert(c, path).items():
            tensors[f"{module}.{key}"] = arr
    if first is None:
        raise ValueError("no quantized block linears to export")
    for path, w in floats.items():
        name, is_kernel = float_tensor_names(path)
        tensors[name] = np.ascontiguousarray(w.T if is_kernel else w)
    return tensors, first


def _save(folder, config, tensors, qconfig, extra_files, tokenizer):
    from safetensors.numpy import save_file

    from jaxquant.models.hf_loader import config_to_hf

    files = {"model.safetensors": lambda p: save_file(tensors, p, metadata={"format": "pt"})}
    files.update(extra_files)
    if tokenizer is not None:
        files["tokenizer.json"] = lambda p: open(p, "w", encoding="utf-8").write(tokenizer.hf.to_str())
        meta = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "add_bos": tokenizer.add_bos}
        files["jaxquant_tokenizer.json"] = write_json(meta)
    hf = config_to_hf(dataclasses.replace(config, rope_style="half"), torch_dtype="float16")
    hf["quantization_config"] = qconfig
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    files["config.json"] = write_json(hf)
    return write_checkpoint_folder(os.fspath(folder), files)


def save_gptq_checkpoint(
    folder: str | os.PathLike[str], config: Any, params: Mapping[str, Any], *, tokenizer: Any = None
) -> str:
    """Write an HF GPTQ (v1) checkpoint folder for a model whose block linears are integer QArrays.

    All block linears must share bits/group size/symmetry (one ``quantization_config``); embedding, norms
    and an untied ``lm_head`` must be float. ``desc_act`` is true when any layer carries an act-order
    ``g_idx``.
    """
    tensors, c = export_layers(config, params, lambda codes, where: _to_gptq_codes(codes, where))
    desc_act = any(
        not np.array_equal(v, (np.arange(v.shape[0]) // c.group_size) if c.group_size > 0 else np.zeros(v.shape[0]))
        for k, v in tensors.items()
        if k.endswith(".g_idx")
    )
    qcfg = {
        "quant_method": "gptq",
        "bits": c.bits,
        "group_size": c.group_size,
        "desc_act": bool(desc_act),
        "sym": bool(c.sym),
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "damp_percent": 0.01,
    }
    auto_gptq = {k: v for k, v in qcfg.items() if k != "quant_method"} | {"model_file_base_name": "model"}
    return _save(folder, config, tensors, qcfg, {"quantize_config.json": write_json(auto_gptq)}, tokenizer)


def read_checkpoint(folder: str) -> tuple[Any, dict[str, Any], dict[str, np.ndarray], Any]:
    """(LlamaConfig, config.json dict, all tensors, tokenizer or None) of a quantized HF folder."""
    from jaxquant.models.hf_loader import config_from_hf
    from jaxquant.models.tokenizer import TextTokenizer

    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    config = config_from_hf(cfg, where=cfg_path)
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(folder, name))[0])
    tok = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tok = TextTokenizer.from_folder(folder)
    return config, cfg, tensors, tok


def import_layers(config: Any, tensors: Mapping[str, np.ndarray], decode, dtype: str = "float32") -> dict[str, Any]:
    """Nested params from HF tensors; ``decode(layer_tensors, where) -> QArray`` for each quantized module."""
    from jaxquant.models.llama import param_shapes, unflatten_params

    flat: dict[str, Any] = {}
    modules: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for name, arr in tensors.items():
        m = HF_LINEAR_RE.fullmatch(name)
        if m:
            modules.setdefault(f"model.layers.{m.group(1)}.{m.group(2)}", {})[m.group(3)] = arr
            continue
        p = float_param_path(name)
        if p is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            unknown.append(name)
            continue
        a = np.asarray(arr, np.float32)
        flat[p] = a.T if p == "lm_head/kernel" else a
    if unknown:
        raise ValueError(f"unexpected tensors in the checkpoint: {unknown[:6]}")
    for module, t in modules.items():
        flat[param_path(module)] = decode(t, module)
    if config.tie_embeddings:
        flat.pop("lm_head/kernel", None)
    want = param_shapes(config)
    if set(want) != set(flat):
        raise ValueError(
            f"checkpoint does not match its config: missing {sorted(set(want) - set(flat))[:6]}, "
            f"unexpected {sorted(set(flat) - set(want))[:6]}"
        )
    for k, s in want.items():
        if tuple(flat[k].shape) != tuple(s):
            raise ValueError(f"{k}: shape {tuple(flat[k].shape)}, config implies {s}")
    return unflatten_params(flat)


def load_gptq_checkpoint(folder: str | os.PathLike[str]) -> tuple[Any, dict[str, Any], Any]:
    """``(config, params, tokenizer)`` of an HF GPTQ folder; kernels are QArrays (``config.rope_style ==
    "half"``: build the model with ``Llama.from_params(config, params)``)."""
    config, cfg, tensors, tok = read_checkpoint(os.fspath(folder))
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "gptq":
        raise ValueError(
            f"{folder}: config.json quantization_config.quant_method is {q.get('quant_method')!r}, not 'gptq'"
        )
    fmt = q.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise ValueError(f"{folder}: checkpoint_format {fmt!r} is not supported (only v1 'gptq')")
    bits, gs, sym = int(q.get("bits", 4)), int(q.get("group_size", 128)), bool(q.get("sym", True))

    def decode(t, where):
        return _codes_to_qarray(_codes_from_gptq(t, bits, gs, sym, where), "float32")

    return config, import_layers(config, tensors, decode), tok
