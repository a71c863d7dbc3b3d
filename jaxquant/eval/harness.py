"""The evaluation harness behind ``jaxquant eval`` and ``jaxquant demo``: quantize a model by SPEC, measure
perplexity, size and time."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from flax import nnx

from jaxquant.eval import assets, text
from jaxquant.eval.memory import peak_rss_bytes, tree_nbytes
from jaxquant.eval.perplexity import encode, perplexity
from jaxquant.io.checkpoint import is_checkpoint
from jaxquant.io.checkpoint import load_model as load_saved_model
from jaxquant.io.streaming import is_streamed, load_streamed
from jaxquant.models import Llama, load_model, model_params, with_params
from jaxquant.nn.layers import weight_params
from jaxquant.specs import Spec, parse_spec
from jaxquant.transform import quantize_params, report

__all__ = ["EvalResult", "LoadedModel", "evaluate", "load", "quantize_model"]


@dataclasses.dataclass
class LoadedModel:
    """A model with its tokenizer and tokenized evaluation text (calibration tokens on first use)."""

    name: str
    model: Llama
    tokenizer: Any
    eval_tokens: Any
    load_seconds: float
    saved_spec: str | None = None
    text_file: str | os.PathLike[str] | None = None
    _calib_tokens: Any = None

    @property
    def calib_tokens(self) -> Any:
        """Token ids of the calibration split (tokenized on first access)."""
        if self._calib_tokens is None:
            calib = text.calib_text(text_file=self.text_file) if self.text_file is not None else text.calib_text()
            self._calib_tokens = encode(calib, self.tokenizer)
        return self._calib_tokens


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One row of an evaluation: what ``jaxquant eval --json`` prints."""

    scheme: str
    model: str
    ppl: float
    bits_per_weight: float
    weight_bytes: int
    tokens: int
    seconds: float
    quantize_seconds: float
    peak_rss_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load(model: str = "smollm2-135m", text_file: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Fetch (if needed) and load a model and tokenize its evaluation text.

    Args:
      model: ``"smollm2-135m"`` (fetched into the cache), a path to a ``.gguf`` file / HF checkpoint folder, or a
        folder written by ``jaxquant quantize`` / :func:`jaxquant.io.checkpoint.save_model` or by
        ``jaxquant quantize --stream`` / :func:`jaxquant.io.streaming.stream_quantize` (already quantized).
      text_file: a plain-text file to evaluate on (its second half, see :mod:`jaxquant.eval.text`); default:
        the evaluation split of the bundled Wikipedia articles.
    """
    t0 = time.perf_counter()
    path = assets.model_path(model)
    saved_spec = None
    if is_checkpoint(path):
        m, tok, meta = load_saved_model(path)
        saved_spec = meta.get("spec")
    elif is_streamed(path):
        m, tok, meta = load_streamed(path)
        saved_spec = meta.get("spec")
    else:
        m, tok = load_model(path)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer found (an HF folder needs tokenizer.json)")
    ev = text.eval_text(text_file=text_file) if text_file is not None else text.eval_text()
    tokens = encode(ev, tok)
    return LoadedModel(str(model), m, tok, tokens, time.perf_counter() - t0, saved_spec=saved_spec, text_file=text_file)


def quantize_model(
    model: Llama, spec: Spec, calib_tokens: Any = None, options: dict[str, Any] | None = None
) -> tuple[Llama, Any]:
    """Apply a SPEC to a model; returns ``(quantized model, report)``.

    Calibrated SPECs (``spec.build``) need ``calib_tokens`` (1-D token ids of the calibration split).
    Layer-swapping SPECs (``spec.build_model``) return a model with :mod:`jaxquant.nn` layers; the report then
    covers its ``nnx.Param`` and ``QWeight`` values (:func:`jaxquant.nn.weight_params`).
    """
    if spec.build_model is not None:
        qmodel = spec.build_model(model, calib_tokens, dict(options or {}))
        return qmodel, report(weight_params(qmodel))
    params = model_params(model)
    if spec.build is not None:
        if calib_tokens is None:
            raise ValueError(f"SPEC {spec.name!r} is calibrated and needs calibration tokens")
        qparams = spec.build(model, calib_tokens, dict(options or {}))
    elif spec.rules:
        qparams = quantize_params(params, list(spec.rules), strict=True)
    else:
        return model, report(weight_params(model))
    return with_params(model, qparams), report(qparams)


def _logits(graphdef):
    def fn(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    return fn


def evaluate(
    loaded: LoadedModel,
    spec: str | Spec,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    options: dict[str, Any] | None = None,
    mesh: Any = None,
) -> EvalResult:
    """Quantize ``loaded.model`` by ``spec`` and measure perplexity on its evaluation tokens.

    ``bits_per_weight`` is averaged over the quantized tensors only (16 for ``bf16``; 32 when nothing is
    quantized); ``weight_bytes`` counts every parameter. A model loaded from a saved quantized checkpoint is
    evaluated as saved with ``spec="fp32"`` (nothing more is quantized) and reported under its saved SPEC.
    With a ``mesh`` (:func:`jaxquant.sharding.make_mesh`) the quantized model's parameters are sharded over its
    ``model`` axis (:func:`jaxquant.sharding.shard_model`) and the forward passes run SPMD under ``jax.jit``.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    t0 = time.perf_counter()
    calib = loaded.calib_tokens if (spec.build is not None or getattr(spec, "build_model", None)) else None
    qmodel, rep = quantize_model(loaded.model, spec, calib, options)
    tq = time.perf_counter() - t0
    if mesh is not None:
        from jaxquant.sharding import shard_model

        qmodel = shard_model(qmodel, mesh)
    graphdef, state = nnx.split(qmodel)
    res = perplexity(
        _logits(graphdef),
        tokens=loaded.eval_tokens,
        params=state,
        seq_len=seq_len,
        max_windows=max_windows,
        batch_size=batch_size,
        progress=progress,
    )
    if any(r.quantized for r in rep.rows):
        bpw = rep.bits_per_weight
        name = loaded.saved_spec if (spec.is_float and loaded.saved_spec) else spec.name
    else:
        bpw = 32.0
        name = spec.name
    return EvalResult(
        scheme=name,
        model=loaded.name,
        ppl=float(res.ppl),
        bits_per_weight=float(bpw),
        weight_bytes=int(tree_nbytes(weight_params(qmodel))),
        tokens=int(res.n_tokens),
        seconds=float(res.seconds),
        quantize_seconds=float(tq),
        peak_rss_bytes=int(peak_rss_bytes()),
    )
