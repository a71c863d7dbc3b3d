"""Shared pieces of the HF GPTQ / AWQ checkpoint formats: integer codes of IntScheme QArrays, 32-bit word
packing, safetensors folders written atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxquant.core import packing
from jaxquant.core.layout import relayout
from jaxquant.core.qarray import QArray
from jaxquant.schemes.rtn import IntScheme

__all__ = [
    "IntCodes",
    "codes_of",
    "int_qarray",
    "pack_words",
    "read_safetensors",
    "unpack_words",
    "write_checkpoint_folder",
]

_HF_LAYER = {
    "self_attn.q_proj": "attn/q_proj/kernel",
    "self_attn.k_proj": "attn/k_proj/kernel",
    "self_attn.v_proj": "attn/v_proj/kernel",
    "self_attn.o_proj": "attn/o_proj/kernel",
    "mlp.gate_proj": "mlp/gate_proj/kernel",
    "mlp.up_proj": "mlp/up_proj/kernel",
    "mlp.down_proj": "mlp/down_proj/kernel",
}
_HF_NORM = {"input_layernorm": "attn_norm/scale", "post_attention_layernorm": "mlp_norm/scale"}
HF_LINEAR_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(\w+)")


def hf_module(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` for ``layers/3/attn/q_proj/kernel``."""
    inv = {v: k for k, v in _HF_LAYER.items()}
    m = re.fullmatch(r"layers/(\d+)/(.+)", path)
    if not m or m.group(2) not in inv:
        raise ValueError(f"{path!r} is not a block linear kernel")
    return f"model.layers.{int(m.group(1))}.{inv[m.group(2)]}"


def param_path(module: str) -> str:
    """Inverse of :func:`hf_module`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if not m or m.group(2) not in _HF_LAYER:
        raise ValueError(f"{module!r} is not a known linear module")
    return f"layers/{int(m.group(1))}/{_HF_LAYER[m.group(2)]}"


def float_tensor_names(path: str) -> tuple[str, bool] | None:
    """(HF tensor name, is_kernel) of a float parameter (embedding, norms, lm_head)."""
    if path == "embed/embedding":
        return "model.embed_tokens.weight", False
    if path == "norm/scale":
        return "model.norm.weight", False
    if path == "lm_head/kernel":
        return "lm_head.weight", True
    m = re.fullmatch(r"layers/(\d+)/(.+)", path)
    if m:
        inv = {v: k for k, v in _HF_NORM.items()}
        if m.group(2) in inv:
            return f"model.layers.{int(m.group(1))}.{inv[m.group(2)]}.weight", False
    return None


def float_param_path(name: str) -> str | None:
    """Inverse of :func:`float_tensor_names` (``None`` for other names)."""
    fixed = {"model.embed_tokens.weight": "embed/embedding", "model.norm.weight": "norm/scale"}
    if name in fixed:
        return fixed[name]
    if name == "lm_head.weight":
        return "lm_head/kernel"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _HF_NORM:
        return f"layers/{int(m.group(1))}/{_HF_NORM[m.group(2)]}"
    return None


# ------------------------------------------------------------------------------------------------------------
# integer codes
# ------------------------------------------------------------------------------------------------------------


class IntCodes:
    """Unpacked content of an integer-grid QArray: ``w = scale[g(k)] * (codes - zero[g(k)])``.

    Attributes: ``codes`` (K, N) int32, ``scales`` (G, N) float16, ``zeros`` (G, N) int32, ``g_idx`` (K,)
    int32, ``bits``, ``group_size`` (``-1``: one group), ``sym`` (codes come from a symmetric grid).
    """

    def __init__(self, codes, scales, zeros, g_idx, bits, group_size, sym):
        self.codes, self.scales, self.zeros, self.g_idx = codes, scales, zeros, g_idx
        self.bits, self.group_size, self.sym = bits, group_size, sym

    def permute_columns(self, perm: np.ndarray) -> IntCodes:
        return IntCodes(
            self.codes[:, perm],
            self.scales[:, perm],
            self.zeros[:, perm],
            self.g_idx,
            self.bits,
            self.group_size,
            self.sym,
        )


def codes_of(q: QArray, where: str = "") -> IntCodes:
    """The :class:`IntCodes` of a QArray of :class:`IntScheme` (group or channel granularity, float16 scales,
    symmetric or integer zero point) or of the act-order ``GroupIndexScheme``."""
    from jaxquant.formats.hf_gptq import GroupIndexScheme

    s = q.scheme
    k, n = q.shape
    if isinstance(s, GroupIndexScheme):
        codes = np.asarray(packing.unpack(q.data, s.bits, k)).astype(np.int32)
        return IntCodes(
            codes,
            np.asarray(q.scale, np.float16),
            np.asarray(q.zero).astype(np.int32),
            np.asarray(q.aux["g_idx"], np.int32),
            s.bits,
            s.group_size,
            False,
        )
    if not isinstance(s, IntScheme):
        raise ValueError(f"{where}: {type(s).__name__} has no GPTQ/AWQ layout (an IntScheme QArray is needed)")
    if s.granularity not in ("group", "channel"):
        raise ValueError(f"{where}: {s.describe()}: per-tensor scales have no GPTQ/AWQ layout")
    if s.scale_dtype != "float16":
        raise ValueError(f"{where}: GPTQ/AWQ store float16 scales; this QArray has {s.scale_dtype} scales")
    if not s.symmetric and s.range != "zeropoint":
        raise ValueError(f"{where}: range='minmax' (float minima) has no GPTQ/AWQ layout; use range='zeropoint'")
    if s.layout == "nk":  # K-major codes: the (K-packed, N) storage the formats hold is their transpose
        q = relayout(q, "kn")
    gs = s.group_size if s.granularity == "group" else -1
    g_idx = (np.arange(k) // gs if gs > 0 else np.zeros(k)).astype(np.int32)
    scales = np.asarray(q.scale, np.float16).reshape(-1, n)
    half = 1 << (s.bits - 1)
    if s.symmetric:
        if s.bits == 8:
            codes = np.asarray(q.data).astype(np.int32) + half
        else:
            codes = np.asarray(packing.unpack(q.data, s.bits, k)).astype(np.int32)
        zeros = np.full(scales.shape, half, np.int32)
    else:
        codes = np.asarray(packing.unpack(q.data, s.bits, k)).astype(np.int32)
        zeros = np.asarray(q.zero).astype(np.int32).reshape(-1, n)
    return IntCodes(codes, scales, zeros, g_idx, s.bits, gs, s.symmetric)


def int_qarray(c: IntCodes, dtype: str = "float32") -> QArray:
    """An IntScheme QArray for codes with a contiguous group index (symmetric storage when ``c.sym`` and the
    codes fit the restricted symmetric range, else integer zero points)."""
    import jax.numpy as jnp

    k, n = c.codes.shape
    gs = None if c.group_size == -1 else c.group_size
    half = 1 << (c.bits - 1)
    sym = c.sym and bool(np.all(c.zeros == half)) and bool(np.all(c.codes >= 1))
    scheme = IntScheme(bits=c.bits, group_size=gs, symmetric=sym)
    if gs is None:
        scale = c.scales.reshape(n)
        zero = c.zeros.reshape(n)
    else:
        scale, zero = c.scales, c.zeros
    if np.any(zero < 0) or np.any(zero > 255):
        raise ValueError("zero points outside 0..255 cannot be stored")
    if sym:
        if c.bits == 8:
            data = jnp.asarray((c.codes - half).astype(np.int8))
        else:
            data = packing.pack(jnp.asarray(c.codes.astype(np.uint8)), c.bits)
        zq = None
    else:
        data = packing.pack(jnp.asarray(c.codes.astype(np.uint8)), c.bits)
        zq = jnp.asarray(zero.astype(np.uint8))
    return QArray(data=data, scale=jnp.asarray(scale, jnp.float16), zero=zq, scheme=scheme, shape=(k, n), dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# 32-bit words
# ------------------------------------------------------------------------------------------------------------


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack (R, C) codes along axis 0 into int32 words as a little-endian bit stream: code ``r`` occupies stream
    bits ``[r*bits, (r+1)*bits)`` (low bits first; 3-bit codes straddle words). ``R*bits`` must be a multiple
    of 32. Returns ``(R*bits/32, C)`` int32."""
    r, c = codes.shape
    if (r * bits) % 32:
        raise ValueError(f"{r} codes of {bits} bits do not fill whole 32-bit words")
    pad = (-r) % 32
    x = np.concatenate([codes, np.zeros((pad, c), codes.dtype)]) if pad else codes
    x = x.astype(np.uint64).reshape(-1, 32, c)
    words = np.zeros((x.shape[0], bits + 1, c), np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(32):
        w, off = divmod(j * bits, 32)
        v = (x[:, j] & mask) << np.uint64(off)
        words[:, w] |= v & np.uint64(0xFFFFFFFF)
        words[:, w + 1] |= v >> np.uint64(32)
    out = words[:, :bits].reshape(-1, c)[: r * bits // 32]
    return out.astype(np.uint32).view(np.int32)


def unpack_words(words: np.ndarray, bits: int, r: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_words`: (W, C) int32 -> (W*32/bits, C) int32 codes (first ``r`` if given)."""
    w, c = words.shape
    n = w * 32 // bits
    pad = (-w) % bits
    u = words.astype(np.int64) & 0xFFFFFFFF
    if pad:
        u = np.concatenate([u, np.zeros((pad, c), np.int64)])
    u = u.reshape(-1, bits, c)
    u = np.concatenate([u, np.zeros((u.shape[0], 1, c), np.int64)], axis=1)
    out = np.empty((u.shape[0], 32, c), np.int64)
    mask = (1 << bits) - 1
    for j in range(32):
        wi, off = divmod(j * bits, 32)
        v = (u[:, wi] >> off) | (u[:, wi + 1] << (32 - off))
        out[:, j] = v & mask
    out = out.reshape(-1, c)[:n]
    return (out if r is None else out[:r]).astype(np.int32)


# ------------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------------

_MAX_HEADER = 100 * 2**20


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, after checking its header (clear errors for truncated or
    corrupt files instead of crashes or huge allocations)."""
    from safetensors.numpy import load_file

    check_safetensors(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    try:
        tensors = load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read safetensors file: {e}") from None
    return tensors, meta


def check_safetensors(path: str) -> dict[str, Any]:
    """Validate a safetensors header (size, JSON, dtype/shape/offsets inside the file); returns it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header size")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a valid safetensors file: header size {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: header is not a JSON object")
    data_len = size - 8 - n
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    sizes |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (a, b) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dt not in sizes or any(s < 0 for s in shape):
            raise ValueError(f"{path}: tensor {name!r} has an unsupported dtype {dt!r} or shape {shape}")
        if not (0 <= a <= b <= data_len):
            raise ValueError(f"{path}: tensor {name!r} has data offsets [{a}, {b}) beyond the file's {data_len} bytes")
        if b - a != int(np.prod(shape, dtype=np.int64)) * sizes[dt]:
            raise ValueError(f"{path}: tensor {name!r} has {b - a} bytes for shape {shape} of {dt}")
    return header


def write_checkpoint_folder(folder: str, files: Mapping[str, Callable[[str], None]]) -> str:
    """Write several files into ``folder`` atomically: each ``files[name](tmp_path)`` writes one file into a
    temporary folder beside ``folder``; then they are moved in with ``os.replace``, ``config.json`` last."""
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        for name, write in files.items():
            write(os.path.join(tmpdir, name))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise FileExistsError(f"{folder} exists and is not a folder")
        os.makedirs(folder, exist_ok=True)
        names = sorted(files, key=lambda x: x == "config.json")
        for name in names:
            os.replace(os.path.join(tmpdir, name), os.path.join(folder, name))
        return folder
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_json(obj: Any) -> Callable[[str], None]:
    def w(path: str) -> None:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)

    return w
