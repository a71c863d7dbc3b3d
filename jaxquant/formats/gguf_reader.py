"""Read GGUF tensors as QArrays without dequantizing them (a Q4_K model stays Q4_K in memory and runs through
``jaxquant.qdot``), with strict checks of the file before anything is parsed.

::

    from jaxquant.formats.gguf_reader import load_gguf_quantized_model
    model, tok = load_gguf_quantized_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # kernels are QArrays

Tensors of a block type jaxquant implements (:data:`~jaxquant.formats.gguf_blocks.GGUF_TYPES`) become
``QArray``\\ s of :class:`~jaxquant.formats.gguf_blocks.GGUFScheme` whose ``data`` are the file's bytes; F32,
F16 and BF16 tensors become float32 arrays; other types (IQ*, MXFP4...) are dequantized by gguf-py into float32
(documented fallback, so any llama GGUF still loads).
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from jaxquant.formats.gguf_blocks import GGUF_TYPES, GGUFScheme, type_info
from jaxquant.models._gguf import GGUFError, open_gguf

__all__ = [
    "GGUFError",
    "check_gguf_file",
    "load_gguf_quantized",
    "load_gguf_quantized_model",
    "read_gguf_tensors",
]

_MIN_KV_BYTES = 8 + 4 + 1  # key length + value type + at least one byte of value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


def check_gguf_file(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Check a GGUF header before parsing: magic, version, and that the tensor and key counts can fit in the
    file (so a corrupt count cannot make a reader loop or allocate for billions of entries).

    Returns:
      ``(version, tensor_count, kv_count)``.

    Raises:
      FileNotFoundError: no such file.
      GGUFError (a ``ValueError``): not a GGUF file, truncated header, unsupported version, absurd counts.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not os.path.isfile(path):
        raise GGUFError(f"{path} is not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, expected the magic b'GGUF'")
    if len(head) < 24:
        raise GGUFError(f"{path} is truncated: {size} bytes, shorter than the 24-byte GGUF header")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    room = size - 24
    if n_tensors * _MIN_TENSOR_INFO_BYTES > room or n_kv * _MIN_KV_BYTES > room:
        raise GGUFError(
            f"{path} is corrupt: its header declares {n_tensors} tensors and {n_kv} metadata keys, which cannot "
            f"fit in a {size}-byte file"
        )
    return version, n_tensors, n_kv


def _open(path: str) -> Any:
    check_gguf_file(path)
    reader = open_gguf(path)
    size = os.path.getsize(path)
    for t in reader.tensors:
        if int(t.data_offset) < 0 or int(t.data_offset) > size:
            raise GGUFError(f"{path}: tensor {t.name!r} has data offset {int(t.data_offset)} beyond the file")
    return reader


def _tensor_value(t: Any, *, kernel: bool, path: str) -> Any:
    """A GGUF tensor as a QArray (supported block types) or a float32 numpy array."""
    import gguf

    qt = t.tensor_type
    ne = [int(n) for n in t.shape]  # ggml order: ne[0] = row length
    np_shape = tuple(reversed(ne))
    if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        w = np.array(gguf.quants.dequantize(t.data, qt), dtype=np.float32).reshape(np_shape)
        if not np.all(np.isfinite(w)):
            raise GGUFError(f"{path}: tensor {t.name!r} holds NaN/Inf values")
        return w.T if kernel else w
    if qt.name in GGUF_TYPES and len(ne) == 2:
        info = type_info(qt.name)
        data = np.array(t.data, dtype=np.uint8, copy=True)
        rows, n = np_shape
        want = (rows, n // info.block_size * info.type_size)
        if n % info.block_size or data.size != want[0] * want[1]:
            raise GGUFError(f"{path}: tensor {t.name!r} of type {qt.name} has {data.size} bytes, expected {want}")
        data = data.reshape(want)
        shape = (n, rows) if kernel else (rows, n)
        return GGUFScheme(qt.name, transpose=kernel).from_bytes(data, shape)
    try:  # a type jaxquant does not implement: dequantize with gguf-py
        w = np.array(gguf.quants.dequantize(t.data, qt), dtype=np.float32).reshape(np_shape)
    except Exception as e:
        raise GGUFError(f"{path}: cannot read tensor {t.name!r} of type {qt.name}: {e}") from None
    return w.T if kernel else w


def read_gguf_tensors(path: str | os.PathLike[str], *, kernels: bool = False) -> dict[str, Any]:
    """Every tensor of a GGUF file by name: QArrays for the supported block types, float32 arrays otherwise.

    ``kernels=True`` returns 2-D tensors as Flax kernels ``(in, out)`` (``GGUFScheme(transpose=True)``, the
    same bytes); by default they keep the file's numpy orientation ``(rows, row_len)``.
    """
    path = os.fspath(path)
    reader = _open(path)
    out = {}
    for t in reader.tensors:
        out[t.name] = _tensor_value(t, kernel=kernels and len(t.shape) == 2, path=path)
    return out


def load_gguf_quantized(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any], Any]:
    """Like :func:`jaxquant.models.load_gguf`, but quantized tensors stay quantized (QArrays).

    Returns ``(config, params, tokenizer)``; ``params`` is a nested dict in
    :func:`jaxquant.models.model_params` layout whose linear kernels (and embedding) are QArrays when the file
    stores them in a supported block type.
    """
    from jaxquant.models.gguf_loader import _BLK_RE, _BLOCK_MAP, config_from_gguf
    from jaxquant.models.llama import param_shapes, unflatten_params
    from jaxquant.models.tokenizer import tokenizer_from_gguf

    path = os.fspath(path)
    reader = _open(path)
    config = config_from_gguf(reader, path=path)
    flat: dict[str, Any] = {}
    unknown = []
    for t in reader.tensors:
        name = t.name
        if name == "token_embd.weight":
            flat["embed/embedding"] = _tensor_value(t, kernel=False, path=path)
        elif name == "output_norm.weight":
            flat["norm/scale"] = _tensor_value(t, kernel=False, path=path)
        elif name == "output.weight":
            flat["lm_head/kernel"] = _tensor_value(t, kernel=True, path=path)
        elif (m := _BLK_RE.fullmatch(name)) and m.group(2) in _BLOCK_MAP:
            sub, leaf = _BLOCK_MAP[m.group(2)]
            flat[f"layers/{int(m.group(1))}/{sub}/{leaf}"] = _tensor_value(t, kernel=leaf == "kernel", path=path)
        else:
            unknown.append(name)
    if unknown:
        raise GGUFError(f"{path}: tensors not understood by the llama loader: {unknown[:8]}")
    want = param_shapes(config)
    if set(want) != set(flat):
        missing = sorted(set(want) - set(flat))
        extra = sorted(set(flat) - set(want))
        raise GGUFError(f"{path}: parameters missing {missing[:6]} / unexpected {extra[:6]}")
    for k, s in want.items():
        if tuple(flat[k].shape) != tuple(s):
            raise GGUFError(f"{path}: parameter {k} has shape {tuple(flat[k].shape)}, config implies {s}")
    tok = tokenizer_from_gguf(reader, name=path) if "tokenizer.ggml.model" in reader.fields else None
    return config, unflatten_params(flat), tok


def load_gguf_quantized_model(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """``(Llama, tokenizer)`` with QArray kernels straight from the file (see :func:`load_gguf_quantized`)."""
    from jaxquant.models.llama import Llama

    config, params, tok = load_gguf_quantized(path)
    return Llama.from_params(config, params), tok
