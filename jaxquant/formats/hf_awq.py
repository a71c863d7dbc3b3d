"""Hugging Face AWQ checkpoints (AutoAWQ "gemm" version, as transformers loads them), both directions.

Per linear layer with ``K`` inputs, ``N`` outputs and groups of ``g`` inputs (4-bit only)::

    qweight  int32 [K, N/8]     eight 4-bit codes of one input row per word, columns in the order
                                [0, 2, 4, 6, 1, 3, 5, 7]: bits 4i..4i+3 of word j hold column 8j + ORDER[i]
    qzeros   int32 [K/g, N/8]   zero points packed the same way (no -1, unlike GPTQ v1)
    scales   fp16  [K/g, N]

    w[k, n] = scales[k // g, n] * (code[k, n] - zero[k // g, n])

Exported QArrays are 4-bit :class:`~jaxquant.IntScheme` with groups dividing ``K`` (or per channel: one group
of ``K``), float16 scales, integer zero points or symmetric (zero 8). Import gives an IntScheme QArray whose
dequantized weights equal the checkpoint's exactly. Checkpoint folders are laid out as in
:mod:`jaxquant.formats.hf_gptq` with ``quantization_config = {"quant_method": "awq", "version": "gemm", ...}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxquant.core.qarray import QArray
from jaxquant.formats._hf_common import IntCodes, codes_of, int_qarray
from jaxquant.formats.hf_gptq import _save, export_layers, import_layers, read_checkpoint

__all__ = ["AWQ_ORDER", "from_awq", "load_awq_checkpoint", "save_awq_checkpoint", "to_awq"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_awq(codes: np.ndarray) -> np.ndarray:
    """(R, N) 4-bit codes -> (R, N/8) int32 in AWQ's interleaved column order."""
    r, n = codes.shape
    if n % 8:
        raise ValueError(f"AWQ packs 8 output columns per word; {n} columns is not a multiple of 8")
    c = codes.astype(np.uint32).reshape(r, n // 8, 8)
    out = np.zeros((r, n // 8), np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        out |= (c[:, :, col] & 0xF) << np.uint32(4 * i)
    return out.view(np.int32)


def _unpack_awq(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_awq`: (R, N/8) int32 -> (R, N) int32 codes."""
    u = np.asarray(words).astype(np.int64) & 0xFFFFFFFF
    r, m = u.shape
    out = np.zeros((r, m, 8), np.int32)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (u >> (4 * i)) & 0xF
    return out.reshape(r, m * 8)


def _to_awq_codes(c: IntCodes, where: str) -> dict[str, np.ndarray]:
    k = c.codes.shape[0]
    if c.bits != 4:
        raise ValueError(f"{where}: AWQ GEMM checkpoints are 4-bit, this QArray has {c.bits} bits")
    gs = k if c.group_size == -1 else c.group_size
    if k % gs:
        raise ValueError(f"{where}: AWQ needs groups that divide in_features ({k} inputs, group {gs})")
    if not np.array_equal(c.g_idx, np.arange(k) // gs):
        raise ValueError(f"{where}: act-order (g_idx) layers have no AWQ layout")
    return {
        "qweight": _pack_awq(c.codes),
        "qzeros": _pack_awq(c.zeros),
        "scales": np.ascontiguousarray(c.scales.astype(np.float16)),
    }


def to_awq(q: QArray, *, where: str = "QArray") -> dict[str, np.ndarray]:
    """The AWQ GEMM tensors ``{"qweight", "qzeros", "scales"}`` of a 4-bit integer QArray."""
    return _to_awq_codes(codes_of(q, where), where)


def _codes_from_awq(t: Mapping[str, np.ndarray], group_size: int, sym: bool, where: str) -> IntCodes:
    try:
        qweight, qzeros, scales = (np.asarray(t[x]) for x in ("qweight", "qzeros", "scales"))
    except KeyError as e:
        raise ValueError(f"{where}: missing AWQ tensor {e}") from None
    if qweight.ndim != 2 or qzeros.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"{where}: qweight/qzeros/scales must be 2-D")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    gs = k if group_size == -1 else group_size
    if gs <= 0 or k % gs or scales.shape != (k // gs, n) or qzeros.shape != (k // gs, n // 8):
        raise ValueError(
            f"{where}: inconsistent AWQ shapes qweight {qweight.shape}, qzeros {qzeros.shape}, scales "
            f"{scales.shape} for group size {group_size}"
        )
    return IntCodes(
        _unpack_awq(qweight),
        scales.astype(np.float16),
        _unpack_awq(qzeros),
        (np.arange(k) // gs).astype(np.int32),
        4,
        group_size,
        sym,
    )


def from_awq(
    tensors: Mapping[str, np.ndarray], *, group_size: int, sym: bool = False, dtype: str = "float32"
) -> QArray:
    """A 4-bit IntScheme QArray from one layer's AWQ GEMM tensors (``group_size = -1``: per channel)."""
    return int_qarray(_codes_from_awq(tensors, group_size, sym, "AWQ layer"), dtype)


def save_awq_checkpoint(
    folder: str | os.PathLike[str], config: Any, params: Mapping[str, Any], *, tokenizer: Any = None
) -> str:
    """Write an HF AWQ (GEMM) checkpoint folder for a model whose block linears are 4-bit IntScheme QArrays
    sharing one group size; embedding, norms and an untied ``lm_head`` must be float."""
    tensors, c = export_layers(config, params, _to_awq_codes)
    qcfg = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": c.group_size,
        "zero_point": not c.sym,
        "version": "gemm",
    }
    return _save(folder, config, tensors, qcfg, {}, tokenizer)


def load_awq_checkpoint(folder: str | os.PathLike[str]) -> tuple[Any, dict[str, Any], Any]:
    """``(config, params, tokenizer)`` of an HF AWQ GEMM folder; kernels are IntScheme QArrays (HF q/k layout)."""
    config, cfg, tensors, tok = read_checkpoint(os.fspath(folder))
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "awq":
        raise ValueError(f"{folder}: quantization_config.quant_method is {q.get('quant_method')!r}, not 'awq'")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{folder}: AWQ version {version!r} is not supported (only 'gemm')")
    if int(q.get("bits", q.get("w_bit", 4))) != 4:
        raise ValueError(f"{folder}: AWQ GEMM checkpoints are 4-bit")
    gs = int(q.get("group_size", q.get("q_group_size", 128)))
    sym = not bool(q.get("zero_point", True))

    def decode(t, where):
        return int_qarray(_codes_from_awq(t, gs, sym, where), "float32")

    return config, import_layers(config, tensors, decode), tok
