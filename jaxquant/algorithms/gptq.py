"""GPTQ for a whole Llama model: calibration windows -> per-input Hessians -> :func:`gptq_core.gptq` per layer.

The model-level driver walks the blocks with :func:`jaxquant.calibrate.run_blockwise`. Linear layers that read
the same input share one Hessian ``H = sum_t c_t x_t x_t^T / sum_t c_t`` and are quantized in one call on their
kernels concatenated along the output axis (q|k|v, gate|up): GPTQ treats output columns independently and
act-order depends on ``H`` only, so this equals separate calls (and ``vmap``), only faster.

Token weighting (``first_token_weight``): position 0 of every window is the attention sink of this
protocol (no BOS; every later token attends to it heavily and it carries massive activations). Its
rows of ``X`` enter ``H`` with weight ``c_0 = first_token_weight`` instead of 1, so GPTQ protects the
directions the sink excites. See the README section on GPTQ vs RTN for the measurements behind the default.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.gptq_core import _static_params, check_gptq_scheme, gptq, gptq_with_stats
from jaxquant.calibrate import LINEARS, InputStats, run_blockwise
from jaxquant.core.qarray import QArray
from jaxquant.models.llama import Llama
from jaxquant.schemes.rtn import IntScheme

__all__ = [
    "GPTQConfig",
    "LayerRecord",
    "calibration_windows_for",
    "gptq",
    "gptq_blocks",
    "gptq_model",
    "gptq_with_stats",
    "position_weights",
    "split_columns",
]


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """Options of :func:`gptq_model` (defaults: the recipe measured in the README).

    Attributes:
      scheme: the target :class:`IntScheme`.
      n_samples: calibration windows.
      seq_len: tokens per calibration window.
      seed: window sampling seed (:func:`jaxquant.eval.calibration_windows`).
      damp: GPTQ damping, a fraction of ``mean(diag(H))``.
      block_size: lazy-batch block (speed only).
      act_order: quantize input rows by decreasing ``diag(H)``.
      static_groups: group parameters from the original weights (no ``g_idx`` needed with act-order).
      sequential: calibrate block ``l`` on the outputs of the quantized blocks ``< l``.
      true_sequential: also inside a block (q/k/v, then o, then gate/up, then down).
      first_token_weight: weight of position 0 of each window in the Hessian (the attention sink).
      clip_search: choose each group's grid by AWQ's clipping search (:func:`jaxquant.algorithms.awq.search_clip`,
        error through the diagonal blocks of ``H``) instead of min/max; needs static groups (or per-channel).
      batch_size: windows per compiled forward call.
    """

    scheme: IntScheme
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    sequential: bool = True
    true_sequential: bool = True
    first_token_weight: float = 1.0
    clip_search: bool = False
    batch_size: int = 8

    def __post_init__(self):
        check_gptq_scheme(self.scheme)
        if self.clip_search and self.scheme.granularity == "group" and not self.static_groups:
            raise ValueError("GPTQConfig.clip_search fixes the grid up front: it needs static_groups=True")
        for name in ("n_samples", "seq_len", "block_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTQConfig.{name} must be a positive int, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"GPTQConfig.seq_len must be at least 2, got {self.seq_len}")
        if not (isinstance(self.damp, int | float) and 0 <= self.damp < 1e6):
            raise ValueError(f"GPTQConfig.damp must be a float >= 0, got {self.damp!r}")
        if not (isinstance(self.first_token_weight, int | float) and self.first_token_weight >= 0):
            raise ValueError(f"GPTQConfig.first_token_weight must be >= 0, got {self.first_token_weight!r}")
        for name in ("act_order", "static_groups", "sequential", "true_sequential", "clip_search"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTQConfig.{name} must be a bool")


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What one GPTQ call did: layer, input group, kernels, losses (see :class:`GPTQStats`) and seconds."""

    layer: int
    group: str
    linears: tuple[str, ...]
    loss: float
    rtn_loss: float
    ref: float
    damp: float
    seconds: float

    @property
    def gain(self) -> float:
        """``rtn_loss / loss``: how many times GPTQ lowered the calibration output error."""
        return self.rtn_loss / self.loss if self.loss > 0 else float("inf")


def position_weights(seq_len: int, first_token_weight: float) -> np.ndarray | None:
    """``(seq_len,)`` ones with position 0 set to ``first_token_weight`` (``None`` when it is 1)."""
    if first_token_weight == 1:
        return None
    pw = np.ones((seq_len,), np.float32)
    pw[0] = first_token_weight
    return pw


def split_columns(q: QArray, sizes: list[int]) -> list[QArray]:
    """Split a QArray of an IntScheme along its output axis into pieces of ``sizes`` columns.

    Codes are packed along the input axis, so every field is sliced along its last axis (the first of K-major
    ``data``); ``aux`` arrays indexed by input row (``g_idx``) are shared.
    """
    if not isinstance(q, QArray) or not isinstance(q.scheme, IntScheme):
        raise TypeError("split_columns expects a QArray of an IntScheme")
    k, n = q.shape
    if sum(sizes) != n or any(s < 1 for s in sizes):
        raise ValueError(f"split_columns: sizes {sizes} do not partition {n} columns")
    out, a = [], 0
    for s in sizes:
        b = a + s

        def cut(x, a=a, b=b):
            return None if x is None else x[..., a:b]

        kmajor = getattr(q.scheme, "layout", "kn") == "nk"  # data (N, packed rows): columns are its rows
        out.append(
            QArray(
                data=q.data[a:b] if kmajor else cut(q.data),
                scale=cut(q.scale),
                zero=cut(q.zero),
                aux=dict(q.aux),
                scheme=q.scheme,
                shape=(k, s),
                dtype=q.dtype,
            )
        )
        a = b
    return out


def calibration_windows_for(calib_tokens: Any, n_samples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``(n_samples, seq_len)`` random windows of the calibration token stream (see
    :func:`jaxquant.eval.calibration_windows`); a 2-D array is taken as ready-made windows."""
    from jaxquant.eval.perplexity import calibration_windows

    arr = np.asarray(calib_tokens)
    if arr.ndim == 2:
        return arr.astype(np.int32)
    return calibration_windows(arr, n_samples, seq_len, seed)


def _group_fn(config: GPTQConfig, records: list[LayerRecord], mesh: Any = None) -> Any:
    """The :func:`jaxquant.calibrate.run_blockwise` callback of GPTQ (appends one record per call).

    With a ``mesh`` that has a ``model`` axis of size > 1, each GPTQ call runs column-parallel over it
    (:func:`jaxquant.sharding.gptq_column_parallel_with_stats`: bit-identical codes for the same Hessian).
    """
    tp = int(mesh.shape["model"]) if mesh is not None and "model" in mesh.shape else 1

    def group_fn(li: int, group: str, st: InputStats, block: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        names = LINEARS[group]
        ws = [jnp.asarray(block[nm]) for nm in names]
        w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=1)
        h = st.hessian
        group_params = None
        if config.clip_search:
            from jaxquant.algorithms.awq import search_clip  # awq imports this module

            wc, _ = search_clip(w, h, config.scheme)
            scale, zero = _static_params(wc, config.scheme)
            if config.scheme.granularity == "channel":
                scale, zero = scale[0], zero[0]
            group_params = (scale, zero)
        kw = dict(
            damp=config.damp,
            block_size=config.block_size,
            act_order=config.act_order,
            static_groups=config.static_groups,
            group_params=group_params,
        )
        if tp > 1 and w.shape[1] % tp == 0:
            from jaxquant.sharding import gptq_column_parallel_with_stats

            q, s = gptq_column_parallel_with_stats(w, h, config.scheme, mesh, axis="model", **kw)
        else:
            q, s = gptq_with_stats(w, h, config.scheme, **kw)
        parts = [q] if len(ws) == 1 else split_columns(q, [x.shape[1] for x in ws])
        block = dict(block)
        for nm, p in zip(names, parts):
            block[nm] = p
        records.append(
            LayerRecord(
                li,
                group,
                tuple(names),
                float(s.loss),
                float(s.rtn_loss),
                float(s.ref),
                float(s.damp),
                time.perf_counter() - t0,
            )
        )
        return block

    return group_fn


def gptq_model(
    model: Llama,
    calib_tokens: Any,
    config: GPTQConfig,
    *,
    progress: bool = True,
) -> tuple[dict[str, Any], list[LayerRecord]]:
    """GPTQ-quantize every linear layer of every block of ``model``.

    Args:
      model: float :class:`~jaxquant.models.Llama`.
      calib_tokens: 1-D calibration token stream (windows are drawn from it) or ready ``(n, seq_len)`` windows.
      config: :class:`GPTQConfig`.
      progress: progress bar.

    Returns:
      ``(params, records)``: ``model_params``-style dict with QArrays for the block linears, and one
      :class:`LayerRecord` per GPTQ call (per input group per block).
    """
    if not isinstance(config, GPTQConfig):
        raise TypeError(f"gptq_model: config must be a GPTQConfig, got {type(config).__name__}")
    windows = calibration_windows_for(calib_tokens, config.n_samples, config.seq_len, config.seed)
    records: list[LayerRecord] = []
    group_fn = _group_fn(config, records)
    params = run_blockwise(
        model,
        windows,
        group_fn=group_fn,
        sequential=config.sequential,
        true_sequential=config.true_sequential,
        batch_size=config.batch_size,
        position_weights=position_weights(windows.shape[1], config.first_token_weight),
        progress=progress,
        desc="gptq",
    )
    return params, records


def gptq_blocks(
    model_config: Any,
    embedding: Any,
    get_block: Any,
    calib_tokens: Any,
    config: GPTQConfig,
    on_block: Any,
    *,
    progress: bool = True,
    mesh: Any = None,
) -> list[LayerRecord]:
    """GPTQ block by block for a model that is never whole in memory (see :func:`jaxquant.calibrate.walk_blocks`).

    ``get_block(layer)`` returns block ``layer``'s flat float parameters; ``on_block(layer, block)`` receives
    the quantized block (QArrays for the seven linears) as soon as it is done. Computes exactly what
    :func:`gptq_model` computes (same windows, same callbacks). Returns the :class:`LayerRecord` list.
    ``mesh``: data-parallel calibration over its ``data`` axis (see :func:`jaxquant.calibrate.walk_blocks`)
    and column-parallel GPTQ over its ``model`` axis (:func:`_group_fn`).
    """
    from jaxquant.calibrate import walk_blocks

    if not isinstance(config, GPTQConfig):
        raise TypeError(f"gptq_blocks: config must be a GPTQConfig, got {type(config).__name__}")
    windows = calibration_windows_for(calib_tokens, config.n_samples, config.seq_len, config.seed)
    records: list[LayerRecord] = []
    walk_blocks(
        model_config,
        embedding,
        get_block,
        windows,
        on_block,
        group_fn=_group_fn(config, records, mesh),
        sequential=config.sequential,
        true_sequential=config.true_sequential,
        batch_size=config.batch_size,
        position_weights=position_weights(windows.shape[1], config.first_token_weight),
        progress=progress,
        desc="gptq",
        mesh=mesh,
    )
    return records
